"""Training objectives: HuBERT masked prediction, wav2vec 2.0 contrastive, CTC.

Params are ``{"encoder": <SpeechEncoder params>, "heads": <training-only params>}``: the
``encoder`` subtree is exactly what ``sslsim_jax.models.modules.SpeechEncoder`` loads (save it
with ``sslsim_jax.checkpoints.save_converted``); the ``heads`` (mask embedding, projections,
cluster embeddings, quantizer) exist only for training. A CTC model's ``lm_head`` is part of
``encoder`` (``config.ctc_head``).

Every objective is a `Objective`: ``init(key) -> params`` and a pure
``loss(params, batch, key, step) -> (loss, metrics)`` to give `sslsim_jax.train.loop`.
Batches are dicts of arrays: ``audio`` [B, S] float32 and ``lengths`` [B] int32 always;
``targets`` [B, T] int32 (masked prediction); ``labels`` [B, U] int32 and
``label_lengths`` [B] int32 (CTC).

Shape letters: B batch, S samples, T frames, C conv channels, D hidden, E projection, K
clusters or candidates, G codebook groups, V entries per group, U label length.

References:
    Hsu et al., *HuBERT* (TASLP 2021); Baevski et al., *wav2vec 2.0* (NeurIPS 2020);
    Graves et al., *Connectionist Temporal Classification* (ICML 2006).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sslsim_jax.models import ModelConfig
from sslsim_jax.models.modules import SpeechEncoder
from sslsim_jax.train.masking import span_mask

LossFn = Callable[[Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective: ``init(key) -> params`` and ``loss(params, batch, key, step)``.

    ``frozen`` names top-level subtrees of ``params["encoder"]`` the optimiser must not change.
    """

    init: Callable[[jax.Array], dict]
    loss: LossFn
    frozen: tuple[str, ...] = ()


def init_encoder(config: ModelConfig, key: jax.Array) -> dict:
    """Random ``SpeechEncoder(config)`` params (flax's default initialisers)."""
    dummy = jnp.zeros((1, config.receptive_field), jnp.float32)
    return SpeechEncoder(config).init(key, dummy)["params"]


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> dict:
    kernel = jax.random.normal(key, (fan_in, fan_out)) * fan_in**-0.5
    return {"kernel": kernel, "bias": jnp.zeros((fan_out,))}


def _apply_dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _cosine_logits(x: jax.Array, candidates: jax.Array, temperature: float) -> jax.Array:
    """Cosine similarity / temperature of x [..., E] with candidates [..., K, E] -> [..., K]."""
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    c = candidates / jnp.maximum(jnp.linalg.norm(candidates, axis=-1, keepdims=True), 1e-6)
    return jnp.einsum("...e,...ke->...k", x, c) / temperature


def _masked_mean(values: jax.Array, where: jax.Array) -> jax.Array:
    where = where.astype(values.dtype)
    return jnp.sum(values * where) / jnp.maximum(jnp.sum(where), 1.0)


def _run_masked(config, params, batch, key, mask_prob, span):
    """Forward pass with span-masked frames replaced by the mask embedding."""
    lengths = batch["lengths"]
    frames = config.num_frames(batch["audio"].shape[1])
    mask = span_mask(
        key, config.frame_lengths(lengths), frames, mask_prob=mask_prob, span=span
    )  # [B, T]
    out = SpeechEncoder(config).apply(
        {"params": params["encoder"]},
        batch["audio"],
        lengths,
        time_mask=mask,
        mask_embedding=params["heads"]["mask_embedding"],
    )
    return out, mask


