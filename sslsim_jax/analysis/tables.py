"""Tables from the statistics: every metric of every ordered pair of networks (with bootstrap
intervals), the attention layer and head tables, matched neurons and Wu et al.'s rankings."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from sslsim_jax import analyses, results, sharded
from sslsim_jax.analysis.extract import run_mesh
from sslsim_jax.analysis.networks import ModelEntry, network_names, network_sizes
from sslsim_jax.analysis.settings import Settings
from sslsim_jax.analysis.state import State, stacked_maps
from sslsim_jax.metrics import attention as attn
from sslsim_jax.metrics import registry
from sslsim_jax.metrics.representation import rbf_cka_matrix
from sslsim_jax.metrics.topk import DEFAULT_KS
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
    """``(moments, names, metrics=..., neurons=..., topk=..., ks=...) -> {name: array}`` for
    the statistics `extract` returns: `compare_moments`, or `sharded.pairwise` when they are
    split over devices (``settings.stat_shards`` > 1)."""
    if settings.stat_shards == 1:
        return functools.partial(compare_moments, variance=settings.svcca_variance)
    layout = sharded.Layout(network_sizes(entries), settings.stat_shards)
    mesh = run_mesh(settings)
    return lambda m, names, **kwargs: sharded.pairwise(
        m, layout, mesh, names, variance=settings.svcca_variance, **kwargs
    )


def moment_metrics(settings: Settings) -> tuple[str, ...]:
    """The run's metrics that come from the joint statistics (rbf_cka does not)."""
    return tuple(m for m in settings.metrics if registry.get(m).source == "moments")


def pair_values(state: State, entries: Sequence[ModelEntry], settings: Settings) -> dict:
    """Everything the tables read from a pass's joint statistics, in one call: the metric
    matrices, the matched neurons ("best", "matched", "valid") and the top-k ("topk:METRIC")
    of the metrics that have one. Each per-neuron and per-direction value (linreg's
    contractions, the CCA SVDs) is computed once for all three."""
    metrics = moment_metrics(settings)
    topk = tuple(m for m in metrics if registry.get(m).topk)
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        return pairwise_fn(entries, settings)(
            state.moments,
            network_names(entries),
            metrics=metrics,
            neurons=True,
            topk=topk,
            ks=DEFAULT_KS if topk else (),
        )


def similarity_table(
    state: State,
    entries: Sequence[ModelEntry],
    settings: Settings,
    *,
    progress: bool = True,
    values: dict | None = None,
) -> pd.DataFrame:
    """The tidy table of every layer metric for every ordered pair of networks (with CIs).

    ``values``: the pass's `pair_values`, when already computed (else the metrics are).
    """
    pairwise = pairwise_fn(entries, settings)
    from tqdm.auto import tqdm

    names = network_names(entries)
    # Metrics of the joint statistics; rbf_cka comes from the kept frame subsample.
    metrics = moment_metrics(settings)
    bar = tqdm(
        total=1 + settings.bootstrap,
        desc=f"metrics ({len(names)} networks, {len(settings.metrics)} metrics)",
        unit="pass",
        disable=not progress,
    )
    values = {m: values[m] for m in metrics} if values is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        if metrics and not values:
            values = pairwise(state.moments, names, metrics=metrics)
        if state.rbf is not None:
            values["rbf_cka"] = rbf_matrix(state, entries)
    bar.update()
    replicates = _replicate_values(
        lambda m_r: pairwise(m_r, names, metrics=metrics),
        state.replicates,
        range(settings.bootstrap if metrics else 0),
        metrics,
        len(names) ** 2,
        tick=bar.update,
    )
    bar.close()
    frames = []
    for metric in settings.metrics:
        frame = _pair_rows(names, names, values[metric], metric)
        if settings.bootstrap:
            # rbf_cka has no interval: its frame subsample has no per-utterance weights.
            _add_interval(frame, replicates.get(metric) or [np.full(frame.shape[0], np.nan)])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _replicate_values(
    values_of: Callable[[Any], dict],
    stacked: Any,
    indices: Iterable[int],
    metrics: Sequence[str],
    cells: int,
    *,
    tick: Callable[[], object] = lambda: None,
) -> dict[str, list[np.ndarray]]:
    """Each metric's flattened values on replicate r of ``stacked`` statistics (leading axis),
    for r in ``indices``. A replicate that drew fewer than 2 frames (every utterance weighted 0)
    has no values: NaN in its ``cells`` entries; the interval comes from the other replicates.
    ``tick`` is called after each replicate (a progress bar)."""
    out = {m: [] for m in metrics}
    for r in indices:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported once, on the full data
            try:
                values_r = values_of(jax.tree.map(lambda a, r=r: a[r], stacked))
            except ValueError:
                values_r = {m: np.full(cells, np.nan) for m in metrics}
        for m in metrics:
            out[m].append(np.asarray(values_r[m]).ravel())
        tick()
    return out


