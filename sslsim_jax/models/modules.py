"""Flax (linen) Wav2Vec2 and HuBERT encoders, numerically equal to transformers' PyTorch models.

The modules hold no parameters: params are a pytree passed to ``apply`` (see
``sslsim_jax.convert.hf.convert_state_dict`` for the name map from PyTorch checkpoints). They run in
inference mode only (no dropout, no SpecAugment masking).

Every layer's hidden state and attention probabilities are recorded with ``self.sow`` into the
``"intermediates"`` collection of the encoder:

    _, state = SpeechEncoder(cfg).apply({"params": params}, x, lengths,
                                        output_attentions=True, mutable=["intermediates"])
    state["intermediates"]["encoder"]["hidden_states"][0]  # [L+1, B, T, D]
    state["intermediates"]["encoder"]["attentions"][0]     # [L, B, H, T, T]

The transformer blocks run under ``nn.scan``: their params are stacked along a leading L axis
(``params["encoder"]["layers"]``).

Padded batches are exact: the GroupNorm of base models is computed over each utterance's valid
samples only, padded frames are zeroed before the positional convolution and masked out of
attention, so every valid frame equals running that utterance alone.

Shape letters: B batch, S samples, T frames, C conv channels, D hidden, H heads, L layers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sslsim_jax.models.config import ModelConfig, conv_output_length

Dtype = Any

# Queries per block of the blocked attention, used when attention maps are not returned and T
# exceeds it (`SelfAttention`). Utterances up to 512 frames (10.2 s) run the plain path; at
# 30 s (T = 1499, base size) blocks of 512 or 256 cost the same CPU time as the plain path
# (scripts/bench_attention_block.py, 2026-11-28), and a block's scores [B, H, 512, T] stay
# small next to the conv encoder's activations.
DEFAULT_ATTENTION_BLOCK = 512


def activation(name: str):
    """The activation transformers' ``ACT2FN[name]`` applies (``gelu`` is the exact erf form)."""
    if name == "gelu":
        return exact_gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")


