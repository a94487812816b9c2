"""All (network, network) pairs at once, from one joint statistics pass.

`compare` stacks the K networks side by side (Z: [N, ΣD_k]), accumulates their joint
`sslsim_jax.stats.Moments` batch by batch (only the upper blocks of the symmetric co-moment are
multiplied), then computes every metric for every ordered pair with batched kernels of
`sslsim_jax.metrics.kernels`: one ``eigh`` per network (vmapped), one contraction per network
for all linreg solves, one ``svd`` per unordered pair (batched; both CCA directions and PWCCA
weights come from it), block norms for CKA. The per-pair SVD uses only as many eigen-directions
as the largest number SVCCA keeps, so its cost follows the data's effective rank; on a CPU the
CCA pairs run on the host, each at its own shape, on every core (`sslsim_jax.metrics.host`).
`pair_values` computes each per-neuron or per-direction value once for the metrics, their top-k
and the matched neurons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from sslsim_jax import stats
from sslsim_jax.metrics import host, kernels, registry
from sslsim_jax.metrics.representation import rbf_cka_matrix
from sslsim_jax.metrics.topk import check_ks, topk_matrices
from sslsim_jax.metrics.topk import check_metrics as check_topk

__all__ = ["METRICS", "compare", "compare_moments", "pair_values"]

# Measures `compare` computes: those of the joint statistics and RBF CKA on raw frames.
METRICS = registry.names("moments") + registry.names("frames")

_moments = jax.jit(stats.moments, static_argnames="sizes")
_merge = jax.jit(stats.merge)


def pair_values(
    b: kernels.Blocks,
    s: kernels.Spectra | None,
    isd: jax.Array,
    *,
    metrics: tuple[str, ...],
    width: int,
    norms: jax.Array | None = None,
    neurons: bool = False,
    topk: tuple[str, ...] = (),
    ks: tuple[float, ...] = (),
    cca: kernels.CanonicalPairs | None = None,
) -> dict[str, jax.Array]:
    """The metric matrices, matched neurons and top-k of one set of statistics, from one
    `kernels.pair_parts`: each per-neuron or per-direction value (a linreg contraction, a CCA
    SVD) is computed once for all three. Jit-compatible (keywords static except ``norms`` and
    ``cca``, the CCA pairs when already computed: `needed` says which).

    Returns:
        metric -> [Ka, K]; with ``neurons`` also "best", "matched" [Ka, P, K]; with ``topk``
        also "topk:METRIC" [Ka, K, len(ks)].
    """
    parts = kernels.pair_parts(
        b, s, isd, metrics=needed(metrics, neurons, topk), width=width, cca=cca
    )
    out = {}
    if metrics:
        out = kernels.metric_matrices(
            b, s, isd, metrics=metrics, width=width, norms=norms, parts=parts
        )
    if neurons:
        out["best"], out["matched"] = parts.best, parts.matched
    if topk:
        values = topk_matrices(b, s, isd, metrics=topk, ks=ks, width=width, parts=parts)
        out |= {f"topk:{name}": v for name, v in values.items()}
    return out


_stage2 = jax.jit(pair_values, static_argnames=("metrics", "width", "neurons", "topk", "ks"))


def needed(metrics: Sequence[str], neurons: bool, topk: Sequence[str]) -> tuple[str, ...]:
    """The metrics whose per-pair parts (`kernels.pair_parts`) `pair_values` computes."""
    return (*metrics, *topk, *(("maxcorr",) if neurons else ()))


def check_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    """The requested metrics as distinct names among `METRICS`; errors name the unknown."""
    return registry.check_names(metrics, allowed=METRICS)


def check_requests(
    metrics: Sequence[str], topk: Sequence[str], ks: Sequence[float], *, neurons: bool
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[float, ...]]:
    """The checked (metrics, topk, ks) of an all-pairs call (`compare_moments`,
    `sslsim_jax.sharded.pairwise`). ``metrics`` may be empty when top-k or matched neurons are
    asked for; "rbf_cka" is refused (it needs raw frames)."""
    metrics = check_metrics(metrics) if metrics or not (topk or neurons) else ()
    topk = check_topk(topk) if topk else ()
    ks = check_ks(ks) if topk else ()
    if "rbf_cka" in metrics:
        raise ValueError("rbf_cka needs raw activations: use compare(...)")
    return metrics, topk, ks


def is_spectral(metrics: Sequence[str]) -> bool:
    """Whether any of ``metrics`` needs the per-network eigendecompositions."""
    return any(registry.get(m).spectral for m in metrics)


def compare_moments(
    m: stats.Moments,
    names: Sequence[str],
    *,
    metrics: Sequence[str] = registry.DEFAULT_METRICS,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
    neurons: bool = False,
    topk: Sequence[str] = (),
    ks: Sequence[float] = (),
) -> dict[str, np.ndarray]:
    """Every requested metric for every ordered pair, from joint statistics.

    Args:
        m: joint `stats.Moments` of the K networks.
        names: K network names (for warnings).
        metrics: names among `METRICS` except "rbf_cka"; may be empty with ``topk`` or
            ``neurons``.
        variance, variance_rule, rtol: SVCCA/PWCCA/linreg options (see `metrics.svcca`).
        neurons: also return "best", "matched" [K, P, K] (`kernels.neuron_best`) and "valid"
            [K, P].
        topk, ks: also return Wu et al.'s top-k of these metrics (`sslsim_jax.metrics.topk`)
            at fractions ``ks`` as "topk:METRIC" [K, K, len(ks)], from the same per-neuron
            values as the metrics (nothing is computed twice).

    Returns:
        metric name -> [K, K] NumPy array, entry [a, b] = metric(network a, network b)
        (x-centric metrics: a in terms of b); and the entries ``neurons`` and ``topk`` ask for.
    """
    metrics, topk, ks = check_requests(metrics, topk, ks, neurons=neurons)
    if len(names) != len(m.sizes):
        raise ValueError(f"expected {len(m.sizes)} names, got {len(names)}")
    spectral = is_spectral((*metrics, *topk))
    b, s, isd = kernels.prepare(
        m, variance=variance, variance_rule=variance_rule, rtol=rtol, spectral=spectral
    )
    kernels.warn_degenerate(
        b.count, b.valid, b.real, b.diag, rank_sensitive=spectral, names=tuple(names)
    )
    # Each pair's SVD needs only the directions SVCCA keeps: its cost follows the data's rank.
    width = max(1, int(jnp.max(s.kept))) if spectral else 1
    parts = needed(metrics, neurons, topk)
    if spectral:
        kernels.warn_rank_capped(
            kernels.rank_counts(s), names, metrics=parts, frames=b.count, variance=variance
        )
    cca = None
    if kernels.needs_cca(parts) and host.applies(b):  # each pair at its own shape, on the host
        ia, ib, both = kernels.cca_index(b)
        cca = host.canonical_pairs(b, s, ia, ib, width=width, weights="pwcca" in parts, both=both)
    out = _stage2(
        b, s, isd, metrics=metrics, width=width, neurons=neurons, topk=topk, ks=ks, cca=cca
    )
    if neurons:
        out["valid"] = b.valid
    return {k: np.asarray(v) for k, v in out.items()}


def _batches(networks, where):
    if isinstance(networks, Mapping):
        yield networks, where
        return
    if where is not None:
        raise ValueError("with streamed batches, pass (mapping, where) pairs instead of where=")
    for item in networks:
        if isinstance(item, Mapping):
            yield item, None
        else:
            mapping, mask = item
            yield mapping, mask


def compare(
    networks: Mapping[str, jax.Array] | Iterable[Mapping[str, jax.Array]],
    *,
    metrics: Sequence[str] = registry.DEFAULT_METRICS,
    where: jax.Array | None = None,
    variance: float = 0.99,
    variance_rule: str = "below",
    rtol: float | None = None,
    rbf_max_frames: int = 4096,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare every network with every other network (and itself).

    Args:
        networks: mapping name -> [N, D_name] activations of the same N frames; or an iterable
            of such mappings (batches of frames, streamed: only the joint statistics are kept),
            whose items may also be ``(mapping, where)`` pairs.
        metrics: names among `METRICS` (default: maxcorr, linreg, svcca, pwcca, linear_cka).
            "rbf_cka" needs a single mapping (it uses raw frames, see `metrics.rbf_cka`).
        where: optional [N] frame mask or frequency weights of a single mapping.
        variance, variance_rule, rtol: SVCCA/PWCCA/linreg options (see `metrics.svcca`).
        rbf_max_frames, seed: frame subsample of rbf_cka.

    Returns:
        DataFrame with columns network_a, network_b, metric, value: one row per ordered pair
        (a, b), a == b included, for each metric; x-centric metrics (maxcorr, linreg, pwcca)
        give a's score in terms of b, symmetric ones are listed in both orders.
    """
    metrics = check_metrics(metrics)
    names: list[str] | None = None
    m = None
    single = isinstance(networks, Mapping)
    for mapping, mask in _batches(networks, where):
        if names is None:
            names = list(mapping)
            if not names:
                raise ValueError("expected at least one network")
        elif list(mapping) != names:
            raise ValueError(f"expected the networks {names} in every batch, got {list(mapping)}")
        arrays = [jnp.asarray(mapping[n]) for n in names]
        for n, x in zip(names, arrays, strict=True):
            if x.ndim != 2 or x.shape[0] != arrays[0].shape[0]:
                raise ValueError(
                    f"expected {n} of shape [N, D] with N={arrays[0].shape[0]}, got {x.shape}"
                )
        sizes = tuple(x.shape[1] for x in arrays)
        if m is not None and sizes != m.sizes:
            raise ValueError(f"expected network widths {m.sizes}, got {sizes}")
        dtype = jnp.result_type(*arrays)
        z = jnp.concatenate([x.astype(dtype) for x in arrays], axis=1)  # [N, ΣD]
        batch = _moments(z, where=mask, sizes=sizes)
        m = batch if m is None else _merge(m, batch)
    if m is None:
        raise ValueError("expected at least one batch of networks")
    results = compare_moments(
        m,
        names,
        metrics=[x for x in metrics if x != "rbf_cka"] or ["linear_cka"],
        variance=variance,
        variance_rule=variance_rule,
        rtol=rtol,
    )
    if "rbf_cka" in metrics:
        if not single:
            raise ValueError("rbf_cka needs a single mapping of raw activations, not batches")
        results["rbf_cka"] = np.asarray(
            rbf_cka_matrix(
                [networks[n] for n in names], where=where, max_frames=rbf_max_frames, seed=seed
            )
        )
    k = len(names)
    a_idx, b_idx = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    frames = [
        pd.DataFrame(
            {
                "network_a": np.asarray(names, dtype=object)[a_idx.ravel()],
                "network_b": np.asarray(names, dtype=object)[b_idx.ravel()],
                "metric": metric,
                "value": results[metric].ravel().astype(np.float64),
            }
        )
        for metric in metrics
    ]
    return pd.concat(frames, ignore_index=True)