def _add_interval(frame: pd.DataFrame, replicates) -> None:
    """``ci_low``, ``ci_high``: the 2.5 and 97.5 percentiles of each row's replicate values
    (``replicates`` [R, rows]; NaN replicates left out, NaN where all are)."""
    values = np.stack(replicates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        frame["ci_low"] = np.nanpercentile(values, 2.5, axis=0)
        frame["ci_high"] = np.nanpercentile(values, 97.5, axis=0)


def rbf_matrix(state: State, entries: Sequence[ModelEntry]) -> np.ndarray:
    """[K, K] RBF CKA of every pair of networks on the run's frame subsample (`rbf_plan`)."""
    rows = state.rbf[: state.rbf_filled]
    bounds = np.cumsum([0, *network_sizes(entries)])
    networks = [rows[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return np.asarray(rbf_cka_matrix(networks, max_frames=len(rows)))


def attention_layer_names(entry: ModelEntry) -> list[str]:
    # Attention of block i is labelled with layer i (its output), 1-based.
    return [f"{entry.name}:{i + 1}" for i in range(entry.model.config.num_hidden_layers)]


def attention_map_rows(
    state: State, entries: Sequence[ModelEntry], settings: Settings
) -> list[pd.DataFrame]:
    """``attention_linear_cka`` / ``attention_svcca`` rows: every attention layer of every
    model against every other, heads as neurons and valid (query, key) cells as samples.

    Statistics stacked with their bootstrap replicates ([1 + R, ...], `state.init_state`)
    give the rows ``ci_low``/``ci_high``."""
    if state.attention_maps is None:
        return []
    names = [n for e in entries for n in attention_layer_names(e)]
    methods = [m for m in settings.attention_methods if m in registry.MAP_METHODS]
    stacked = state.attention_maps
    if not stacked_maps(state):
        stacked = jax.tree.map(lambda a: a[None], stacked)
    compare = functools.partial(
        compare_moments, names=names, metrics=methods, variance=settings.svcca_variance
    )
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        values = compare(jax.tree.map(lambda a: a[0], stacked))
    replicates = _replicate_values(
        compare, stacked, range(1, stacked.count.shape[0]), methods, len(names) ** 2
    )
    frames = []
    for m in methods:
        frame = _pair_rows(names, names, values[m], f"attention_{m}")
        if replicates[m]:
            _add_interval(frame, replicates[m])
        frames.append(frame)
    return frames


def topk_rows(
    state: State, entries: Sequence[ModelEntry], settings: Settings, values: dict | None = None
) -> pd.DataFrame:
    """Wu et al.'s top-k (``topk.csv``) of the run's metrics that have one, k = 0.1, …, 1.0,
    from the same statistics as the similarity table (no further pass over the audio).

    ``values``: the pass's `pair_values`, when already computed.
    """
    metrics = tuple(m for m in settings.metrics if registry.get(m).topk)
    if not metrics:
        return pd.DataFrame(columns=results.TOPK_COLUMNS)
    names = network_names(entries)
    if values is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported with the similarity table
            values = pairwise_fn(entries, settings)(
                state.moments, names, metrics=(), topk=metrics, ks=DEFAULT_KS
            )
    networks = [tuple(n.rsplit(":", 1)) for n in names]
    return analyses.topk_table({m: values[f"topk:{m}"] for m in metrics}, networks, DEFAULT_KS)


def localization_rows(table: pd.DataFrame, settings: Settings) -> pd.DataFrame | None:
    """Wu et al.'s localization score per network (``localization.csv``), when the run has
    both maxcorr and svcca; None otherwise."""
    if not {"maxcorr", "svcca"} <= set(settings.metrics):
        return None
    return analyses.localization(table, pool=settings.neuron_pool)


def attention_tables(
    state: State, entries: Sequence[ModelEntry]
) -> tuple[list[pd.DataFrame], pd.DataFrame | None]:
    """Layer-level attention rows (metric ``attention_<method>``) and the head-level table.

    Head states stacked with their bootstrap replicates ([1 + R, ...], `state.init_state`)
    give the layer rows ``ci_low``/``ci_high``; the head table holds the full data's values.
    """
    by_name = {e.name: e for e in entries}
    layer_rows, head_rows = [], []
    for (a, b, method), s in state.heads.items():
        sims = np.asarray(attn.finalize(s))  # [La*Ha, Lb*Hb] or [1 + R, La*Ha, Lb*Hb]
        counted = np.asarray(s.count) > 0
        if sims.ndim == 2:
            sims, counted = sims[None], counted[None]
        for x, y, stack in (
            ((a, b, sims), (b, a, sims.swapaxes(1, 2))) if a != b else ((a, b, sims),)
        ):
            cx, cy = by_name[x].model.config, by_name[y].model.config
            split = np.stack(
                [
                    attn.split_layers(jnp.asarray(m), cx.num_hidden_layers, cy.num_hidden_layers)
                    for m in stack
                ]
            )  # [1 + R, Lx, Ly, Hx, Hy]
            scores = np.asarray(attn.layer_score(jnp.asarray(split))[0])  # [1 + R, Lx, Ly]
            names_x = attention_layer_names(by_name[x])
            names_y = attention_layer_names(by_name[y])
            metric = f"attention_{method}"
            frame = _pair_rows(names_x, names_y, scores[0], metric)
            if len(scores) > 1:  # a replicate that drew no utterance has no value
                reps = np.where(counted[1:, None, None], scores[1:], np.nan)
                _add_interval(frame, list(reps.reshape(len(reps), -1)))
            layer_rows.append(frame)
            split = split[0]
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


@dataclasses.dataclass
class NeuronMatches:
    """Every neuron's best match in every network of a run, as arrays: what ``neurons.csv``
    and ``neuron_rankings.csv`` are written from (tens of millions of rows at the paper's
    scale, never held as a table by `analyze`).

    Attributes:
        names: the ``"model:layer"`` networks, in column order.
        sizes: their widths.
        best: [K, P, K] float32, |r| of neuron i of network a with its best match in network b
            (NaN for a constant neuron or an all-constant network, and on padding rows
            i ≥ sizes[a]).
        matched: [K, P, K] int32, that neuron of b.
    """

    names: list[str]
    sizes: tuple[int, ...]
    best: np.ndarray
    matched: np.ndarray

    @classmethod
    def empty(cls, names: Sequence[str], sizes: Sequence[int]) -> NeuronMatches:
        k, p = len(names), max(sizes)
        return cls(
            list(names),
            tuple(int(d) for d in sizes),
            np.full((k, p, k), np.nan, np.float32),
            np.zeros((k, p, k), np.int32),
        )

    def fill(self, values: dict, networks: Sequence[int], owns: np.ndarray | None = None) -> None:
        """Copies a pass's matches (`pair_values`' "best", "matched" over ``networks``, global
        indices) into the run's arrays; ``owns`` [k, k]: the pairs the pass owns (all)."""
        g = np.asarray(networks)
        best, matched = np.asarray(values["best"]), np.asarray(values["matched"])
        p = best.shape[1]
        owned = np.ones((len(g), len(g)), bool) if owns is None else np.asarray(owns)
        for x, y in zip(*np.nonzero(owned), strict=True):
            self.best[g[x], :p, g[y]] = best[x, :, y]
            self.matched[g[x], :p, g[y]] = matched[x, :, y]

    def frame(self) -> pd.DataFrame:
        """The ``neurons.csv`` rows: network a, then neuron a, then network b."""
        k = len(self.names)
        sizes = np.asarray(self.sizes)
        split = [n.rsplit(":", 1) for n in self.names]
        model = np.array([m for m, _ in split], dtype=object)
        layer = np.array([x for _, x in split], dtype=object)
        a = np.repeat(np.arange(k), sizes * k)  # every row's network a
        b = np.tile(np.arange(k), int(sizes.sum()))
        neuron = np.concatenate([np.repeat(np.arange(d), k) for d in self.sizes])
        keep = (np.arange(self.best.shape[1])[None, :] < sizes[:, None]).ravel()  # [K*P]
        return pd.DataFrame(
            {
                "model_a": model[a],
                "layer_a": layer[a],
                "neuron_a": neuron,
                "model_b": model[b],
                "layer_b": layer[b],
                "matched_neuron_b": self.matched.reshape(-1, k)[keep].ravel().astype(np.int64),
                "correlation": self.best.reshape(-1, k)[keep].ravel().astype(np.float64),
            }
        )

    def rankings(self, pool: str = "networks") -> pd.DataFrame:
        """Wu et al.'s neuron rankings (``neuron_rankings.csv``).

        A neuron's MaxCorr is its highest best-|r| over the networks of ``pool`` (every other
        network, or other models' networks), MinCorr its lowest; ranks are 1 = highest within
        its network, constant neurons last. A neuron is constant when it has no correlation
        even with its own network.
        """
        model = [n.rsplit(":", 1)[0] for n in self.names]
        frames = []
        for a, name in enumerate(self.names):
            if pool == "models":
                others = [b for b in range(len(model)) if model[b] != model[a]]
            else:
                others = [b for b in range(len(model)) if b != a]
            if not others:
                continue  # nothing to rank against
            d = self.sizes[a]
            block = self.best[a, :d][:, others].astype(np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neurons stay NaN
                mx, mn = np.nanmax(block, axis=1), np.nanmin(block, axis=1)
            ok = ~np.isnan(self.best[a, :d, a])
            frames.append(
                pd.DataFrame(
                    {
                        "model": model[a],
                        "layer": name.rsplit(":", 1)[1],
                        "neuron": np.arange(d),
                        "maxcorr": np.where(ok, mx, np.nan),
                        "mincorr": np.where(ok, mn, np.nan),
                        "maxcorr_rank": _rank(np.where(ok, -mx, np.inf)),
                        "mincorr_rank": _rank(np.where(ok, -mn, np.inf)),
                        "constant": ~ok,
                    }
                )
            )
        # One model with pool "models": nothing to rank against; the file still has its header.
        if not frames:
            return pd.DataFrame(columns=results.NEURON_RANKING_COLUMNS)
        return pd.concat(frames, ignore_index=True)

    def write(self, out_dir) -> str:
        """Writes ``neurons.csv`` (`results.write_neurons`); returns its path."""
        return results.write_neurons(out_dir, self.names, self.sizes, self.best, self.matched)


def neuron_matches(
    state: State, entries: Sequence[ModelEntry], settings: Settings, values: dict | None = None
) -> NeuronMatches:
    """The matched neurons of every pair of the statistics' networks.

    ``values``: the pass's `pair_values`, when already computed.
    """
    names, sizes = network_names(entries), network_sizes(entries)
    if values is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported with the similarity table
            values = pairwise_fn(entries, settings)(state.moments, names, metrics=(), neurons=True)
    matches = NeuronMatches.empty(names, sizes)
    matches.fill(values, range(len(names)))
    return matches


def neuron_tables(
    state: State, entries: Sequence[ModelEntry], settings: Settings | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Matched neurons of every network pair (the ``neurons.csv`` rows: for every neuron of
    every network and every network, the best matching neuron and its |r|, NaN for a constant
    neuron or an all-constant network), and Wu et al.'s MaxCorr/MinCorr neuron rankings."""
    settings = settings or Settings()
    matches = neuron_matches(state, entries, settings)
    return matches.frame(), matches.rankings(settings.neuron_pool)


def _rank(key: np.ndarray) -> np.ndarray:
    order = np.argsort(key, kind="stable")
    ranks = np.empty(len(key), np.int64)
    ranks[order] = np.arange(1, len(key) + 1)
    return ranks