def exact_gelu(x: jax.Array) -> jax.Array:
    """GELU in PyTorch's erf form, ``x * (1 + erf(x / sqrt(2))) / 2``.

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, which XLA CPU computes 2.7x slower
    on the feed-forward's [499, 3072] (1.37 ms against 0.48 ms, 2026-11-30); this form is also
    closer to PyTorch's values (largest error against float64 1.0e-6, as PyTorch's 1.3e-6).
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * (2**-0.5)))


def weighted_values(probs: jax.Array, v: jax.Array, *, precision=None) -> jax.Array:
    """Attention output [B, Q, H, D/H] from probabilities [B, H, Q, T] and values [B, T, H, D/H].

    The product runs heads first ([B, H, T, D/H] values, one transpose of the output): XLA CPU
    takes 5.0 ms per base block for the same product with the values' heads in the middle,
    and the heads-first layout saves about 3 ms per block (2026-11-30).
    """
    heads_first = jnp.einsum(
        "bhqt,bhtd->bhqd", probs.astype(v.dtype), v.transpose(0, 2, 1, 3), precision=precision
    )
    return heads_first.transpose(0, 2, 1, 3)


class MaskedGroupNorm(nn.Module):
    """GroupNorm with one group per channel, statistics over each utterance's valid steps only.

    transformers normalises over the whole padded time axis, so its padded batches differ from
    running each utterance alone; this is the per-utterance computation. Statistics in float32.
    """

    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        # x: [B, T, C], mask: [B, T]
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        m = mask.astype(jnp.float32)  # [B, T]
        count = jnp.maximum(m.sum(axis=1), 1.0)[:, None, None]  # [B, 1, 1]
        # Masked sums over time as matmuls with the mask: XLA CPU runs a masked reduction over
        # the non-minor time axis ~10x slower than this (measured: 0.43 s vs 0.04 s, base size).
        total = partial(jnp.einsum, "btc,bt->bc", precision=jax.lax.Precision.HIGHEST)
        mean = total(x32, m)[:, None, :] / count
        centred = x32 - mean
        var = total(centred * centred, m)[:, None, :] / count
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm32(nn.Module):
    """LayerNorm over the last axis computed in float32, returned in the input dtype."""

    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class ConfiguredModule(nn.Module):
    """Base of the model's modules: the architecture and the dtype/precision settings.

    ``attention_block`` (queries per block of the attention when its maps are not returned;
    None: never blocked) is passed on explicitly by the modules that own attention.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    attention_block: int | None = DEFAULT_ATTENTION_BLOCK

    @property
    def settings(self) -> dict[str, Any]:
        """dtype, param_dtype and precision, to pass on to submodules."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)


class FeatureEncoder(ConfiguredModule):
    """Strided conv stack from waveform [B, S] to features [B, T, C] with frame lengths [B]."""

    @nn.compact
    def __call__(self, waveforms: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        act = activation(cfg.feat_extract_activation)
        x = waveforms.astype(self.dtype)[..., None]  # [B, S] -> [B, S, 1]
        layers = zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride, strict=True)
        for i, (dim, k, s) in enumerate(layers):
            x = nn.Conv(
                dim,
                kernel_size=(k,),
                strides=(s,),
                padding="VALID",
                use_bias=cfg.conv_bias,
                **self.settings,
                name=f"conv_layers_{i}_conv",
            )(x)
            lengths = conv_output_length(lengths, k, s)
            if cfg.feat_extract_norm == "group" and i == 0:
                mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
                x = MaskedGroupNorm(param_dtype=self.param_dtype, name=f"conv_layers_{i}_norm")(
                    x, mask
                )
            elif cfg.feat_extract_norm == "layer":
                # transformers' conv LayerNorm keeps torch's default eps of 1e-5.
                x = LayerNorm32(
                    epsilon=1e-5, param_dtype=self.param_dtype, name=f"conv_layers_{i}_norm"
                )(x)
            x = act(x)
        return x, lengths


class PositionalConv(ConfiguredModule):
    """Grouped 'same' convolution over time (weight norm folded into the kernel at conversion)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        k = cfg.num_conv_pos_embeddings
        y = nn.Conv(
            cfg.hidden_size,
            kernel_size=(k,),
            padding=[(k // 2, k // 2)],
            feature_group_count=cfg.num_conv_pos_embedding_groups,
            **self.settings,
            name="conv",
        )(x)
        # An even kernel gives T + 1 outputs; transformers' SamePad layer drops the last one.
        y = y[:, : x.shape[1]]
        return activation(cfg.feat_extract_activation)(y)


def attention_probs(q: jax.Array, k: jax.Array, key_mask: jax.Array, *, precision=None):
    """Softmax attention probabilities [B, H, Q, T] (float32) of queries q: [B, Q, H, D/H] over
    keys k: [B, T, H, D/H]; masked keys (``key_mask`` [B, T] False) get probability 0."""
    scores = jnp.einsum("bqhd,bthd->bhqt", q, k, precision=precision)
    scores = scores.astype(jnp.float32) * (q.shape[-1] ** -0.5)
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    block: int,
    precision=None,
) -> jax.Array:
    """Attention output [B, T, H, D/H] computed ``block`` queries at a time.

    Each query row's softmax is exact (the row sees every key), so the result equals the
    unblocked computation up to float rounding; only one block's scores [B, H, block, T] exist
    at a time, so memory is linear in T instead of quadratic. T is padded with zero queries to
    a multiple of ``block``; their rows are computed and dropped.

    Args:
        q, k, v: [B, T, H, D/H] queries, keys and values.
        key_mask: [B, T] bool, True on valid frames.
        block: queries per block (positive).
        precision: matmul precision.

    Returns:
        [B, T, H, D/H] in v's dtype.
    """
    if block < 1:
        raise ValueError(f"expected a positive block, got {block}")
    batch, frames, heads, head_dim = q.shape
    blocks = -(-frames // block)
    q = jnp.pad(q, ((0, 0), (0, blocks * block - frames), (0, 0), (0, 0)))
    # [B, nb·Q, H, D/H] -> [nb, B, Q, H, D/H]: lax.map runs over the leading axis.
    q = q.reshape(batch, blocks, block, heads, head_dim).swapaxes(0, 1)

    def one(qb):
        probs = attention_probs(qb, k, key_mask, precision=precision)  # [B, H, Q, T]
        return weighted_values(probs, v, precision=precision)

    out = jax.lax.map(one, q)  # [nb, B, Q, H, D/H]
    # [nb, B, Q, H, D/H] -> [B, nb·Q, H, D/H] -> [B, T, H, D/H]
    return out.swapaxes(0, 1).reshape(batch, blocks * block, heads, head_dim)[:, :frames]


class SelfAttention(ConfiguredModule):
    """Multi-head self-attention; returns the output and the probabilities [B, H, T, T] (f32).

    Without probabilities (``return_probs=False``) and with more than ``attention_block``
    frames, the scores are computed ``attention_block`` queries at a time
    (`blocked_attention`), so long utterances need memory linear in T; the probabilities
    themselves are [B, H, T, T] and cannot be blocked.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, *, return_probs: bool = True
    ) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        batch, frames, _ = x.shape

        def dense(name):
            return nn.Dense(
                cfg.hidden_size,
                **self.settings,
                name=name,
            )

        # [B, T, D] -> [B, T, H, D/H]
        heads = (batch, frames, cfg.num_attention_heads, cfg.head_dim)
        q = dense("q_proj")(x).reshape(heads)
        k = dense("k_proj")(x).reshape(heads)
        v = dense("v_proj")(x).reshape(heads)
        block = self.attention_block
        probs = None
        if return_probs or block is None or frames <= block:
            probs = attention_probs(q, k, key_mask, precision=self.precision)  # [B, H, T, T]
            out = weighted_values(probs, v, precision=self.precision)
        else:
            out = blocked_attention(q, k, v, key_mask, block=block, precision=self.precision)
        out = out.reshape(batch, frames, cfg.hidden_size)  # [B, T, H, D/H] -> [B, T, D]
        return dense("out_proj")(out), probs if return_probs else None


class FeedForward(ConfiguredModule):
    """The block's two-layer feed-forward network with the config's activation."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = self.settings
        h = nn.Dense(cfg.intermediate_size, name="intermediate_dense", **kw)(x)
        h = activation(cfg.hidden_act)(h)
        return nn.Dense(cfg.hidden_size, name="output_dense", **kw)(h)


class EncoderLayer(ConfiguredModule):
    """One transformer block: post-LN, or pre-LN when ``config.do_stable_layer_norm``.

    Written as the body of ``nn.scan`` over the blocks: returns ``(x, (x, probs))``, the carry
    and the per-block outputs (``probs`` is None unless ``output_attentions``).
    """

    output_attentions: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None]]:
        cfg = self.config
        kw = self.settings
        attention = SelfAttention(cfg, name="attention", attention_block=self.attention_block, **kw)
        feed_forward = FeedForward(cfg, name="feed_forward", **kw)
        norm = LayerNorm32(cfg.layer_norm_eps, self.param_dtype, name="layer_norm")
        final_norm = LayerNorm32(cfg.layer_norm_eps, self.param_dtype, name="final_layer_norm")
        if cfg.do_stable_layer_norm:
            h, probs = attention(norm(x), key_mask, return_probs=self.output_attentions)
            x = x + h
            x = x + feed_forward(final_norm(x))
        else:
            h, probs = attention(x, key_mask, return_probs=self.output_attentions)
            x = norm(x + h)
            x = final_norm(x + feed_forward(x))
        return x, (x, probs)


