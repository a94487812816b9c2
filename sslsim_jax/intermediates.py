"""Run a model and collect every layer's hidden states and attention probabilities.

    model = sslsim_jax.load_model("facebook/hubert-base-ls960")   # or a local directory
    out = model.intermediates(waveforms, lengths, attentions=True)
    out.hidden_states  # [L+1, B, T, D]
    out.attentions     # [L, B, H, T, T]
    out.frame_mask     # [B, T]

Layer indexing follows transformers 5.x ``hidden_states``: index 0 is the transformer input,
index i the output of block i. For pre-LN ("large", ``do_stable_layer_norm``) models, index L is
the last block's output *before* the final LayerNorm (as transformers 5.x returns it; 4.x
returned it after); the final LayerNorm's output is ``final_hidden_state``, which equals
transformers' ``last_hidden_state`` in both versions and for every layout.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslsim_jax.models.config import ModelConfig
from sslsim_jax.models.modules import DEFAULT_ATTENTION_BLOCK, SpeechEncoder


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intermediates:
    """Everything one forward pass exposes. A pytree, so it can leave ``jax.jit``.

    Attributes:
        hidden_states: [L+1, B, T, D] transformer input and every block's output.
        attentions: [L, B, H, T, T] attention probabilities (float32), or None.
        frame_mask: [B, T] bool, True on valid frames. Padded frames hold unspecified values.
        frame_lengths: [B] int, valid frames per utterance.
        final_hidden_state: [B, T, D] transformers' ``last_hidden_state`` (after the final
            LayerNorm of pre-LN models; equal to ``hidden_states[L]`` for post-LN models).
        logits: [B, T, V] CTC logits (float32), or None without a CTC head.
    """

    hidden_states: jax.Array
    attentions: jax.Array | None
    frame_mask: jax.Array
    frame_lengths: jax.Array
    final_hidden_state: jax.Array
    logits: jax.Array | None


def forward(
    module: SpeechEncoder,
    params: Any,
    waveforms: jax.Array,
    lengths: jax.Array,
    attentions: bool = False,
) -> Intermediates:
    """Pure forward pass collecting intermediates via the ``"intermediates"`` collection."""
    out, state = module.apply(
        {"params": params},
        waveforms,
        lengths,
        output_attentions=attentions,
        mutable=["intermediates"],
    )
    sown = state["intermediates"]["encoder"]
    return Intermediates(
        hidden_states=sown["hidden_states"][0],
        attentions=sown["attentions"][0] if attentions else None,
        frame_mask=out["frame_mask"],
        frame_lengths=out["frame_lengths"],
        final_hidden_state=out["final_hidden_state"],
        logits=out["logits"],
    )


# One jitted forward for every model: the module (a hashable, field-compared dataclass) is a
# static argument, so models with equal modules (the same config, dtype and precision, whatever
# their weights) share each compiled program instead of compiling their own.
@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(module, params, waveforms, lengths, attentions):
    return forward(module, params, waveforms, lengths, attentions)  # looked up when traced


class SpeechModel:
    """A loaded Wav2Vec2/HuBERT model: config, params and a jit-compiled forward pass.

    Attributes:
        config: the ``ModelConfig``.
        params: the params pytree (device arrays).
        module: the Flax ``SpeechEncoder``.
        path: the directory it was loaded from (None if built in memory).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        *,
        dtype: Any = jnp.float32,
        precision: Any = None,
        path: str | None = None,
        attention_block: int | None = DEFAULT_ATTENTION_BLOCK,
    ):
        if attention_block is not None and attention_block < 1:
            raise ValueError(f"expected attention_block >= 1 or None, got {attention_block}")
        self.config = config
        param_dtype = jax.tree.leaves(params)[0].dtype
        module = functools.partial(
            SpeechEncoder,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            attention_block=attention_block,
        )
        self.module = module(config)
        self.encoder_module = module(config.encoder())  # the same without the CTC head
        self.params = jax.device_put(params)
        self.path = path

    def placed(self, sharding: Any) -> SpeechModel:
        """This model with its params on ``sharding``'s devices (e.g. replicated over a mesh,
        `sslsim_jax.distributed.replicated`); this one keeps its own. Shares the compiled
        forward pass."""
        other = copy.copy(self)
        other.params = jax.device_put(self.params, sharding)
        return other

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SpeechModel({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"heads={c.num_attention_heads}, ctc_head={c.ctc_head}, path={self.path!r})"
        )

    def check_inputs(
        self, waveforms: Any, lengths: Any = None
    ) -> tuple[np.ndarray | jax.Array, np.ndarray]:
        """Validates shapes and lengths on the host; returns ([B, S] waveforms, [B] lengths)."""
        shape = np.shape(waveforms)
        if len(shape) != 2:
            raise ValueError(f"expected waveforms of shape [B, S], got {tuple(shape)}")
        batch, samples = shape
        if lengths is None:
            lengths = np.full((batch,), samples, np.int32)
        lengths = np.asarray(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"expected lengths of shape [B] = ({batch},), got {lengths.shape}")
        if not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"expected integer lengths, got dtype {lengths.dtype}")
        if np.any(lengths > samples):
            i = int(np.argmax(lengths > samples))
            raise ValueError(f"lengths[{i}] = {lengths[i]} exceeds the padded length S = {samples}")
        field = self.config.receptive_field
        if np.any(lengths < field):
            i = int(np.argmax(lengths < field))
            raise ValueError(
                f"utterance {i} has {lengths[i]} samples, fewer than the model's receptive field "
                f"of {field} samples (one frame)"
            )
        return waveforms, lengths.astype(np.int32)

    def check_attention_memory(self, batch: int, samples: int) -> None:
        """Raises ValueError when a batch [B, S] with attention maps cannot fit in memory.

        Checked before dispatch because a failed allocation of the maps is not reliably an
        error: on CPU, ``np.asarray`` of any output of that computation then waits forever
        (see `sslsim_jax.memory`).
        """
        from sslsim_jax import memory

        frames = self.config.num_frames(samples)
        if frames < 1:
            return
        need = memory.activation_bytes(self.config, frames, batch, attentions=True)
        # Params replicated over n devices: a batch split over them needs 1/n on each.
        devices = jax.tree.leaves(self.params)[0].devices()
        limit, what = memory.device_memory(next(iter(devices)))
        if len(devices) > 1:
            limit, what = limit * len(devices), f"{len(devices)} x {what}"
        if need > limit:
            maps = memory.attention_map_bytes(self.config, frames, batch)
            seconds = samples / memory.SAMPLE_RATE
            raise ValueError(
                f"attention maps of {batch} utterance(s) of {seconds:.1f} s need about "
                f"{memory.format_bytes(need)} ({memory.format_bytes(maps)} of them the maps "
                f"[L, B, H, T, T]), more than the {memory.format_bytes(limit)} of {what}: pass "
                "shorter waveforms or attentions=False"
            )

    def intermediates(
        self, waveforms: Any, lengths: Any = None, attentions: bool = False, logits: bool = True
    ) -> Intermediates:
        """Runs the model on a padded batch and returns every layer's intermediates.

        Jit-compiled once per (padded shape, ``attentions``, ``logits``); a new batch of the
        same padded shape does not recompile, and neither does another model whose module is
        equal (same config, dtype and precision; with ``logits=False``, same
        `ModelConfig.encoder`).

        Args:
            waveforms: [B, S] float model input values (transformers' ``input_values``:
                16 kHz, normalised as the model's feature extractor does).
            lengths: [B] int valid samples per utterance; None means all S are valid.
            attentions: also return attention probabilities [L, B, H, T, T].
            logits: also run the CTC head, if the model has one; False runs the encoder alone
                (``logits`` is then None), the program models of one layout share.

        Returns:
            ``Intermediates``; valid frames are equal to running each utterance alone.

        Raises:
            ValueError: bad shapes or lengths, or (with ``attentions``) maps that cannot fit
                in the device's memory (`check_attention_memory`).
        """
        waveforms, lengths = self.check_inputs(waveforms, lengths)
        if attentions:
            self.check_attention_memory(*np.shape(waveforms))
        waveforms = jnp.asarray(waveforms, jnp.float32)
        if logits:
            return _forward(self.module, self.params, waveforms, lengths, attentions)
        # A plain dict with or without a head: one tree structure for every model of a layout.
        encoder = {k: v for k, v in self.params.items() if k != "lm_head"}
        return _forward(self.encoder_module, encoder, waveforms, lengths, attentions)


