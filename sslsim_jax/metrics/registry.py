"""What every similarity measure is: the one place its properties live.

Each measure is a `Metric` value (netrep's "a metric is a value"): its name, the pair function
whose docstring holds the formula, its from-moments twin, its direction (x-centric or
symmetric), whether it needs each network's eigendecomposition, its bounds and its display
label. `sslsim_jax.compare`, the sharded statistics, the analysis defaults, the CLI's choices and
the report's labels all read this table; nothing else lists metric names.

Sources:
- ``"moments"``: a function of the joint second moments, so every pair comes out of one
  streaming pass (`sslsim_jax.pairwise`, `sslsim_jax.sharded`).
- ``"frames"``: needs raw frames (RBF CKA's N×N kernels), computed on a stated subsample.
- ``"attention"``: layer scores from head-pair sums of attention maps
  (`sslsim_jax.metrics.attention`).
- ``"attention_maps"``: a moments measure of attention layers, heads as neurons and (query,
  key) cells as samples (`sslsim_jax.metrics.attention_maps`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

from sslsim_jax.metrics import neuron, representation

__all__ = [
    "ATTENTION_METHODS",
    "HEAD_METHODS",
    "MAP_METHODS",
    "DEFAULT_METRICS",
    "LAYER_METRICS",
    "METRICS",
    "Metric",
    "check_names",
    "get",
    "names",
]

SOURCES = ("moments", "frames", "attention", "attention_maps")


@dataclasses.dataclass(frozen=True)
class Metric:
    """One similarity measure.

    Attributes:
        name: the name used in tables, ``--metrics`` and the API.
        label: human-readable name for figures.
        source: ``"moments"``, ``"frames"``, ``"attention"`` or ``"attention_maps"`` (module
            docstring).
        x_centric: the score describes network a *in terms of* b (not symmetric).
        spectral: needs each network's eigendecomposition (`kernels.spectra`).
        low: fixed lower bound of the values, or None when unbounded below (colour ranges
            then follow the data).
        high: upper bound of the values.
        higher_is_similar: False for distances (drawn with the reversed colour map).
        default: computed when the user names no metric.
        topk: has Wu et al.'s top-k variant (per-neuron or per-direction scores).
        pair: the public pair function on activations, ``f(x, y, *, where=None) -> []``.
        from_moments: its twin on the joint `sslsim_jax.stats.Moments` of (x, y).
    """

    name: str
    label: str
    source: str
    x_centric: bool
    spectral: bool = False
    low: float | None = 0.0
    high: float = 1.0
    higher_is_similar: bool = True
    default: bool = False
    topk: bool = False
    pair: Callable | None = dataclasses.field(default=None, repr=False, compare=False)
    from_moments: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"expected source among {SOURCES}, got {self.source!r}")

    @property
    def direction(self) -> str:
        """How to read the value, for figure captions."""
        return "higher = more similar" if self.higher_is_similar else "lower = more similar"

    def score(self, x, y, **options):
        """The pair function's scalar score (maxcorr's `NeuronMatch` gives its ``score``)."""
        out = self.pair(x, y, **options)
        return out.score if isinstance(out, neuron.NeuronMatch) else out


def _maxcorr_score_from_moments(m):
    return neuron.maxcorr_from_moments(m).score


_ALL = (
    Metric(
        "maxcorr",
        "max correlation",
        "moments",
        x_centric=True,
        default=True,
        topk=True,
        pair=neuron.maxcorr,
        from_moments=_maxcorr_score_from_moments,
    ),
    Metric(
        "linreg",
        "linear regression √R²",
        "moments",
        x_centric=True,
        spectral=True,
        default=True,
        topk=True,
        pair=representation.linreg,
        from_moments=representation.linreg_from_moments,
    ),
    Metric(
        "svcca",
        "SVCCA",
        "moments",
        x_centric=False,
        spectral=True,
        default=True,
        topk=True,
        pair=representation.svcca,
        from_moments=representation.svcca_from_moments,
    ),
    Metric(
        "pwcca",
        "PWCCA",
        "moments",
        x_centric=True,
        spectral=True,
        default=True,
        topk=True,
        pair=representation.pwcca,
        from_moments=representation.pwcca_from_moments,
    ),
    Metric(
        "linear_cka",
        "linear CKA",
        "moments",
        x_centric=False,
        default=True,
        pair=representation.linear_cka,
        from_moments=representation.linear_cka_from_moments,
    ),
    # The unbiased HSIC estimator can be slightly negative at small N.
    Metric(
        "debiased_cka",
        "debiased CKA",
        "moments",
        x_centric=False,
        low=None,
        pair=representation.debiased_cka,
        from_moments=representation.debiased_cka_from_moments,
    ),
    Metric(
        "procrustes",
        "Procrustes distance",
        "moments",
        x_centric=False,
        low=0.0,
        high=2.0,
        higher_is_similar=False,
        pair=representation.procrustes,
        from_moments=representation.procrustes_from_moments,
    ),
    Metric("rbf_cka", "RBF CKA", "frames", x_centric=False, pair=representation.rbf_cka),
    # Layer scores from head-pair sums: mean over a's heads of the best-matching head of b.
    # 1 − mean ‖A − B‖_F is unbounded below.
    Metric("attention_fro", "attention 1 − Frobenius distance", "attention", True, low=None),
    Metric("attention_pearson", "attention Pearson r", "attention", True, low=None),
    # 1 − JS divergence (natural log) lies in [1 − ln 2, 1].
    Metric("attention_js", "attention 1 − Jensen–Shannon", "attention", True, low=1 - math.log(2)),
    # Heads as neurons, (query, key) cells as samples: layer × layer, symmetric.
    Metric("attention_linear_cka", "attention-map linear CKA", "attention_maps", False),
    Metric("attention_svcca", "attention-map SVCCA", "attention_maps", False),
)

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}


def names(source: str | None = None, **properties) -> tuple[str, ...]:
    """Names of the metrics of ``source`` (all when None) with the given property values,
    in table order, e.g. ``names("moments", spectral=True)``."""
    return tuple(
        m.name
        for m in _ALL
        if (source is None or m.source == source)
        and all(getattr(m, k) == v for k, v in properties.items())
    )


LAYER_METRICS = names("moments")
DEFAULT_METRICS = names("moments", default=True)
# ``--attention-methods``: head-pair comparisons, then moments measures of the maps.
HEAD_METHODS = tuple(n.removeprefix("attention_") for n in names("attention"))
MAP_METHODS = tuple(n.removeprefix("attention_") for n in names("attention_maps"))
ATTENTION_METHODS = HEAD_METHODS + MAP_METHODS


def get(name: str) -> Metric:
    """The `Metric` called ``name``; a ValueError listing the choices otherwise."""
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}") from None


def check_names(
    metrics: str | Iterable[str], *, allowed: Iterable[str] | None = None, argument="metrics"
) -> tuple[str, ...]:
    """``metrics`` as a tuple of distinct known names (order kept, repeats dropped).

    Raises:
        ValueError: naming ``argument``, when empty or a name is unknown or not ``allowed``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(dict.fromkeys(metrics))
    allowed = tuple(METRICS if allowed is None else allowed)
    unknown = [m for m in metrics if m not in allowed]
    if unknown:
        raise ValueError(
            f"{argument}: unknown metric(s) {', '.join(map(str, unknown))}; "
            f"choose from {', '.join(allowed)}"
        )
    if not metrics:
        raise ValueError(f"{argument}: expected at least one metric")
    return metrics
