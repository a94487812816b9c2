"""Tables from the statistics: every metric of every ordered pair of networks (with bootstrap
intervals), the attention layer and head tables, matched neurons and Wu et al.'s rankings."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from sslsim_jax import results, sharded
from sslsim_jax.analysis.extract import run_mesh
from sslsim_jax.analysis.networks import ModelEntry, network_names, network_sizes
from sslsim_jax.analysis.settings import Settings
from sslsim_jax.analysis.state import State
from sslsim_jax.metrics import attention as attn
from sslsim_jax.pairwise import compare_moments


def _pair_rows(names_a, names_b, values: np.ndarray, metric: str) -> pd.DataFrame:
    """Tidy rows (model_a, layer_a, model_b, layer_b, metric, value) of a [Ka, Kb] matrix."""
    ia, ib = np.meshgrid(np.arange(len(names_a)), np.arange(len(names_b)), indexing="ij")
    a = [names_a[i].rsplit(":", 1) for i in ia.ravel()]
    b = [names_b[i].rsplit(":", 1) for i in ib.ravel()]
    return pd.DataFrame(
        {
            "model_a": [x[0] for x in a],
            "layer_a": [x[1] for x in a],
            "model_b": [x[0] for x in b],
            "layer_b": [x[1] for x in b],
            "metric": metric,
            "value": values.ravel().astype(np.float64),
        }
    )


def pairwise_fn(entries: Sequence[ModelEntry], settings: Settings) -> Callable[..., dict]:
    """``(moments, names, metrics=..., neurons=...) -> {metric: [K, K]}`` for the statistics
    `extract` returns: `compare_moments`, or `sharded.pairwise` when they are split over
    devices (``settings.stat_shards`` > 1)."""
    if settings.stat_shards == 1:

        def full(m, names, *, metrics, neurons=False):
            from sslsim_jax.metrics import kernels

            out = compare_moments(m, names, metrics=metrics)
            if neurons:
                b = kernels.blocks(m)
                best, matched = kernels.neuron_best(b, kernels.inv_sd(b))  # [K, P, K]
                out |= {"best": best, "matched": matched, "valid": b.valid}
            return {k: np.asarray(v) for k, v in out.items()}

        return full
    layout = sharded.Layout(network_sizes(entries), settings.stat_shards)
    mesh = run_mesh(settings)
    return lambda m, names, **kwargs: sharded.pairwise(m, layout, mesh, names, **kwargs)


def similarity_table(
    state: State, entries: Sequence[ModelEntry], settings: Settings, *, progress: bool = True
) -> pd.DataFrame:
    """The tidy table of every layer metric for every ordered pair of networks (with CIs)."""
    pairwise = pairwise_fn(entries, settings)
    from tqdm.auto import tqdm

    names = network_names(entries)
    bar = tqdm(
        total=1 + settings.bootstrap,
        desc=f"metrics ({len(names)} networks, {len(settings.metrics)} metrics)",
        unit="pass",
        disable=not progress,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        values = pairwise(state.moments, names, metrics=settings.metrics)
    bar.update()
    replicates = {metric: [] for metric in settings.metrics}
    for r in range(settings.bootstrap):
        m_r = jax.tree.map(lambda a, r=r: a[r], state.replicates)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once above, on the full data
            values_r = pairwise(m_r, names, metrics=settings.metrics)
        for metric in settings.metrics:
            replicates[metric].append(values_r[metric].ravel())
        bar.update()
    bar.close()
    frames = []
    for metric in settings.metrics:
        frame = _pair_rows(names, names, values[metric], metric)
        if settings.bootstrap:
            reps = np.stack(replicates[metric])  # [R, K*K]
            frame["ci_low"] = np.percentile(reps, 2.5, axis=0)
            frame["ci_high"] = np.percentile(reps, 97.5, axis=0)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def attention_tables(
    state: State, entries: Sequence[ModelEntry]
) -> tuple[list[pd.DataFrame], pd.DataFrame | None]:
    """Layer-level attention rows (metric ``attention_<method>``) and the head-level table."""
    by_name = {e.name: e for e in entries}
    layer_rows, head_rows = [], []
    for (a, b, method), s in state.heads.items():
        sim = np.asarray(attn.finalize(s))  # [La*Ha, Lb*Hb]
        for x, y, matrix in ((a, b, sim), (b, a, sim.T)) if a != b else ((a, b, sim),):
            cx, cy = by_name[x].model.config, by_name[y].model.config
            split = np.asarray(
                attn.split_layers(jnp.asarray(matrix), cx.num_hidden_layers, cy.num_hidden_layers)
            )  # [Lx, Ly, Hx, Hy]
            score, _ = attn.layer_score(jnp.asarray(split))
            # Attention of block i is labelled with layer i (its output), 1-based.
            names_x = [f"{x}:{i + 1}" for i in range(cx.num_hidden_layers)]
            names_y = [f"{y}:{i + 1}" for i in range(cy.num_hidden_layers)]
            metric = f"attention_{method}"
            layer_rows.append(_pair_rows(names_x, names_y, np.asarray(score), metric))
            lx, ly, hx, hy = split.shape
            idx = np.indices(split.shape).reshape(4, -1)
            head_rows.append(
                pd.DataFrame(
                    {
                        "model_a": x,
                        "layer_a": (idx[0] + 1).astype(str),
                        "head_a": idx[2],
                        "model_b": y,
                        "layer_b": (idx[1] + 1).astype(str),
                        "head_b": idx[3],
                        "method": method,
                        "value": split.reshape(-1).astype(np.float64),
                    }
                )
            )
    heads = pd.concat(head_rows, ignore_index=True) if head_rows else None
    return layer_rows, heads


def neuron_tables(
    state: State, entries: Sequence[ModelEntry], settings: Settings | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Matched neurons of every network pair, and Wu et al.'s MaxCorr/MinCorr neuron rankings.

    The rankings of a network's neurons use the networks of the *other* models: MaxCorr ranks a
    neuron by its highest best-|r| over them, MinCorr by its lowest.
    """
    names, sizes = network_names(entries), network_sizes(entries)
    pairwise = pairwise_fn(entries, settings or Settings())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported with the similarity table
        out = pairwise(state.moments, names, metrics=("linear_cka",), neurons=True)
    best, matched, valid = out["best"], out["matched"], out["valid"]  # [K, P, K], [K, P]
    pair_rows, rank_rows = [], []
    models = np.array([n.rsplit(":", 1)[0] for n in names])
    for i, name in enumerate(names):
        d = sizes[i]
        model_a, layer_a = name.rsplit(":", 1)
        for j, other in enumerate(names):
            model_b, layer_b = other.rsplit(":", 1)
            pair_rows.append(
                pd.DataFrame(
                    {
                        "model_a": model_a,
                        "layer_a": layer_a,
                        "neuron_a": np.arange(d),
                        "model_b": model_b,
                        "layer_b": layer_b,
                        "matched_neuron_b": matched[i, :d, j],
                        "correlation": best[i, :d, j].astype(np.float64),
                    }
                )
            )
        others = np.flatnonzero(models != model_a)
        if len(others):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
                mx = np.nanmax(best[i, :d][:, others], axis=1)
                mn = np.nanmin(best[i, :d][:, others], axis=1)
            ok = valid[i, :d]
            rank_rows.append(
                pd.DataFrame(
                    {
                        "model": model_a,
                        "layer": layer_a,
                        "neuron": np.arange(d),
                        "maxcorr": np.where(ok, mx, np.nan),
                        "mincorr": np.where(ok, mn, np.nan),
                        "maxcorr_rank": _rank(np.where(ok, -mx, np.inf)),
                        "mincorr_rank": _rank(np.where(ok, -mn, np.inf)),
                        "constant": ~ok,
                    }
                )
            )
    # One model: no other model to rank against; the file still has its header.
    ranks = (
        pd.concat(rank_rows, ignore_index=True)
        if rank_rows
        else pd.DataFrame(columns=results.NEURON_RANKING_COLUMNS)
    )
    return pd.concat(pair_rows, ignore_index=True), ranks


def _rank(key: np.ndarray) -> np.ndarray:
    order = np.argsort(key, kind="stable")
    ranks = np.empty(len(key), np.int64)
    ranks[order] = np.arange(1, len(key) + 1)
    return ranks