def load_model(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    **hub_kwargs: Any,
) -> SpeechModel:
    """Loads a Wav2Vec2/HuBERT model.

    Args:
        path_or_hub_id: a transformers checkpoint directory (``config.json`` plus
            ``model.safetensors``/``pytorch_model.bin``, possibly sharded), a directory
            converted by ``sslsim convert``, or a hub id such as
            ``"facebook/wav2vec2-base"`` (downloaded or taken from the huggingface cache).
        dtype: compute dtype (e.g. ``jnp.bfloat16``); norms and softmax stay float32.
        param_dtype: dtype the params are stored in.
        precision: matmul/conv precision, e.g. ``"highest"`` for exact float32 on GPU (where
            TF32 is the default) and TPU (bfloat16 passes by default); None keeps JAX's default.
        **hub_kwargs: passed to ``huggingface_hub.snapshot_download`` for hub ids
            (``cache_dir``, ``revision``, ``local_files_only``, ``token``).

    Returns:
        A ``SpeechModel``.
    """
    from sslsim_jax.checkpoints import load_config_and_params

    config, params, path = load_config_and_params(
        path_or_hub_id, param_dtype=np.dtype(param_dtype), **hub_kwargs
    )
    return SpeechModel(config, params, dtype=dtype, precision=precision, path=path)
