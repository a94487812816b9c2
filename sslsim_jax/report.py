"""Tables and figures from saved results: heatmaps, fine-tuning plots and ``report.html``.

The report reads only the files a run leaves in its output directory, through
`sslsim_jax.results` (their names, columns and validation live there); nothing here runs a
model.

Conventions of every matrix figure: rows (y axis) are the layers of ``model_a``, columns
(x axis) the layers of ``model_b``, layer 0 at the top left as in the tables. The x-centric
metrics (maxcorr, linreg, pwcca and the attention metrics) describe the row network *in terms
of* the column network and are not symmetric; the figures say so. Procrustes is a distance
(lower = more similar) and is drawn with the reversed colour map, so that bright means similar
in every figure. Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
through ``pyplot``, so no global figure state is kept between calls.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import html
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sslsim_jax import figures
from sslsim_jax import results as results_schema
from sslsim_jax.memory import usable_cores
from sslsim_jax.metrics import registry
from sslsim_jax.results import (
    CI_COLUMNS,
    Results,
    ResultsError,
    layer_order,
    read_results,
)

__all__ = [
    "METRIC_INFO",
    "Results",
    "ResultsError",
    "attention_head_grid",
    "attention_head_heatmap",
    "build_report",
    "finetune_plot",
    "heatmap",
    "layer_order",
    "read_results",
]

ANNOTATE_MAX = 13


# Labels, bounds and directions come from the metric registry; the report adds none of its own.
METRIC_INFO = registry.METRICS
_info = figures.metric_info
_new_figure = figures.new_figure
_colour_range = figures.colour_range
_cmap = figures.colour_map
_DPI = figures.DPI


def _head_info(method: str) -> registry.Metric:
    """An attention method's metric, labelled for head-level figures."""
    info = _info(f"attention_{method}")
    return dataclasses.replace(info, label=info.label.removeprefix("attention "))


# ---------------------------------------------------------------------------------------------
# Figures


def _tick_size(n: int) -> float:
    return 9.0 if n <= ANNOTATE_MAX else 7.0 if n <= 30 else 6.0


def _draw_matrix(
    ax: Any,
    matrix: np.ndarray,
    *,
    info: registry.Metric,
    rows: Sequence[str],
    cols: Sequence[str],
    vrange: tuple[float, float],
    annotate: bool,
) -> matplotlib.image.AxesImage:
    cmap = _cmap(info)
    norm = matplotlib.colors.Normalize(*vrange)
    image = ax.imshow(
        np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, aspect="equal", origin="upper"
    )
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=_tick_size(len(rows)))
    ax.set_xticks(
        range(len(cols)),
        labels=list(cols),
        fontsize=_tick_size(len(cols)),
        rotation=90 if len(cols) > ANNOTATE_MAX or max(map(len, cols)) > 2 else 0,
    )
    ax.tick_params(length=2)
    if annotate:
        size = 7.0 if max(matrix.shape) > 9 else 8.0
        for (i, j), v in np.ndenumerate(matrix):
            if not np.isfinite(v):
                continue
            r, g, b, _ = cmap(norm(v))
            colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size, color=colour)
    return image


def _frames_text(frames: int | None) -> str:
    return "" if frames is None else f" · {frames:,} frames"


def _pair_matrix(
    table: pd.DataFrame, *, metric: str, model_a: str, model_b: str
) -> tuple[np.ndarray, list[str], list[str]]:
    rows = table[(table.metric == metric) & (table.model_a == model_a) & (table.model_b == model_b)]
    if rows.empty:
        raise ValueError(f"no rows for metric={metric!r}, model_a={model_a!r}, model_b={model_b!r}")
    if rows.duplicated(["layer_a", "layer_b"]).any():
        raise ValueError(
            f"duplicate (layer_a, layer_b) rows for metric={metric!r}, "
            f"model_a={model_a!r}, model_b={model_b!r}"
        )
    la, lb = layer_order(rows.layer_a), layer_order(rows.layer_b)
    grid = rows.pivot(index="layer_a", columns="layer_b", values="value").reindex(
        index=la, columns=lb
    )
    return grid.to_numpy(dtype=float), la, lb


