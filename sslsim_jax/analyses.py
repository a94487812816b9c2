"""The paper's analyses on top of the similarity tables: localization and top-k rows.

Both El Kheir et al. (2024) and Wu et al. (2020) ask whether what two networks share sits in
a few neurons (*localized*) or is spread over directions of the representation
(*distributed*). Wu et al.'s score contrasts the two per network: a network whose neurons find
close partners elsewhere (high maxcorr) but whose subspace is not especially shared (SVCCA) is
localized; the reverse is distributed.

Inputs are the tidy tables the pipeline writes (see `sslsim_jax.report`): similarities
``model_a, layer_a, model_b, layer_b, metric, value`` with both orders of every pair and the
a == b rows present.

References:
    Wu, Belinkov, Sajjad, Durrani, Dalvi, Glass. Similarity analysis of contextual word
    representation models. ACL 2020 (localization vs distributivity; the score of their notebooks
    ``analysis/analysis-8.ipynb`` uses pandas' sample standard deviation).
    El Kheir, Ali, Chowdhury. Speech representation analysis based on inter- and intra-model
    similarities. ICASSP 2024 XAISA workshop (arXiv 2406.16099).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from sslsim_jax.analysis.settings import POOLS
from sslsim_jax.results import LOCALIZATION_COLUMNS, TOPK_COLUMNS, layer_key

__all__ = [
    "LOCALIZATION_COLUMNS",
    "LocalizationWarning",
    "POOLS",
    "TOPK_COLUMNS",
    "best_matches",
    "localization",
    "topk_table",
]

SIMILARITY_KEY = ("model_a", "layer_a", "model_b", "layer_b", "metric")


class LocalizationWarning(UserWarning):
    """The localization score is undefined (NaN) for this table; the message says why."""


def _networks(table: pd.DataFrame) -> list[tuple[str, str]]:
    """Distinct (model, layer) of both sides: models in order of appearance, layers in order."""
    pairs = pd.concat(
        [
            table[["model_a", "layer_a"]].set_axis(["model", "layer"], axis=1),
            table[["model_b", "layer_b"]].set_axis(["model", "layer"], axis=1),
        ]
    ).drop_duplicates()
    models = list(dict.fromkeys(pairs["model"]))
    return sorted(
        zip(pairs["model"], pairs["layer"], strict=True),
        key=lambda ml: (models.index(ml[0]), layer_key(str(ml[1]))),
    )


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in (*SIMILARITY_KEY, "value") if c not in table.columns]
    if missing:
        raise ValueError(
            f"expected table with columns {(*SIMILARITY_KEY, 'value')}, missing {missing}"
        )


def _metric_matrix(
    table: pd.DataFrame, metric: str, networks: list[tuple[str, str]], pool: str
) -> np.ndarray:
    """[K, K] values of one metric (row network in terms of column network), checked complete."""
    rows = table[table["metric"] == metric]
    if rows.empty:
        raise ValueError(f"expected rows of metric {metric!r} in table (localization needs it)")
    if rows.duplicated(list(SIMILARITY_KEY)).any():
        raise ValueError(f"expected one row per pair of metric {metric!r}, found duplicates")
    index = {net: i for i, net in enumerate(networks)}
    k = len(networks)
    out = np.full((k, k), np.nan)
    seen = np.zeros((k, k), bool)
    ia = [index[net] for net in zip(rows["model_a"], rows["layer_a"], strict=True)]
    ib = [index[net] for net in zip(rows["model_b"], rows["layer_b"], strict=True)]
    out[ia, ib] = rows["value"].to_numpy(dtype=float)
    seen[ia, ib] = True
    need = _partners(networks, pool)
    if (need & ~seen).any():
        a, b = np.argwhere(need & ~seen)[0]
        raise ValueError(
            f"expected metric {metric!r} for every pair of networks, missing "
            f"{networks[a][0]}:{networks[a][1]} vs {networks[b][0]}:{networks[b][1]} "
            f"({int((need & ~seen).sum())} pairs missing)"
        )
    return out


def _partners(networks: list[tuple[str, str]], pool: str) -> np.ndarray:
    """[K, K] bool: network b enters network a's means."""
    models = np.asarray([m for m, _ in networks], dtype=object)
    if pool == "networks":
        return ~np.eye(len(networks), dtype=bool)
    return models[:, None] != models[None, :]


def _zscore(values: np.ndarray, what: str) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        warnings.warn(
            f"localization score needs at least 2 networks with a {what} value, got "
            f"{finite.size}: score is NaN",
            LocalizationWarning,
            stacklevel=3,
        )
        return np.full_like(values, np.nan)
    sd = finite.std(ddof=1)
    if not sd > 0:
        warnings.warn(
            f"{what} is the same for every network (sample std 0): score is NaN",
            LocalizationWarning,
            stacklevel=3,
        )
        return np.full_like(values, np.nan)
    return (values - finite.mean()) / sd


