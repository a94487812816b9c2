"""Span masking of frames, as in wav2vec 2.0 and HuBERT pre-training.

References:
    Baevski et al., *wav2vec 2.0* (NeurIPS 2020), section 3.1: "we randomly sample without
    replacement a certain proportion p of all time steps to be starting indices and then mask
    the subsequent M consecutive time steps".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def span_mask(
    key: jax.Array, frame_lengths: jax.Array, num_frames: int, *, mask_prob: float, span: int
) -> jax.Array:
    """Frames to mask: spans of ``span`` frames from ``round(mask_prob · T_b)`` start frames.

    Starts are drawn without replacement among each utterance's valid frames that leave room
    for a whole span (at least one start per utterance), so spans may overlap and the masked
    fraction is at most ``mask_prob · span``. Static shapes; usable under ``jax.jit``.

    Args:
        key: PRNG key.
        frame_lengths: [B] valid frames per utterance.
        num_frames: T, the padded frame count.
        mask_prob: proportion of valid frames that start a span (0.065 at full scale).
        span: frames per span (10 at full scale).

    Returns:
        [B, T] bool, True on masked frames (never on padded frames).
    """
    if span < 1:
        raise ValueError(f"expected span >= 1, got {span}")
    if not 0 < mask_prob <= 1:
        raise ValueError(f"expected mask_prob in (0, 1], got {mask_prob}")
    frame_lengths = jnp.asarray(frame_lengths)
    batch = frame_lengths.shape[0]
    t = jnp.arange(num_frames)[None, :]  # [1, T]
    valid = t < frame_lengths[:, None]  # [B, T]
    last_start = jnp.maximum(frame_lengths - span, 0)[:, None]
    scores = jax.random.uniform(key, (batch, num_frames))
    scores = jnp.where(t <= last_start, scores, -1.0)
    count = jnp.maximum(jnp.round(mask_prob * frame_lengths), 1).astype(jnp.int32)  # [B]
    # Rank of each frame's score within its utterance (0 = largest): the first `count` start.
    rank = jnp.argsort(jnp.argsort(-scores, axis=1), axis=1)
    starts = (rank < count[:, None]).astype(jnp.int32)
    # Frame t is masked when a span starts in (t - span, t]: a difference of running sums.
    running = jnp.cumsum(starts, axis=1)
    shifted = jnp.pad(running, ((0, 0), (span, 0)))[:, :num_frames]
    return ((running - shifted) > 0) & valid
