"""Draw the paper-scale network grid from a SYNTHETIC similarity table (no model is run).

Eight full-size models (wav2vec 2.0 and HuBERT, base with 13 networks and large with 25,
pre-trained and CTC fine-tuned): 4 × 13 + 4 × 25 = 152 networks. The values are made up with
the structure such grids tend to show (similarity decays with the distance in relative depth;
same model > same family > other family; fine-tuning changes the upper layers most), only to
check that `sslsim_jax.figures.network_grid` is legible at this scale. They are not results.

    python scripts/make_grid_example.py [--out docs/figures/paper_grid_example.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from sslsim_jax.figures import network_grid

# (name, family, layers, fine-tuned version of)
MODELS = [
    ("w2v2-base", "wav2vec2", 13, None),
    ("w2v2-base-ft", "wav2vec2", 13, "w2v2-base"),
    ("w2v2-large", "wav2vec2", 25, None),
    ("w2v2-large-ft", "wav2vec2", 25, "w2v2-large"),
    ("hubert-base", "hubert", 13, None),
    ("hubert-base-ft", "hubert", 13, "hubert-base"),
    ("hubert-large", "hubert", 25, None),
    ("hubert-large-ft", "hubert", 25, "hubert-large"),
]


def synthetic_table(seed: int = 0) -> pd.DataFrame:
    """Symmetric made-up linear-CKA-like values for every ordered pair of the 152 networks."""
    rng = np.random.default_rng(seed)
    nets = [(name, fam, i / (n - 1), ft) for name, fam, n, ft in MODELS for i in range(n)]
    layers = [str(i) for _, _, n, _ in MODELS for i in range(n)]
    k = len(nets)
    value = np.empty((k, k))
    for a, (ma, fa, da, fta) in enumerate(nets):
        for b, (mb, fb, db, ftb) in enumerate(nets):
            base = np.exp(-abs(da - db) / 0.28)
            if ma == mb:
                factor = 1.0
            elif fta == mb or ftb == ma:
                # Pre-trained vs its fine-tuned version: close below, apart in the top third.
                factor = 0.97 - 0.7 * max(0.0, max(da, db) - 0.55) / 0.45
            elif fa == fb:
                factor = 0.8
            else:
                factor = 0.62
            value[a, b] = factor * base
    noise = rng.normal(scale=0.02, size=(k, k))
    value = np.clip(value + (noise + noise.T) / 2, 0.0, 1.0)
    np.fill_diagonal(value, 1.0)
    a, b = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    names = np.asarray([n[0] for n in nets], dtype=object)
    layer = np.asarray(layers, dtype=object)
    return pd.DataFrame(
        {
            "model_a": names[a.ravel()],
            "layer_a": layer[a.ravel()],
            "model_b": names[b.ravel()],
            "layer_b": layer[b.ravel()],
            "metric": "linear_cka",
            "value": value.ravel(),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/paper_grid_example.png"))
    args = parser.parse_args()
    table = synthetic_table()
    fig = network_grid(table, "linear_cka")
    fig.suptitle(
        "SYNTHETIC VALUES (layout example, not results): linear CKA of every network against\n"
        "every network · 8 models, 152 networks · scripts/make_grid_example.py",
        fontsize=11,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
