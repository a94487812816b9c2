"""Similarity metrics: pure functions of activations or of their streaming statistics.

`neuron`: Pearson correlations, `maxcorr` / `mincorr` and the Wu et al. neuron rankings.
`representation`: `linreg`, `svcca`, `pwcca`, `linear_cka`, `debiased_cka`, `rbf_cka`,
`procrustes`, each with a ``*_from_moments`` twin on `sslsim_jax.stats.Moments`.
`topk`: Wu et al.'s top-k versions of maxcorr, linreg, svcca and pwcca.
"""

from sslsim_jax.metrics.kernels import (
    ConstantNeuronWarning,
    RankCapWarning,
    RankDeficiencyWarning,
)
from sslsim_jax.metrics.neuron import (
    NeuronMatch,
    correlations,
    maxcorr,
    maxcorr_from_moments,
    mincorr,
    mincorr_from_moments,
    neuron_ranking,
)
from sslsim_jax.metrics.representation import (
    debiased_cka,
    debiased_cka_from_moments,
    linear_cka,
    linear_cka_from_moments,
    linreg,
    linreg_from_moments,
    procrustes,
    procrustes_from_moments,
    pwcca,
    pwcca_from_moments,
    rbf_cka,
    svcca,
    svcca_from_moments,
)
from sslsim_jax.metrics.topk import (
    DEFAULT_KS,
    TOPK_METRICS,
    topk,
    topk_all_from_moments,
    topk_from_moments,
    topk_matrices,
)

__all__ = [
    "DEFAULT_KS",
    "TOPK_METRICS",
    "ConstantNeuronWarning",
    "NeuronMatch",
    "RankCapWarning",
    "RankDeficiencyWarning",
    "correlations",
    "debiased_cka",
    "debiased_cka_from_moments",
    "linear_cka",
    "linear_cka_from_moments",
    "linreg",
    "linreg_from_moments",
    "maxcorr",
    "maxcorr_from_moments",
    "mincorr",
    "mincorr_from_moments",
    "neuron_ranking",
    "procrustes",
    "procrustes_from_moments",
    "pwcca",
    "pwcca_from_moments",
    "rbf_cka",
    "svcca",
    "svcca_from_moments",
    "topk",
    "topk_all_from_moments",
    "topk_from_moments",
    "topk_matrices",
]