def heatmap(
    table: pd.DataFrame,
    *,
    metric: str,
    model_a: str,
    model_b: str,
    frames: int | None = None,
) -> Figure:
    """Layer × layer heatmap of one metric between two models (or a model and itself).

    Rows (y axis, top to bottom) are the layers of ``model_a``, columns (x axis) those of
    ``model_b``; for x-centric metrics a cell is the row network in terms of the column network.
    Pairs absent from the table are grey. Values are written in the cells of grids up to
    ``ANNOTATE_MAX`` × ``ANNOTATE_MAX``. The plotted matrix is the first image of the first axes
    (``fig.axes[0].images[0].get_array()``, a masked array).

    Args:
      table: tidy similarity table (``Results.similarities``).
      metric: metric name (``table.metric``).
      model_a: model on the rows.
      model_b: model on the columns.
      frames: number of frames the statistics were computed on, shown in the title.

    Returns:
      The figure (Agg canvas, not registered with pyplot).

    Raises:
      ValueError: the table has no rows for this metric and model pair.
    """
    matrix, la, lb = _pair_matrix(table, metric=metric, model_a=model_a, model_b=model_b)
    info = _info(metric)
    cell = 0.42 if max(matrix.shape) <= ANNOTATE_MAX else 0.3
    fig = _new_figure(
        min(max(2.6 + cell * len(lb), 5.2), 13.0), min(max(1.9 + cell * len(la), 4.4), 12.0)
    )
    ax = fig.add_subplot()
    image = _draw_matrix(
        ax,
        matrix,
        info=info,
        rows=la,
        cols=lb,
        vrange=_colour_range(info, matrix),
        annotate=max(matrix.shape) <= ANNOTATE_MAX,
    )
    ax.set_ylabel(f"{model_a} layer")
    ax.set_xlabel(f"{model_b} layer")
    relation = "row in terms of column" if info.x_centric else "symmetric"
    ax.set_title(
        f"{info.label} ({metric})\n{model_a} vs {model_b}\n{relation}{_frames_text(frames)}",
        fontsize=10,
    )
    bar = fig.colorbar(image, ax=ax, shrink=0.85, fraction=0.05)
    bar.set_label(f"{info.label} ({info.direction})")
    return fig


def finetune_plot(
    table: pd.DataFrame,
    *,
    pretrained: str,
    finetuned: str,
    metrics: Sequence[str] | None = None,
    frames: int | None = None,
) -> Figure:
    """Per-layer similarity of a pre-trained model with its fine-tuned version.

    For each layer i present in both, the value of pretrained:i with finetuned:i (x-centric
    metrics: pre-trained in terms of fine-tuned), one line per metric, with a shaded bootstrap
    band where ``ci_low``/``ci_high`` are present. Distances (Procrustes) go on a second panel
    below, since their direction and range differ. Line ``k`` of an axes holds x = layer
    positions 0, 1, … (tick labels are the layer names) and y = the table's values (NaN where a
    layer pair is missing).

    Args:
      table: tidy similarity table (``Results.similarities``).
      pretrained: the pre-trained model's name.
      finetuned: the fine-tuned model's name.
      metrics: metrics to draw, in order; default every metric with same-layer rows.
      frames: number of frames, shown in the title.

    Returns:
      The figure.

    Raises:
      ValueError: no same-layer rows for the pair, or a requested metric has none.
    """
    pair = table[
        (table.model_a == pretrained)
        & (table.model_b == finetuned)
        & (table.layer_a == table.layer_b)
    ]
    if pair.empty:
        raise ValueError(
            f"no same-layer rows for pretrained={pretrained!r}, finetuned={finetuned!r}"
        )
    available = list(dict.fromkeys(pair.metric))
    metrics = available if metrics is None else list(metrics)
    missing = [m for m in metrics if m not in available]
    if missing or not metrics:
        raise ValueError(
            f"expected metrics among {available} for {pretrained} vs {finetuned}, got {metrics}"
        )
    pair = pair[pair.metric.isin(metrics)]
    layers = layer_order(pair.layer_a)
    x = np.arange(len(layers))
    has_ci = all(c in pair.columns for c in CI_COLUMNS)
    groups = [
        [m for m in metrics if not (not _info(m).higher_is_similar)],
        [m for m in metrics if (not _info(m).higher_is_similar)],
    ]
    groups = [g for g in groups if g]
    width = min(max(5.5 + 0.25 * len(layers), 7.0), 13.0)
    fig = _new_figure(width, 1.2 + 3.2 * len(groups))
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    colours = matplotlib.colormaps["tab10" if len(metrics) <= 10 else "tab20"].colors
    for ax, group in zip(axes, groups, strict=True):
        for m in group:
            rows = pair[pair.metric == m].set_index("layer_a").reindex(layers)
            colour = colours[metrics.index(m) % len(colours)]
            ax.plot(x, rows.value.to_numpy(float), marker="o", ms=4, color=colour, label=m)
            if has_ci:
                ax.fill_between(
                    x,
                    rows.ci_low.to_numpy(float),
                    rows.ci_high.to_numpy(float),
                    color=colour,
                    alpha=0.2,
                    linewidth=0,
                )
        distance = not _info(group[0]).higher_is_similar
        ax.set_ylabel("distance (lower = more similar)" if distance else "similarity")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        if not distance:
            low = np.nanmin(pair[pair.metric.isin(group)].value.to_numpy(float))
            ax.set_ylim(min(0.0, low) - 0.02, 1.02)
    axes[-1].set_xticks(x, labels=layers, fontsize=_tick_size(len(layers)))
    axes[-1].set_xlabel(f"layer i ({pretrained}:i vs {finetuned}:i)")
    ci = " · shaded: bootstrap CI" if has_ci else ""
    fig.suptitle(
        f"Pre-trained {pretrained} vs fine-tuned {finetuned}, same layer\n"
        f"x-centric metrics: pre-trained in terms of fine-tuned{_frames_text(frames)}{ci}",
        fontsize=10,
    )
    return fig


