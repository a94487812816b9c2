"""The worked example of docs/paper.md: the paper's analyses on the built-in demo models.

Runs `sslsim demo` (the built-in models over the shipped speech), copies its all-network grids,
localization and top-k figures into docs/figures/ as ``demo_*.png`` and prints, as Markdown, the
numbers docs/paper.md quotes: each model's best match in every other model per metric
(`sslsim_jax.analyses.best_matches`) and the localization scores.

    python scripts/paper_example.py [--out demo-report] [--figures docs/figures]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sslsim_jax import analyses, demo, results

FIGURES = ("grid_linear_cka", "localization", "topk")


def markdown(frame) -> str:
    """A DataFrame as a Markdown table, floats to 3 decimals."""

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |"]
    lines.append("|" + "---|" * len(frame.columns))
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-report", help="the demo's output directory")
    parser.add_argument("--figures", default="docs/figures", help="where the figures go")
    parser.add_argument("--reuse", action="store_true", help="read --out instead of running")
    args = parser.parse_args()
    if not args.reuse:
        demo.run(out=args.out)
    run = results.read_results(args.out)
    table = run.similarities
    known = set(table.metric)
    metrics = [m for m in ("maxcorr", "linreg", "svcca", "pwcca", "linear_cka") if m in known]
    best = analyses.best_matches(table, metrics)
    pairs = list(dict.fromkeys(zip(best.model_a, best.model_b, strict=True)))
    wide = best.set_index(["model_a", "model_b", "metric"]).best_match.unstack("metric")
    wide = wide.loc[pairs, metrics].reset_index()
    print("Best match of each network of model_a in model_b, mean over model_a's networks:\n")
    print(markdown(wide))
    if run.localization is not None:
        print("\nLocalization (Wu et al.), score = z(localized) - z(distributed):\n")
        print(markdown(run.localization))
    target = Path(args.figures)
    target.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        source = Path(args.out) / "figures" / f"{name}.png"
        if source.exists():
            shutil.copyfile(source, target / f"demo_{name}.png")
            print(f"\n{target / f'demo_{name}.png'}")


if __name__ == "__main__":
    main()
