"""A fine-tuning trajectory: each layer's linear CKA with the pre-trained model, per checkpoint.

Reads the converted checkpoints that ``scripts/train_demo_models.py --trajectory DIR`` saves
along CTC fine-tuning (``DIR/<name>-ctc/step-<n>``, each loadable by ``sslsim_jax.load_model``),
runs them and the pre-trained model over the demo clips (or ``--audio``) with
``sslsim_jax.analysis.analyze`` (linear CKA only), and draws layer i of the pre-trained model
vs layer i of each checkpoint against the fine-tuning step, one line per layer. Step 0 is the
pre-trained encoder with the fresh CTC head, so its similarities are 1.

    python scripts/trajectory.py /tmp/ctc-traj/tiny-hubert-ctc \\
        --pretrained sslsim_jax/data/models/tiny-hubert --out docs/figures/demo_trajectory.png
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import pandas as pd


def checkpoints(directory: str) -> dict[int, str]:
    """``{step: path}`` of the ``step-<n>`` directories under ``directory``."""
    found = {}
    for entry in os.listdir(directory):
        match = re.fullmatch(r"step-(\d+)", entry)
        if match:
            found[int(match.group(1))] = os.path.join(directory, entry)
    if not found:
        raise FileNotFoundError(f"{directory}: no step-<n> checkpoints")
    return dict(sorted(found.items()))


def trajectory(
    pretrained: str, steps: dict[int, str], audio_source, *, progress: bool = True
) -> pd.DataFrame:
    """Linear CKA of layer i of ``pretrained`` with layer i of each checkpoint: a table with
    columns step, layer, value."""
    from sslsim_jax import load_model
    from sslsim_jax.analysis import Settings, analyze

    paths = {"pretrained": pretrained, **{f"step-{s}": p for s, p in steps.items()}}
    models = [(name, load_model(path)) for name, path in paths.items()]
    settings = Settings(metrics=("linear_cka",), batch_seconds=20.0)
    with tempfile.TemporaryDirectory() as out:
        table = analyze(models, audio_source, out, settings, progress=progress, report=False)
    rows = table[
        (table.model_a == "pretrained")
        & table.model_b.str.startswith("step-")
        & (table.layer_a.astype(str) == table.layer_b.astype(str))
    ]
    return pd.DataFrame(
        {
            "step": rows.model_b.str.removeprefix("step-").astype(int).to_numpy(),
            "layer": rows.layer_a.astype(str).to_numpy(),
            "value": rows.value.to_numpy(),
        }
    ).sort_values(["layer", "step"], key=lambda c: c.map(_layer_order) if c.name == "layer" else c)


def _layer_order(layer: str) -> float:
    return float("inf") if layer == "final" else float(layer)


def draw(values: pd.DataFrame, path: str, title: str) -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted(values.layer.unique(), key=_layer_order)
    colours = colormaps["viridis"]
    figure = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for i, layer in enumerate(layers):
        rows = values[values.layer == layer]
        label = "final LayerNorm" if layer == "final" else f"layer {layer}"
        if layer == "0":
            label += " (transformer input)"
        ax.plot(
            rows.step,
            rows.value,
            marker="o",
            markersize=3,
            color=colours(i / max(len(layers) - 1, 1)),
            label=label,
        )
    ax.set_xlabel("CTC fine-tuning step")
    ax.set_ylabel("linear CKA with the pre-trained layer")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", help="directory of step-<n> converted checkpoints")
    parser.add_argument("--pretrained", default="sslsim_jax/data/models/tiny-hubert")
    parser.add_argument("--audio", help="audio directory or list (default: the demo clips)")
    parser.add_argument("--out", default="docs/figures/demo_trajectory.png")
    parser.add_argument("--csv", help="also write the values (step, layer, value) here")
    parser.add_argument("--title", default="tiny-hubert → tiny-hubert-ctc, demo clips")
    args = parser.parse_args(argv)
    from sslsim_jax import audio

    source = args.audio or audio.demo_audio_paths()
    values = trajectory(args.pretrained, checkpoints(args.checkpoints), source)
    if args.csv:
        values.to_csv(args.csv, index=False)
    draw(values, args.out, args.title)
    wide = values.pivot(index="step", columns="layer", values="value")
    wide = wide[sorted(wide.columns, key=_layer_order)]
    print(wide.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