def _head_matrix(
    heads: pd.DataFrame, *, model_a: str, layer_a: str, model_b: str, layer_b: str, method: str
) -> np.ndarray:
    rows = heads[
        (heads.method == method)
        & (heads.model_a == model_a)
        & (heads.layer_a == layer_a)
        & (heads.model_b == model_b)
        & (heads.layer_b == layer_b)
    ]
    if rows.empty:
        raise ValueError(
            f"no attention head rows for method={method!r}, {model_a}:{layer_a} vs "
            f"{model_b}:{layer_b}"
        )
    grid = rows.pivot(index="head_a", columns="head_b", values="value")
    grid = grid.reindex(
        index=range(int(rows.head_a.max()) + 1), columns=range(int(rows.head_b.max()) + 1)
    )
    return grid.to_numpy(dtype=float)


def attention_head_heatmap(
    heads: pd.DataFrame,
    *,
    model_a: str,
    layer_a: str,
    model_b: str,
    layer_b: str,
    method: str,
    frames: int | None = None,
) -> Figure:
    """Head × head similarity of two attention layers (``attention_heads.csv``).

    Rows are the heads of ``model_a:layer_a``, columns those of ``model_b:layer_b``; a cell is
    the similarity of the two heads' attention maps (1 − Frobenius distance, Pearson r or
    1 − Jensen–Shannon, see `sslsim_jax.metrics.attention`).

    Args:
      heads: the head-level table (``Results.attention_heads``).
      model_a: model on the rows.
      layer_a: its layer.
      model_b: model on the columns.
      layer_b: its layer.
      method: ``"fro"``, ``"pearson"`` or ``"js"``.
      frames: number of frames, shown in the title.

    Returns:
      The figure; the matrix is ``fig.axes[0].images[0].get_array()``.
    """
    matrix = _head_matrix(
        heads, model_a=model_a, layer_a=layer_a, model_b=model_b, layer_b=layer_b, method=method
    )
    info = _head_info(method)
    fig = _new_figure(
        max(2.6 + 0.42 * matrix.shape[1], 5.2), max(1.9 + 0.42 * matrix.shape[0], 4.4)
    )
    ax = fig.add_subplot()
    image = _draw_matrix(
        ax,
        matrix,
        info=info,
        rows=[str(h) for h in range(matrix.shape[0])],
        cols=[str(h) for h in range(matrix.shape[1])],
        vrange=_colour_range(info, matrix),
        annotate=max(matrix.shape) <= ANNOTATE_MAX,
    )
    ax.set_ylabel(f"{model_a} layer {layer_a} head")
    ax.set_xlabel(f"{model_b} layer {layer_b} head")
    ax.set_title(
        f"Attention heads: {info.label} ({method})\n{model_a}:{layer_a} vs {model_b}:{layer_b}"
        f"{_frames_text(frames)}",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, shrink=0.85, fraction=0.05).set_label(
        f"{info.label} ({info.direction})"
    )
    return fig


