"""Pre-training and CTC fine-tuning of Wav2Vec2/HuBERT-style models with optax (the demo
models). See `objectives` for the losses and `loop` for the step and the driver."""

from sslsim_jax.train.loop import (
    TrainState,
    array_batches,
    fit,
    init_state,
    make_optimizer,
    make_step,
    with_frozen,
)
from sslsim_jax.train.masking import span_mask
from sslsim_jax.train.objectives import Objective, contrastive, ctc, masked_prediction
from sslsim_jax.train.targets import fit_mfcc_clusters, kmeans, mfcc, mfcc_targets
from sslsim_jax.train.text import build_vocab, character_error_rate, decode_logits, encode

__all__ = [
    "Objective",
    "TrainState",
    "array_batches",
    "build_vocab",
    "character_error_rate",
    "contrastive",
    "ctc",
    "decode_logits",
    "encode",
    "fit",
    "fit_mfcc_clusters",
    "init_state",
    "kmeans",
    "make_optimizer",
    "make_step",
    "masked_prediction",
    "mfcc",
    "mfcc_targets",
    "span_mask",
    "with_frozen",
]
