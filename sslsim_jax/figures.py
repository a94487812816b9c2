"""The paper's figures: every network against every network, localization and top-k curves.

El Kheir et al. (2024) show the similarity of all layers of all models in one grid, intra-model
blocks on the diagonal, inter-model blocks off it. `network_grid` draws that grid from the tidy
similarity table (layer metrics and attention layer metrics alike) and stays legible at the
paper's scale (8 models, about 150 networks): model blocks are outlined and named on both
axes, layer ticks are thinned to a regular step. `localization_plot` and `topk_plot` draw the
outputs of `sslsim_jax.analyses` and `sslsim_jax.metrics.topk`.

Conventions as in `sslsim_jax.report`: rows are network a, columns network b; x-centric
metrics describe the row in terms of the column; distances use the reversed colour map so that
bright means similar; figures use the Agg canvas, never ``pyplot``.

References:
    El Kheir, Ali, Chowdhury. Speech representation analysis based on inter- and intra-model
    similarities. ICASSP 2024 XAISA workshop (arXiv 2406.16099).
    Wu, Belinkov, Sajjad, Durrani, Dalvi, Glass. Similarity analysis of contextual word
    representation models. ACL 2020.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sslsim_jax.metrics import registry
from sslsim_jax.results import layer_order

__all__ = [
    "colour_map",
    "colour_range",
    "metric_info",
    "new_figure",
    "GridData",
    "grid_matrix",
    "localization_plot",
    "network_grid",
    "tick_positions",
    "tick_step",
    "topk_curves",
    "topk_plot",
]

DPI = 120


def metric_info(metric: str) -> registry.Metric:
    """The registry entry of ``metric``; an unknown one is drawn with a data-driven range and
    labelled with its raw name."""
    return registry.METRICS.get(metric) or registry.Metric(
        metric, metric, "moments", True, low=None
    )


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def colour_range(info: registry.Metric, values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    low, high = info.low, info.high
    if low is None:
        low = min(0.0, float(finite.min())) if finite.size else 0.0
    if finite.size:
        # Extend a fixed range rather than clip values outside it (e.g. debiased CKA > 1).
        low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return low, high


def colour_map(info: registry.Metric) -> matplotlib.colors.Colormap:
    cmap = matplotlib.colormaps["viridis_r" if not info.higher_is_similar else "viridis"]
    return cmap.with_extremes(bad="#d9d9d9")


# Up to this many networks every layer is labelled; above, a regular step keeps about
# _MAX_TICKS labels per axis (at 6 pt, about 9 per inch on the largest figure).
_ALL_TICKS = 40
_MAX_TICKS = 48
_TICK_STEPS = (1, 2, 3, 4, 5, 6, 8, 10)


class GridData(NamedTuple):
    """The matrix `network_grid` draws.

    Attributes:
        matrix: [K, K] values, row network a, column network b (NaN where the table has none).
        networks: K (model, layer) pairs, in the grid's order.
        blocks: one (model, start, stop) per model: its networks are rows start … stop - 1.
    """

    matrix: np.ndarray
    networks: list[tuple[str, str]]
    blocks: list[tuple[str, int, int]]


def grid_matrix(
    table: pd.DataFrame, metric: str, *, models: Sequence[str] | None = None
) -> GridData:
    """Every network of ``models`` against every network, for one metric.

    Args:
        table: tidy similarity table (``model_a, layer_a, model_b, layer_b, metric, value``).
        metric: the metric (``table.metric``), e.g. ``"linear_cka"`` or ``"attention_fro"``.
        models: models in grid order; default every model of the metric's rows, in order of
            first appearance. Layers follow `sslsim_jax.report.layer_order`.

    Returns:
        `GridData`.

    Raises:
        ValueError: no rows for the metric, an unknown model, or duplicate pairs.
    """
    rows = table[table["metric"] == metric]
    if rows.empty:
        raise ValueError(f"no rows for metric={metric!r}")
    present = list(dict.fromkeys([*rows["model_a"], *rows["model_b"]]))
    models = present if models is None else list(models)
    unknown = [m for m in models if m not in present]
    if unknown or not models:
        raise ValueError(f"expected models among {present} for metric={metric!r}, got {models}")
    rows = rows[rows["model_a"].isin(models) & rows["model_b"].isin(models)]
    key = ["model_a", "layer_a", "model_b", "layer_b"]
    if rows.duplicated(key).any():
        raise ValueError(f"duplicate network pairs for metric={metric!r}")
    networks: list[tuple[str, str]] = []
    blocks: list[tuple[str, int, int]] = []
    for model in models:
        layers = layer_order(
            [
                *rows.loc[rows["model_a"] == model, "layer_a"].astype(str),
                *rows.loc[rows["model_b"] == model, "layer_b"].astype(str),
            ]
        )
        blocks.append((model, len(networks), len(networks) + len(layers)))
        networks.extend((model, layer) for layer in layers)
    index = {net: i for i, net in enumerate(networks)}
    ia = [index[net] for net in zip(rows["model_a"], rows["layer_a"].astype(str), strict=True)]
    ib = [index[net] for net in zip(rows["model_b"], rows["layer_b"].astype(str), strict=True)]
    matrix = np.full((len(networks), len(networks)), np.nan)
    matrix[ia, ib] = rows["value"].to_numpy(dtype=float)
    return GridData(matrix, networks, blocks)


def tick_step(k: int) -> int:
    """Label every step-th layer of each model block so that about `_MAX_TICKS` labels show."""
    if k <= _ALL_TICKS:
        return 1
    need = math.ceil(k / _MAX_TICKS)
    return next((s for s in _TICK_STEPS if s >= need), need)


def tick_positions(blocks: Sequence[tuple[str, int, int]], k: int) -> list[int]:
    """Rows/columns that get a layer label: each block's first network and every step-th.

    With a step above 1, a label less than half a step before the next block's first label is
    dropped, so that labels of neighbouring blocks ("12" and "0") do not overlap.
    """
    step = tick_step(k)
    out = []
    for j, (_, start, stop) in enumerate(blocks):
        last = j == len(blocks) - 1
        for i in range(start, stop, step):
            if i == start or last or step == 1 or stop - i >= max(2, (step + 1) // 2 + 1):
                out.append(i)
    return out


def network_grid(
    table: pd.DataFrame,
    metric: str,
    *,
    models: Sequence[str] | None = None,
    frames: int | None = None,
) -> Figure:
    """All networks of all models against each other in one heatmap (the paper's grid).

    Intra-model blocks lie on the diagonal, inter-model blocks off it; white lines outline the
    model blocks and the model names label them on the top and right axes; the left and bottom
    ticks name the layers (thinned to every `tick_step`-th layer above 40 networks). The image
    is ``fig.axes[0].images[0]`` and its array equals ``grid_matrix(table, metric).matrix``.

    Args:
        table: tidy similarity table.
        metric: the metric to draw (layer metrics or attention layer metrics).
        models: models in grid order (default: order of first appearance).
        frames: number of frames, shown in the title.

    Returns:
        The figure (Agg canvas).
    """
    data = grid_matrix(table, metric, models=models)
    k = len(data.networks)
    info = metric_info(metric)
    side = min(max(4.0 + 0.062 * k, 6.0), 13.5)
    fig = new_figure(side + 2.0, side + 0.6)
    ax = fig.add_subplot()
    norm = matplotlib.colors.Normalize(*colour_range(info, data.matrix))
    image = ax.imshow(
        np.ma.masked_invalid(data.matrix),
        cmap=colour_map(info),
        norm=norm,
        aspect="equal",
        interpolation="nearest",
    )
    size = 8.0 if k <= _ALL_TICKS else 6.0
    ticks = tick_positions(data.blocks, k)
    labels = [data.networks[i][1] for i in ticks]
    ax.set_xticks(ticks, labels=labels, fontsize=size, rotation=90)
    ax.set_yticks(ticks, labels=labels, fontsize=size)
    ax.tick_params(length=2, pad=1)
    for _, start, _ in data.blocks[1:]:
        ax.axhline(start - 0.5, color="white", linewidth=1.2)
        ax.axvline(start - 0.5, color="white", linewidth=1.2)
    centres = [(start + stop - 1) / 2 for _, start, stop in data.blocks]
    names = [model for model, _, _ in data.blocks]
    name_size = 9.0 if len(names) <= 8 else 7.0
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels=names, fontsize=name_size, rotation=30, ha="left")
    top.tick_params(length=0)
    right = ax.secondary_yaxis("right")
    right.set_yticks(centres, labels=names, fontsize=name_size)
    right.tick_params(length=0)
    # Short axis labels: at 150 networks a long one is clipped by constrained layout.
    ax.set_xlabel("network b (layer; model on top)")
    ax.set_ylabel("network a (layer; model on the right)")
    relation = "row in terms of column" if info.x_centric else "symmetric"
    frames_text = "" if frames is None else f" · {frames:,} frames"
    fig.suptitle(
        f"{info.label} ({metric}) of every network against every network\n"
        f"{len(names)} models, {k} networks · {relation}{frames_text}",
        fontsize=11,
    )
    bar = fig.colorbar(image, ax=ax, shrink=0.7, fraction=0.04, pad=0.02)
    bar.set_label(f"{info.label} ({info.direction})")
    return fig


def _positions(layers: Sequence[str]) -> np.ndarray:
    """x positions of a model's layers: the block number, "final" one after the last block."""
    ordered = layer_order(layers)
    return np.asarray([ordered.index(str(layer)) for layer in layers], dtype=float)


def localization_plot(loc: pd.DataFrame) -> Figure:
    """Localization score by layer, one line per model (`sslsim_jax.analyses.localization`).

    x is the layer (position in the model's network order: 0 … L, then "final" where the model
    has it, drawn as a square), y the score z(localized) − z(distributed). Line k of the top
    axes is model k in order of appearance; the bottom axes show the two means behind the
    score (solid: localized = mean maxcorr, dashed: distributed = mean SVCCA).

    Args:
        loc: frame with columns ``model, layer, localized, distributed, score``.

    Returns:
        The figure.
    """
    missing = [c for c in ("model", "layer", "localized", "distributed", "score") if c not in loc]
    if missing or loc.empty:
        raise ValueError(f"expected a localization frame with rows, missing columns {missing}")
    models = list(dict.fromkeys(loc["model"]))
    fig = new_figure(8.0, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    colours = matplotlib.colormaps["tab10" if len(models) <= 10 else "tab20"].colors
    width = 0
    for i, model in enumerate(models):
        rows = loc[loc["model"] == model]
        layers = [str(layer) for layer in rows["layer"]]
        x = _positions(layers)
        order = np.argsort(x)
        x = x[order]
        colour = colours[i % len(colours)]
        score = rows["score"].to_numpy(float)[order]
        top.plot(x, score, marker="o", ms=3, color=colour, label=model)
        final = np.asarray(layers)[order] == "final"
        if final.any():
            top.plot(x[final], score[final], "s", ms=6, mfc="none", color=colour)
        bottom.plot(x, rows["localized"].to_numpy(float)[order], color=colour)
        bottom.plot(x, rows["distributed"].to_numpy(float)[order], color=colour, ls="--")
        width = max(width, len(x))
    top.axhline(0.0, color="grey", linewidth=0.8)
    top.set_ylabel("localization score\nz(maxcorr) − z(SVCCA)")
    top.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("mean over other networks")
    bottom.plot([], [], color="black", label="localized (maxcorr)")
    bottom.plot([], [], color="black", ls="--", label="distributed (SVCCA)")
    bottom.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    bottom.grid(True, alpha=0.3)
    step = 1 if width <= 14 else 2
    bottom.set_xticks(np.arange(0, width, step))
    bottom.set_xlabel("layer (squares: final LayerNorm output, after the last block)")
    fig.suptitle(
        "Localization vs distributivity (Wu et al. 2020)\n"
        "positive: shared information sits in single neurons; negative: in distributed "
        "directions",
        fontsize=10,
    )
    return fig


def topk_curves(topk: pd.DataFrame, *, pool: str = "networks") -> pd.DataFrame:
    """Mean top-k value per (metric, model_a, k) over every pair of the pool.

    Args:
        topk: rows ``model_a, layer_a, model_b, layer_b, metric, k, value``.
        pool: ``"networks"`` (every other network) or ``"models"`` (other models only).

    Returns:
        DataFrame with columns ``metric, model, k, value``.
    """
    if pool not in ("networks", "models"):
        raise ValueError(f"expected pool in ('networks', 'models'), got {pool!r}")
    same_net = (topk["model_a"] == topk["model_b"]) & (
        topk["layer_a"].astype(str) == topk["layer_b"].astype(str)
    )
    keep = ~same_net if pool == "networks" else topk["model_a"] != topk["model_b"]
    sel = topk[keep]
    curves = sel.groupby(["metric", "model_a", "k"], sort=False)["value"].mean().reset_index()
    return curves.rename(columns={"model_a": "model"})


def topk_plot(
    topk: pd.DataFrame, *, metrics: Sequence[str] | None = None, pool: str = "networks"
) -> Figure:
    """Top-k similarity against k, one panel per metric, one line per model.

    A line is `topk_curves`: model m's mean over its networks and their partners of the top-k
    value. Steeply falling curves mean a few neurons (directions) carry the similarity.

    Args:
        topk: rows ``model_a, layer_a, model_b, layer_b, metric, k, value`` (``topk.csv``).
        metrics: panels in order (default every metric of the frame).
        pool: as in `topk_curves`.

    Returns:
        The figure; panel i is ``fig.axes[i]``, line j of it model j in order of appearance.
    """
    curves = topk_curves(topk, pool=pool)
    available = list(dict.fromkeys(curves["metric"]))
    metrics = available if metrics is None else list(metrics)
    missing = [m for m in metrics if m not in available]
    if missing or not metrics:
        raise ValueError(f"expected metrics among {available}, got {metrics}")
    models = list(dict.fromkeys(topk["model_a"]))
    colours = matplotlib.colormaps["tab10" if len(models) <= 10 else "tab20"].colors
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig: Figure = new_figure(1.8 + 4.0 * ncols, 0.9 + 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for i, model in enumerate(models):
            rows = curves[(curves["metric"] == metric) & (curves["model"] == model)]
            rows = rows.sort_values("k")
            colour = colours[i % len(colours)]
            ax.plot(rows["k"], rows["value"], marker="o", ms=3, color=colour, label=model)
        ax.set_title(f"{metric_info(metric).label} ({metric})", fontsize=9)
        ax.set_xlabel("k (fraction of neurons / directions kept)")
        ax.set_ylabel("mean top-k value")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, frameon=False)
    partners = "every other network" if pool == "networks" else "networks of other models"
    fig.suptitle(f"Top-k similarity (Wu et al. 2020), mean over {partners}", fontsize=10)
    return fig