def localization(table: pd.DataFrame, *, pool: str = "networks") -> pd.DataFrame:
    """Wu et al.'s localization score of every network of a run.

    For each network a: ``localized`` = mean over the pool of networks b of maxcorr(a, b) (how
    well a's neurons are matched, neuron by neuron); ``distributed`` = mean of svcca(a, b) over
    the same b (how well a's subspace is matched); ``score`` = z(localized) − z(distributed),
    z-scores across all networks of the table with the sample standard deviation (ddof = 1, as
    pandas' ``std`` in Wu et al.'s notebook). Positive: a's shared information sits in
    individual neurons more than the average network's; negative: it is distributed.

    Args:
        table: similarities, columns ``model_a, layer_a, model_b, layer_b, metric, value``,
            with maxcorr and svcca rows for every ordered pair of the pool.
        pool: ``"networks"`` (every other network of the run, other layers of the same model
            included) or ``"models"`` (only the networks of other models).

    Returns:
        DataFrame with columns ``model, layer, localized, distributed, score``, one row per
        network, models in order of first appearance, layers in network order.

    Raises:
        ValueError: a column, the maxcorr or svcca rows, or some pair of the pool is missing
            (the message names the metric); ``pool`` is unknown.

    Warns:
        LocalizationWarning: fewer than 2 networks with values, or a zero standard deviation
            (the score is then NaN, not a number that would mean something).
    """
    if pool not in POOLS:
        raise ValueError(f"expected pool in {POOLS}, got {pool!r}")
    _check_table(table)
    networks = _networks(table)
    partners = _partners(networks, pool)
    means = {}
    for metric in ("maxcorr", "svcca"):
        matrix = _metric_matrix(table, metric, networks, pool)
        count = partners.sum(axis=1)
        total = np.where(partners, matrix, 0.0).sum(axis=1)
        # A network without partners (one model with pool="models") has no mean: NaN.
        means[metric] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    localized, distributed = means["maxcorr"], means["svcca"]
    score = _zscore(localized, "localized (maxcorr)") - _zscore(distributed, "distributed (svcca)")
    return pd.DataFrame(
        {
            "model": [m for m, _ in networks],
            "layer": [layer for _, layer in networks],
            "localized": localized,
            "distributed": distributed,
            "score": score,
        },
        columns=list(LOCALIZATION_COLUMNS),
    )


def best_matches(table: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """How well each model's networks find a counterpart in each other model, per metric.

    For an ordered pair of distinct models (A, B) and a metric: the mean over A's networks a of
    the best value of a against any network of B (max over b, or min for a distance). This puts
    the paper's question in numbers: models that "share representation subspaces but not
    neuron-localised concepts" have high best matches by the subspace measures (SVCCA, PWCCA,
    CKA) and low ones by maxcorr. Values of different metrics live on different scales; compare
    a metric across model pairs, and metrics by their ranking, not their raw differences.

    Args:
        table: similarities, columns ``model_a, layer_a, model_b, layer_b, metric, value``.
        metrics: the metrics to summarise (default: every metric of the table).

    Returns:
        DataFrame with columns ``model_a, model_b, metric, best_match, networks`` (``networks``:
        how many of A's networks had a finite value), models in order of first appearance.
        A pair whose values are all NaN gets NaN, never a number.
    """
    from sslsim_jax.metrics import registry

    _check_table(table)
    metrics = list(dict.fromkeys(table["metric"])) if metrics is None else list(metrics)
    missing = [m for m in metrics if m not in set(table["metric"])]
    if missing:
        raise ValueError(f"no rows of metric(s) {missing} in the similarity table")
    models = [m for m, _ in _networks(table)]
    models = list(dict.fromkeys(models))
    rows = []
    for metric in metrics:
        part = table[(table["metric"] == metric) & (table["model_a"] != table["model_b"])]
        higher = registry.METRICS[metric].higher_is_similar if metric in registry.METRICS else True
        best = part.groupby(["model_a", "layer_a", "model_b"], sort=False)["value"]
        best = (best.max() if higher else best.min()).reset_index()
        for (a, b), group in best.groupby(["model_a", "model_b"], sort=False):
            finite = group["value"][np.isfinite(group["value"])]
            value = float(finite.mean()) if len(finite) else np.nan
            rows.append((a, b, metric, value, len(finite)))
    out = pd.DataFrame(rows, columns=["model_a", "model_b", "metric", "best_match", "networks"])
    order = {m: i for i, m in enumerate(models)}
    key = out["model_a"].map(order) * len(models) + out["model_b"].map(order)
    metric_order = out["metric"].map({m: i for i, m in enumerate(metrics)})
    return (
        out.assign(_k=metric_order * len(models) ** 2 + key)
        .sort_values("_k")
        .drop(columns="_k")
        .reset_index(drop=True)
    )


def topk_table(
    values: Mapping[str, np.ndarray],
    networks: Sequence[tuple[str, str]],
    ks: Sequence[float],
) -> pd.DataFrame:
    """Tidy rows of all-pairs top-k matrices (`sslsim_jax.metrics.topk_all_from_moments`).

    Args:
        values: metric -> [K, K, len(ks)] array; [a, b, i] = network a in terms of b at ks[i].
        networks: K (model, layer) names, in the order of the matrices.
        ks: the fractions of the last axis.

    Returns:
        DataFrame with columns ``model_a, layer_a, model_b, layer_b, metric, k, value``, ordered
        by metric, then a, b, k.
    """
    k = len(networks)
    ks = np.asarray(ks, dtype=float)
    frames = []
    for metric, array in values.items():
        array = np.asarray(array, dtype=float)
        if array.shape != (k, k, len(ks)):
            raise ValueError(
                f"expected values[{metric!r}] of shape [K, K, len(ks)] = {(k, k, len(ks))}, "
                f"got {array.shape}"
            )
        a, b, i = np.meshgrid(np.arange(k), np.arange(k), np.arange(len(ks)), indexing="ij")
        models = np.asarray([m for m, _ in networks], dtype=object)
        layers = np.asarray([str(layer) for _, layer in networks], dtype=object)
        frames.append(
            pd.DataFrame(
                {
                    "model_a": models[a.ravel()],
                    "layer_a": layers[a.ravel()],
                    "model_b": models[b.ravel()],
                    "layer_b": layers[b.ravel()],
                    "metric": metric,
                    "k": ks[i.ravel()],
                    "value": array.ravel(),
                }
            )
        )
    if not frames:
        return pd.DataFrame(columns=list(TOPK_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(TOPK_COLUMNS)]