class Encoder(ConfiguredModule):
    """Positional conv and the transformer blocks, scanned (``nn.scan``; params stacked [L, ...]).

    Sows ``hidden_states`` [L+1, B, T, D] and, with ``output_attentions``, ``attentions``
    [L, B, H, T, T], each as one stacked array: ``hidden_states[0]`` is the transformer input
    (after the positional conv, and after the input LayerNorm of post-LN models),
    ``hidden_states[i]`` the output of block i, as transformers 5.x's ``hidden_states``. The scan
    writes every block's outputs in place (no stacking copy) and compiles one block, not L.
    Returns the final hidden state: the output of the final LayerNorm for pre-LN models
    (transformers' ``last_hidden_state``), the last block's output otherwise.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, frame_mask: jax.Array, output_attentions: bool = False
    ) -> jax.Array:
        cfg = self.config
        kw = self.settings
        # Zero padded frames so the 'same' conv sees what it sees on an utterance alone.
        x = jnp.where(frame_mask[..., None], x, 0).astype(self.dtype)
        x = x + PositionalConv(cfg, name="pos_conv_embed", **kw)(x)
        layer_norm = LayerNorm32(cfg.layer_norm_eps, self.param_dtype, name="layer_norm")
        if not cfg.do_stable_layer_norm:
            x = layer_norm(x)
        blocks = nn.scan(
            EncoderLayer,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=cfg.num_hidden_layers,
        )
        first = x
        x, (hidden, probs) = blocks(
            cfg,
            output_attentions=output_attentions,
            attention_block=self.attention_block,
            name="layers",
            **kw,
        )(x, frame_mask)
        # [B, T, D] and [L, B, T, D] -> [L+1, B, T, D]
        self.sow("intermediates", "hidden_states", jnp.concatenate([first[None], hidden]))
        if output_attentions:
            self.sow("intermediates", "attentions", probs)
        if cfg.do_stable_layer_norm:
            x = layer_norm(x)
        return x


class SpeechEncoder(ConfiguredModule):
    """Wav2Vec2 / HuBERT model (optionally with CTC head) from waveforms to hidden states.

    Attributes:
        config: the architecture.
        dtype: compute dtype of convolutions and matmuls; norms and softmax stay float32.
        param_dtype: dtype of the parameters.
        precision: matmul/conv precision (``jax.lax.Precision`` or a string such as
            ``"highest"``); None uses JAX's default (or the ``jax.default_matmul_precision``
            context).
        attention_block: without ``output_attentions``, utterances of more frames than this
            run attention this many queries at a time (memory linear in T, same result);
            None never blocks.
    """

    @nn.compact
    def __call__(
        self,
        waveforms: jax.Array,
        lengths: jax.Array | None = None,
        *,
        output_attentions: bool = False,
        time_mask: jax.Array | None = None,
        mask_embedding: jax.Array | None = None,
        freeze_feature_encoder: bool = False,
    ) -> dict[str, jax.Array | None]:
        """Runs the model.

        Args:
            waveforms: [B, S] model input values (transformers' ``input_values``).
            lengths: [B] valid samples per utterance; None means all S are valid.
            output_attentions: also sow attention probabilities.
            time_mask: [B, T] bool, frames replaced by ``mask_embedding`` [D] after the feature
                projection (pre-training, ``sslsim_jax.train``); None replaces nothing.
            mask_embedding: [D], required with ``time_mask``; it is not a param of this module.
            freeze_feature_encoder: stop gradients at the conv feature encoder's output.

        Returns:
            dict with ``final_hidden_state`` [B, T, D], ``frame_mask`` [B, T] bool,
            ``frame_lengths`` [B], ``logits`` [B, T, V] (None without a CTC head) and
            ``features`` [B, T, C] (the feature projection's input).
        """
        cfg = self.config
        kw = self.settings
        batch, samples = waveforms.shape
        if lengths is None:
            lengths = jnp.full((batch,), samples, jnp.int32)
        # Padded samples must not leak into valid frames through any path.
        sample_mask = jnp.arange(samples)[None, :] < lengths[:, None]
        waveforms = jnp.where(sample_mask, waveforms, 0)
        features, frame_lengths = FeatureEncoder(cfg, name="feature_extractor", **kw)(
            waveforms, lengths
        )
        if freeze_feature_encoder:
            features = jax.lax.stop_gradient(features)
        frame_mask = jnp.arange(features.shape[1])[None, :] < frame_lengths[:, None]  # [B, T]
        if cfg.feat_proj_layer_norm:
            features = LayerNorm32(
                cfg.layer_norm_eps, self.param_dtype, name="feature_projection_layer_norm"
            )(features)
        x = nn.Dense(cfg.hidden_size, name="feature_projection", **kw)(features)
        if time_mask is not None:
            x = jnp.where(time_mask[..., None], mask_embedding.astype(x.dtype), x)
        encoder = Encoder(cfg, name="encoder", attention_block=self.attention_block, **kw)
        final = encoder(x, frame_mask, output_attentions)
        logits = None
        if cfg.ctc_head:
            logits = nn.Dense(cfg.vocab_size, name="lm_head", **kw)(final).astype(jnp.float32)
        return {
            "final_hidden_state": final,
            "frame_mask": frame_mask,
            "frame_lengths": frame_lengths,
            "logits": logits,
            "features": features,
        }