def masked_prediction(
    config: ModelConfig,
    *,
    num_clusters: int,
    projection_dim: int = 64,
    mask_prob: float = 0.08,
    span: int = 10,
    temperature: float = 0.1,
) -> Objective:
    """HuBERT's masked prediction of frame cluster ids (``batch["targets"]`` [B, T]).

    The projected final hidden state of every masked frame is scored against one learned
    embedding per cluster by cosine similarity / ``temperature``; the loss is the cross-entropy
    on masked valid frames (HuBERT's α = 1). Metrics: ``accuracy`` on masked frames (chance is
    the largest cluster's share).
    """

    def init(key):
        k_enc, k_mask, k_proj, k_emb = jax.random.split(key, 4)
        heads = {
            "mask_embedding": jax.random.uniform(k_mask, (config.hidden_size,)),
            "final_proj": _dense(k_proj, config.hidden_size, projection_dim),
            "cluster_embeddings": jax.random.normal(k_emb, (num_clusters, projection_dim)),
        }
        return {"encoder": init_encoder(config, k_enc), "heads": heads}

    def loss(params, batch, key, step):
        out, mask = _run_masked(config, params, batch, key, mask_prob, span)
        heads = params["heads"]
        h = _apply_dense(heads["final_proj"], out["final_hidden_state"])  # [B, T, E]
        emb = jnp.broadcast_to(
            heads["cluster_embeddings"], h.shape[:2] + (num_clusters, h.shape[-1])
        )
        logits = _cosine_logits(h, emb, temperature)  # [B, T, K]
        targets = batch["targets"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        correct = (logits.argmax(-1) == targets).astype(jnp.float32)
        value = _masked_mean(ce, mask)
        return value, {"loss": value, "accuracy": _masked_mean(correct, mask)}

    return Objective(init, loss)


def gumbel_quantize(
    p: dict, features: jax.Array, key: jax.Array, temperature: jax.Array, groups: int
) -> tuple[jax.Array, jax.Array]:
    """Gumbel-softmax product quantisation with a straight-through hard choice.

    Args:
        p: ``{"weight_proj": dense C -> G·V, "codevectors": [G·V, Dq/G]}``.
        features: [B, T, C].
        key: PRNG key of the Gumbel noise.
        temperature: Gumbel-softmax temperature (scalar array).
        groups: G.

    Returns:
        quantised [B, T, Dq] and the soft probabilities without noise [B, T, G, V] (for the
        diversity loss).
    """
    logits = _apply_dense(p["weight_proj"], features)  # [B, T, G·V]
    batch, frames, _ = logits.shape
    logits = logits.reshape(batch, frames, groups, -1)  # [B, T, G·V] -> [B, T, G, V]
    noisy = logits + jax.random.gumbel(key, logits.shape)
    soft = jax.nn.softmax(noisy / temperature, axis=-1)
    hard = jax.nn.one_hot(soft.argmax(-1), soft.shape[-1], dtype=soft.dtype)
    choice = hard + soft - jax.lax.stop_gradient(soft)
    codebook = p["codevectors"].reshape(groups, -1, p["codevectors"].shape[-1])  # [G, V, Dq/G]
    quantised = jnp.einsum("btgv,gvd->btgd", choice, codebook).reshape(batch, frames, -1)
    return quantised, jax.nn.softmax(logits, axis=-1)


def masked_distractors(key: jax.Array, mask: jax.Array, count: int) -> jax.Array:
    """Frame indices [B, T, count]: for each masked frame, ``count`` uniform draws (with
    replacement) among the other masked frames of its utterance, as in wav2vec 2.0. Rows of
    unmasked frames are arbitrary masked frames (they carry no loss)."""
    batch, frames = mask.shape
    order = jnp.argsort(~mask, axis=1, stable=True)  # masked frames first, in time order
    masked = mask.sum(axis=1)  # [B]
    rank = jnp.cumsum(mask, axis=1) - 1  # [B, T]: a masked frame's place among them
    draw = jax.random.randint(key, (batch, frames, count), 0, 1 << 30)
    pick = draw % jnp.maximum(masked - 1, 1)[:, None, None]
    pick = pick + (pick >= rank[:, :, None])  # skip the frame itself
    other = jnp.take_along_axis(order, pick.reshape(batch, -1), axis=1)
    return other.reshape(batch, frames, count)


def contrastive(
    config: ModelConfig,
    *,
    groups: int = 2,
    entries: int = 32,
    codevector_dim: int = 64,
    projection_dim: int = 64,
    distractors: int = 20,
    mask_prob: float = 0.065,
    span: int = 10,
    temperature: float = 0.1,
    diversity_weight: float = 0.1,
    gumbel_temperature: tuple[float, float, float] = (2.0, 0.5, 0.999),
) -> Objective:
    """wav2vec 2.0's contrastive task: masked context vectors against quantised targets.

    For every masked frame the projected context vector is scored by cosine similarity /
    ``temperature`` against its own projected quantised feature and ``distractors`` quantised
    features of other masked frames of the same utterance (`masked_distractors`; a distractor
    equal to the target is excluded). Loss = cross-entropy + ``diversity_weight`` ·
    (GV − perplexity)/GV of the batch-averaged codebook probabilities. The Gumbel temperature
    decays from ``gumbel_temperature[0]`` by the factor ``[2]`` per step to at least ``[1]``.
    The CNN feature penalty of the paper is not used (features here are layer-normalised).
    Metrics: ``accuracy`` (target ranked first), ``perplexity``.
    """
    codebook = groups * entries

    def init(key):
        k_enc, k_mask, k_w, k_cv, k_q, k_h = jax.random.split(key, 6)
        channels = config.conv_dim[-1]
        heads = {
            "mask_embedding": jax.random.uniform(k_mask, (config.hidden_size,)),
            "quantizer": {
                # Unit-variance weights (fairseq, transformers), not 1/sqrt(fan_in): the code
                # logits must dominate the Gumbel noise from the start, or the hard codes are
                # random draws the context cannot predict and the loss stays at chance.
                "weight_proj": {
                    "kernel": jax.random.normal(k_w, (channels, codebook)),
                    "bias": jnp.zeros((codebook,)),
                },
                "codevectors": jax.random.uniform(k_cv, (codebook, codevector_dim // groups)),
            },
            "project_q": _dense(k_q, codevector_dim, projection_dim),
            "project_hid": _dense(k_h, config.hidden_size, projection_dim),
        }
        return {"encoder": init_encoder(config, k_enc), "heads": heads}

    def loss(params, batch, key, step):
        k_mask, k_gumbel, k_neg = jax.random.split(key, 3)
        out, mask = _run_masked(config, params, batch, k_mask, mask_prob, span)
        heads = params["heads"]
        start, floor, decay = gumbel_temperature
        tau = jnp.maximum(start * decay ** step.astype(jnp.float32), floor)
        quantised, probs = gumbel_quantize(
            heads["quantizer"], out["features"], k_gumbel, tau, groups
        )
        targets = _apply_dense(heads["project_q"], quantised)  # [B, T, E]
        context = _apply_dense(heads["project_hid"], out["final_hidden_state"])  # [B, T, E]
        batch_size, frames, _ = targets.shape
        other = masked_distractors(k_neg, mask, distractors)
        negatives = jax.vmap(lambda y, idx: y[idx])(targets, other)  # [B, T, N, E]
        candidates = jnp.concatenate([targets[:, :, None], negatives], axis=2)  # [B, T, 1+N, E]
        logits = _cosine_logits(context, candidates, temperature)
        same = jnp.all(negatives == targets[:, :, None], axis=-1)  # [B, T, N]
        logits = logits.at[..., 1:].set(jnp.where(same, -jnp.inf, logits[..., 1:]))
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.zeros((batch_size, frames), jnp.int32)
        )
        frame_mask = out["frame_mask"].astype(jnp.float32)[..., None, None]
        avg = jnp.sum(probs * frame_mask, axis=(0, 1)) / jnp.maximum(frame_mask.sum(), 1.0)
        perplexity = jnp.sum(jnp.exp(-jnp.sum(jax.scipy.special.xlogy(avg, avg), axis=-1)))
        diversity = (codebook - perplexity) / codebook
        contrast = _masked_mean(ce, mask)
        value = contrast + diversity_weight * diversity
        correct = (logits.argmax(-1) == 0).astype(jnp.float32)
        metrics = {
            "loss": value,
            "contrastive": contrast,
            "accuracy": _masked_mean(correct, mask),
            "perplexity": perplexity,
        }
        return value, metrics

    return Objective(init, loss)


def ctc(
    config: ModelConfig, *, encoder: dict | None = None, freeze_feature_encoder: bool = True
) -> Objective:
    """CTC on characters (blank = ``<pad>`` = id 0) with ``optax.ctc_loss``.

    ``config`` must have a CTC head. ``init`` starts from ``encoder`` (pre-trained params
    without ``lm_head``) with a fresh ``lm_head``, or from scratch. The loss is each utterance's
    CTC loss divided by its label count, averaged over the batch (transformers' "mean"
    reduction). With ``freeze_feature_encoder`` the conv feature encoder gets no gradient and
    no update.
    """
    if not config.ctc_head:
        raise ValueError("expected a config with ctc_head=True (and vocab_size) for CTC")

    def init(key):
        fresh = init_encoder(config, key)
        if encoder is None:
            return {"encoder": fresh, "heads": {}}
        missing = sorted(set(fresh) - set(encoder) - {"lm_head"})
        if missing:
            raise ValueError(f"pre-trained encoder params lack {missing}")
        start = {name: encoder[name] for name in fresh if name != "lm_head"}
        return {"encoder": {**start, "lm_head": fresh["lm_head"]}, "heads": {}}

    def loss(params, batch, key, step):
        out = SpeechEncoder(config).apply(
            {"params": params["encoder"]},
            batch["audio"],
            batch["lengths"],
            freeze_feature_encoder=freeze_feature_encoder,
        )
        labels = batch["labels"]
        label_paddings = jnp.arange(labels.shape[1])[None, :] >= batch["label_lengths"][:, None]
        per_utterance = optax.ctc_loss(
            out["logits"],
            1.0 - out["frame_mask"].astype(jnp.float32),
            labels,
            label_paddings.astype(jnp.float32),
            blank_id=0,
        )
        value = jnp.mean(per_utterance / jnp.maximum(batch["label_lengths"], 1))
        return value, {"loss": value}

    frozen = ("feature_extractor",) if freeze_feature_encoder else ()
    return Objective(init, loss, frozen)