def attention_head_grid(
    heads: pd.DataFrame,
    *,
    model_a: str,
    model_b: str,
    method: str,
    layers: Sequence[str] | None = None,
    frames: int | None = None,
) -> Figure:
    """Small multiples of head × head similarity for same-numbered layers of two models.

    Panel ``k`` compares ``model_a:layers[k]`` (rows) with ``model_b:layers[k]`` (columns), all
    panels on one colour scale.

    Args:
      heads: the head-level table (``Results.attention_heads``).
      model_a: model on the rows.
      model_b: model on the columns.
      method: ``"fro"``, ``"pearson"`` or ``"js"``.
      layers: layers to show; default every layer with same-layer rows for this pair.
      frames: number of frames, shown in the title.

    Returns:
      The figure; panel k's matrix is ``fig.axes[k].images[0].get_array()``.
    """
    sel = heads[
        (heads.method == method)
        & (heads.model_a == model_a)
        & (heads.model_b == model_b)
        & (heads.layer_a == heads.layer_b)
    ]
    layers = layer_order(sel.layer_a) if layers is None else list(layers)
    if not layers:
        raise ValueError(
            f"no same-layer attention head rows for method={method!r}, {model_a} vs {model_b}"
        )
    info = _head_info(method)
    matrices = [
        _head_matrix(heads, model_a=model_a, layer_a=la, model_b=model_b, layer_b=la, method=method)
        for la in layers
    ]
    vrange = _colour_range(info, np.concatenate([m.ravel() for m in matrices]))
    ncols = min(4, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = _new_figure(1.2 + 2.7 * ncols, 1.0 + 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    image = None
    for ax, la, matrix in zip(axes, layers, matrices, strict=False):
        heads_a = [str(h) for h in range(matrix.shape[0])]
        heads_b = [str(h) for h in range(matrix.shape[1])]
        image = _draw_matrix(
            ax, matrix, info=info, rows=heads_a, cols=heads_b, vrange=vrange, annotate=False
        )
        ax.tick_params(labelsize=6)
        ax.set_title(f"layer {la}", fontsize=9)
        ax.set_ylabel(f"{model_a} head", fontsize=8)
        ax.set_xlabel(f"{model_b} head", fontsize=8)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.95, fraction=0.04).set_label(
        f"{info.label} ({info.direction})", fontsize=8 if nrows == 1 else 10
    )
    fig.suptitle(
        f"Attention heads, same layer: {info.label} ({method})\n"
        f"{model_a} (rows) vs {model_b} (columns){_frames_text(frames)}",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Report


def _save(fig: Figure, path: Path) -> tuple[int, int]:
    """Saves ``fig`` as PNG atomically; returns its (width, height) in pixels."""
    buffer = io.BytesIO()
    # bbox_inches="tight": constrained layout can leave a long y label a few pixels outside an
    # equal-aspect axes' figure; the saved image always holds every label.
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08)
    data = buffer.getvalue()
    results_schema.atomic_write(path, lambda f: f.write(data), binary=True)
    # PNG: 8-byte signature, IHDR length and type, then big-endian width and height.
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _render(payload: bytes, path: str) -> tuple[int, int]:
    """`_save` of a pickled figure, or of the figure a pickled drawing call returns (on a
    worker process)."""
    figure = pickle.loads(payload)
    return _save(figure if isinstance(figure, Figure) else figure(), Path(path))


# Figures saved in this process before a report starts worker processes: a small report is done
# before the workers would have imported their modules.
INLINE_FIGURES = 12


def report_workers() -> int:
    """Processes that draw a report's figures: ``$SSLSIM_REPORT_WORKERS``, default the cores
    this process may use (at most 8)."""
    value = os.environ.get("SSLSIM_REPORT_WORKERS", "")
    if value.strip():
        try:
            workers = int(value)
        except ValueError:
            raise ValueError(f"SSLSIM_REPORT_WORKERS: expected an integer, got {value!r}") from None
        return max(workers, 1)
    return min(usable_cores(), 8)


class _Renderer:
    """Saves figures as PNGs: the first `INLINE_FIGURES` here, the rest on ``workers``
    processes (drawing is most of a report's time, about 0.5 s a figure). `sizes` waits for
    every figure and returns their (width, height) in submission order.

    A figure may be submitted as a call that draws it (a ``functools.partial`` of a module
    function with its data): a worker then builds it too, which spares this process building
    and pickling it (setting a heatmap's ticks alone is 0.1 s).
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._jobs: list[concurrent.futures.Future | tuple[int, int]] = []

    def submit(self, fig: Figure | Callable[[], Figure], path: Path) -> int:
        payload = None
        if self._workers > 1 and len(self._jobs) >= INLINE_FIGURES:
            try:
                payload = pickle.dumps(fig)
            except (AttributeError, TypeError, pickle.PicklingError):
                payload = None  # e.g. a secondary axis with a lambda: drawn here
        if payload is None:
            self._jobs.append(_save(fig if isinstance(fig, Figure) else fig(), path))
        else:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")  # never fork a JAX process
                self._pool = concurrent.futures.ProcessPoolExecutor(self._workers, context)
            self._jobs.append(self._pool.submit(_render, payload, str(path)))
        return len(self._jobs) - 1

    def sizes(self) -> list[tuple[int, int]]:
        try:
            return [
                j.result() if isinstance(j, concurrent.futures.Future) else j for j in self._jobs
            ]
        finally:
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _slug(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-.") or "x" for p in parts)


class _Figure(NamedTuple):
    file: str
    caption: str
    width: int


def _model_pairs(results: Results, metric: str) -> list[tuple[str, str]]:
    """Ordered pairs to draw: all for x-centric metrics, a ≤ b (run.json order) otherwise."""
    rows = results.similarities[results.similarities.metric == metric]
    present = set(zip(rows.model_a, rows.model_b, strict=True))
    rank = {m: i for i, m in enumerate(results.models)}
    pairs = sorted(present, key=lambda p: (rank[p[0]], rank[p[1]]))
    if not _info(metric).x_centric:
        pairs = [(a, b) for a, b in pairs if rank[a] <= rank[b] or (b, a) not in present]
    return pairs


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.3f}"


def _matrix_table(
    table: pd.DataFrame, metric: str, model_a: str, model_b: str, *, has_ci: bool
) -> str:
    rows = table[(table.metric == metric) & (table.model_a == model_a) & (table.model_b == model_b)]
    matrix, la, lb = _pair_matrix(rows, metric=metric, model_a=model_a, model_b=model_b)
    ci = {}
    if has_ci:
        for r in rows.itertuples(index=False):
            ci[(r.layer_a, r.layer_b)] = (r.ci_low, r.ci_high)
    head = "".join(f"<th>{_esc(b)}</th>" for b in lb)
    out = [
        f'<table class="matrix"><thead><tr><th class="corner">{_esc(model_a)} ↓ / '
        f"{_esc(model_b)} →</th>{head}</tr></thead><tbody>"
    ]
    for i, a in enumerate(la):
        cells = []
        for j, b in enumerate(lb):
            low, high = ci.get((a, b), (np.nan, np.nan))
            title = (
                f' title="95% CI [{_fmt(low)}, {_fmt(high)}]"'
                if np.isfinite(low) and np.isfinite(high)
                else ""
            )
            cells.append(f"<td{title}>{_fmt(matrix[i, j])}</td>")
        out.append(f"<tr><th>{_esc(a)}</th>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(items: dict[str, Any]) -> str:
    if not items:
        return "<p><em>none recorded</em></p>"
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td><code>{_esc(json.dumps(v) if not isinstance(v, str) else v)}"
        f"</code></td></tr>"
        for k, v in items.items()
    )
    return f'<table class="kv">{rows}</table>'


def _provenance(results: Results) -> str:
    run = results.run
    cols = ("name", "path", "config_hash", "num_layers", "model_type", "ctc_head")
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td><code>{_esc(m.get(c, ''))}</code></td>" for c in cols) + "</tr>"
        for m in run["models"]
    )
    utterances = run.get("utterances", [])
    seconds = sum(float(u.get("duration", 0.0)) for u in utterances if isinstance(u, dict))
    frames = "unknown" if results.frames is None else f"{results.frames:,}"
    pairs = ", ".join(f"{_esc(a)} → {_esc(b)}" for a, b in results.finetune_pairs) or "none"
    utt_rows = "".join(
        f"<tr><td><code>{_esc(u.get('path', ''))}</code></td><td>{_esc(u.get('duration', ''))}"
        f"</td><td>{_esc(u.get('frames', ''))}</td></tr>"
        for u in utterances[:500]
        if isinstance(u, dict)
    )
    more = f"<p>… and {len(utterances) - 500} more.</p>" if len(utterances) > 500 else ""
    return (
        f'<h2 id="provenance">Provenance</h2>'
        f'<table class="models"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f"<p>Fine-tune pairs (pre-trained → fine-tuned): {pairs}</p>"
        f"<p><strong>{len(utterances)}</strong> utterances, {seconds:.1f} s of audio, "
        f"<strong>{frames}</strong> valid frames pooled over all utterances.</p>"
        f"<details><summary>Utterances</summary><table><thead><tr><th>path</th>"
        f"<th>duration (s)</th><th>frames</th></tr></thead><tbody>{utt_rows}</tbody></table>"
        f"{more}</details>"
        f"<h3>Settings</h3>{_kv_table(run.get('settings', {}))}"
        f"<h3>Versions</h3>{_kv_table(run.get('versions', {}))}"
    )


def _figure_html(fig: _Figure) -> str:
    return (
        f'<figure style="width: {fig.width}px"><a href="{quote(fig.file)}">'
        f'<img src="{quote(fig.file)}" alt="{_esc(fig.caption)}" loading="lazy"></a>'
        f"<figcaption>{_esc(fig.caption)}</figcaption></figure>"
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
table.matrix td { text-align: right; font-variant-numeric: tabular-nums; }
table.matrix th { background: #f4f4f4; } table.matrix th.corner { font-weight: normal; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 100%; } figure img { width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #444; }
details { margin: 0.5em 0; } summary { cursor: pointer; }
code { font-size: 0.95em; word-break: break-all; }
nav a { margin-right: 1em; }
"""


def build_report(out_dir: str | os.PathLike[str], *, workers: int | None = None) -> str:
    """Draws every figure and writes ``report.html`` for a run's output directory.

    Writes PNGs under ``out_dir/figures/``: one heatmap per metric and model pair (every
    ordered pair for x-centric metrics, each unordered pair once for symmetric ones; within-model
    pairs included), one fine-tune plot per ``finetune_pairs`` entry of ``run.json``, and, when
    ``attention_heads.csv`` exists, one same-layer head grid per method and pair of different
    models. Then writes ``out_dir/report.html``: provenance, figures with captions and per
    metric the layer × layer tables, linking the figures relatively. Every file is written
    atomically (temporary file in the same directory, then ``os.replace``).

    Args:
      out_dir: the run's output directory.
      workers: processes that draw the figures (default `report_workers`: the usable cores,
        at most 8; 1 draws them all in this process).

    Returns:
      The path of ``report.html``.

    Raises:
      ResultsError: the result files are missing or invalid (see `read_results`).
    """
    results = read_results(out_dir)
    out = results.out_dir
    fig_dir = out / results_schema.FIGURES
    fig_dir.mkdir(exist_ok=True)
    sim = results.similarities
    frames = results.frames
    sections = []

    used: set[str] = set()
    renderer = _Renderer(report_workers() if workers is None else workers)
    placed: list[tuple[str, str]] = []  # (file, caption) of each figure, in submission order

    def emit(fig: Figure | Callable[[], Figure], name: str, caption: str) -> str:
        """Saves ``fig`` (or the figure a drawing call returns; maybe on a worker) and returns
        a placeholder for its HTML, filled in once its width is known."""
        # Model names that differ only in characters _slug replaces must not share a file.
        stem, k = name.removesuffix(".png"), 1
        while name in used:
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        index = renderer.submit(fig, fig_dir / name)
        placed.append((f"figures/{name}", caption))
        return f"\x00figure {index}\x00"

    if results.finetune_pairs:
        parts = ['<h2 id="finetune">Pre-trained vs fine-tuned</h2><div class="figures">']
        for pre, ft in results.finetune_pairs:
            try:
                fig = finetune_plot(sim, pretrained=pre, finetuned=ft, frames=frames)
            except ValueError as e:
                parts.append(f"<p>{_esc(pre)} vs {_esc(ft)}: {_esc(e)}</p>")
                continue
            caption = (
                f"Similarity of {pre}:i with {ft}:i for each layer i, one line per metric "
                f"(x-centric metrics: pre-trained in terms of fine-tuned)"
                + ("; shaded bands are bootstrap confidence intervals." if results.has_ci else ".")
            )
            parts.append(emit(fig, f"finetune_{_slug(pre, ft)}.png", caption))
        parts.append("</div>")
        sections.append("".join(parts))

    metrics = list(dict.fromkeys(sim.metric))
    nav = []
    for metric in metrics:
        info = _info(metric)
        anchor = f"metric-{_slug(metric)}"
        nav.append(f'<a href="#{anchor}">{_esc(metric)}</a>')
        relation = (
            "Not symmetric: a cell is the row network described in terms of the column network."
            if info.x_centric
            else "Symmetric: only one order of each model pair is drawn."
        )
        # The paper's figure leads: every network of every model in one grid.
        rows = sim[sim.metric == metric]
        present = set(rows.model_a) | set(rows.model_b)
        order = [m for m in results.models if m in present]  # run.json order
        grid = figures.network_grid(sim, metric, models=order, frames=frames)
        grid_caption = (
            f"{info.label} of every network (model:layer) with every other, intra- and "
            f"inter-model; model blocks outlined; {info.direction}."
        )
        parts = [
            f'<h2 id="{anchor}">{_esc(info.label)} (<code>{_esc(metric)}</code>)</h2>'
            f"<p>{_esc(info.direction.capitalize())}. {_esc(relation)}</p>"
            + emit(grid, f"grid_{_slug(metric)}.png", grid_caption)
            + "<details><summary>Per model pair</summary>"
            '<div class="figures">'
        ]
        tables = []
        # Each model pair's rows, split once (the paper's grid has 150,000 rows a metric).
        by_pair = dict(tuple(rows.groupby(["model_a", "model_b"], sort=False)))
        for a, b in _model_pairs(results, metric):
            pair = by_pair.get((a, b), rows.iloc[:0])
            caption = (
                f"{info.label} between the layers of {a} (rows) and {b} (columns)"
                + (", row in terms of column" if info.x_centric else "")
                + f"; {info.direction}."
            )
            draw = functools.partial(
                heatmap, pair, metric=metric, model_a=a, model_b=b, frames=frames
            )
            parts.append(emit(draw, f"heatmap_{_slug(metric, a, b)}.png", caption))
            tables.append(
                f"<details><summary>Table: {_esc(a)} (rows) vs {_esc(b)} (columns)</summary>"
                f"{_matrix_table(pair, metric, a, b, has_ci=results.has_ci)}</details>"
            )
        parts.append("</div></details>")
        if results.has_ci:
            tables.insert(0, "<p>Hover a cell for its bootstrap confidence interval.</p>")
        parts.extend(tables)
        sections.append("".join(parts))

    if results.localization is not None or results.topk is not None:
        parts = [
            '<h2 id="neurons-vs-subspaces">Neurons or subspaces? (Wu et al.)</h2>'
            '<div class="figures">'
        ]
        if results.localization is not None:
            caption = (
                "Localization score by layer: z(mean max correlation with the other networks) "
                "− z(mean SVCCA with them). Positive: the information sits in single neurons "
                "more than the run's average; negative: it is distributed over a subspace."
            )
            fig = figures.localization_plot(results.localization)
            parts.append(emit(fig, "localization.png", caption))
        if results.topk is not None and len(results.topk):
            pool = results.run.get("settings", {}).get("neuron_pool", "networks")
            caption = (
                "Top-k similarity against k: the mean of each network's top fraction k of its "
                "per-neuron (maxcorr, linreg) or per-direction (SVCCA, PWCCA) scores, averaged "
                "over its partners; k = 1 is the metric itself. Flat curves: the similarity is "
                "spread over many neurons; steep ones: a few neurons carry it."
            )
            fig = figures.topk_plot(results.topk, pool=pool)
            parts.append(emit(fig, "topk.png", caption))
        parts.append("</div>")
        sections.append("".join(parts))

    if results.attention_heads is not None:
        heads = results.attention_heads
        parts = ['<h2 id="heads">Attention heads</h2><div class="figures">']
        cross = heads[(heads.model_a != heads.model_b) & (heads.layer_a == heads.layer_b)]
        rank = {m: i for i, m in enumerate(results.models)}
        keys = sorted(
            set(zip(cross.method, cross.model_a, cross.model_b, strict=True)),
            key=lambda k: (k[0], rank[k[1]], rank[k[2]]),
        )
        for method, a, b in keys:
            fig = attention_head_grid(heads, model_a=a, model_b=b, method=method, frames=frames)
            info = _head_info(method)
            caption = (
                f"Attention map similarity ({info.label}) of every head of {a} (rows) with "
                f"every head of {b} (columns), "
                f"same-numbered layers; {info.direction}."
            )
            parts.append(emit(fig, f"heads_{_slug(method, a, b)}.png", caption))
        if not keys:
            parts.append("<p>No cross-model same-layer head pairs in attention_heads.csv.</p>")
        parts.append(
            '</div><p>All head pairs: <a href="attention_heads.csv">attention_heads.csv</a>.</p>'
        )
        sections.append("".join(parts))

    if results.neurons is not None:
        sections.append(_neuron_section(results))

    title = "sslsim report: " + ", ".join(results.models)
    body = (
        f"<h1>{_esc(title)}</h1>"
        f"<p>Layer 0 is the transformer input, layer i the output of block i, "
        f"<code>final</code> the final LayerNorm of pre-LN models. "
        f'Full table: <a href="similarities.csv">similarities.csv</a>.</p>'
        f'<nav><a href="#provenance">provenance</a>'
        + ('<a href="#finetune">fine-tuning</a>' if results.finetune_pairs else "")
        + "".join(nav)
        + ('<a href="#heads">attention heads</a>' if results.attention_heads is not None else "")
        + ('<a href="#neurons">neurons</a>' if results.neurons is not None else "")
        + "</nav>"
        + _provenance(results)
        + "".join(sections)
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )
    # Small figures at 3/4 size so two fit side by side; large grids (24+ layers) at full size
    # so their tick labels stay readable (the page caps them at its width).
    widths = [w if w > 1000 else round(0.75 * w) for w, _ in renderer.sizes()]
    page = re.sub(
        "\x00figure (\\d+)\x00",
        lambda m: _figure_html(_Figure(*placed[int(m[1])], widths[int(m[1])])),
        page,
    )
    path = out / results_schema.REPORT
    results_schema.atomic_write(path, lambda f: f.write(page.encode("utf-8")), binary=True)
    # Figures of an earlier run into the same directory are not this report's.
    for stale in fig_dir.glob("*.png"):
        if stale.name not in used:
            stale.unlink(missing_ok=True)
    return str(path)


def _top_matches(
    neurons: pd.DataFrame, models: Sequence[str], top: int
) -> list[tuple[str, str, pd.DataFrame]]:
    """(model a, model b, rows) for each pair of different models, in run.json order: the
    ``top`` rows of largest |correlation| (NaN last, ties in file order).

    Linear in the table's rows (22.8 million at the paper's scale), with no copy of it: one
    stable radix sort of the small pair codes groups the rows in file order, and each pair's
    ``top`` come from a partition of its magnitudes, only the candidates sorted.
    """
    codes_a = pd.Categorical(neurons.model_a, categories=models).codes
    codes_b = pd.Categorical(neurons.model_b, categories=models).codes
    cross = np.flatnonzero(codes_a != codes_b)
    if not len(cross):  # one model
        return []
    # Pair codes of 16 bits sort by radix (numpy's stable sort), wider ones by timsort.
    width = np.int16 if len(models) ** 2 < 2**15 else np.int64
    key = codes_a[cross].astype(width) * len(models) + codes_b[cross].astype(width)
    magnitude = np.abs(neurons.correlation.to_numpy()[cross])
    score = np.where(np.isnan(magnitude), np.inf, -magnitude)  # ascending = the order wanted
    grouped = np.argsort(key, kind="stable")  # each pair's rows together, in file order
    key = key[grouped]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    out = []
    for start, end in zip(starts, ends, strict=True):
        members = grouped[start:end]
        s = score[members]
        if len(s) > top:  # the candidates: every row up to the top-th score, ties included
            kth = np.partition(s, top - 1)[top - 1]
            members = members[s <= kth]
            s = s[s <= kth]
        best = members[np.argsort(s, kind="stable")[:top]]
        a, b = divmod(int(key[start]), len(models))
        out.append((models[a], models[b], neurons.iloc[cross[best]]))
    return out


def _neuron_section(results: Results, top: int = 10) -> str:
    parts = [
        '<h2 id="neurons">Neurons</h2>'
        f"<p>The {top} most correlated neuron matches of each pair of different models "
        f'(all matches: <a href="neurons.csv">neurons.csv</a>).</p>'
    ]
    for a, b, best in _top_matches(results.neurons, results.models, top):
        body = "".join(
            f"<tr><td>{_esc(r.layer_a)}</td><td>{r.neuron_a}</td><td>{_esc(r.layer_b)}</td>"
            f"<td>{r.matched_neuron_b}</td><td>{_fmt(r.correlation)}</td></tr>"
            for r in best.itertuples(index=False)
        )
        parts.append(
            f"<h3>{_esc(a)} → {_esc(b)}</h3><table><thead><tr><th>{_esc(a)} layer</th>"
            f"<th>neuron</th><th>{_esc(b)} layer</th><th>matched neuron</th>"
            f"<th>correlation</th></tr></thead><tbody>{body}</tbody></table>"
        )
    return "".join(parts)
