"""Model configuration: every field the Wav2Vec2/HuBERT forward pass depends on."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert")
SUPPORTED_NORMS = ("group", "layer")
# Names as transformers' ACT2FN spells them. "gelu" is the exact erf form.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


def conv_output_length(lengths: Any, kernel: int, stride: int) -> Any:
    """Valid outputs of a VALID strided conv over ``lengths`` inputs, as transformers computes
    them, clipped at 0: ``max((L - k) // s + 1, 0)``. Works on ints, NumPy and JAX arrays (also
    under ``jax.jit``). The one formula of the frame geometry: `ModelConfig.frame_lengths` and
    the modules' conv stack use it."""
    out = (lengths - kernel) // stride + 1
    if isinstance(out, int):
        return max(out, 0)
    return (jnp if isinstance(out, jax.Array) else np).maximum(out, 0)


class ConfigError(ValueError):
    """A config.json value this port does not support or that is inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Wav2Vec2 or HuBERT model, as read from a transformers ``config.json``.

    The layout is chosen from fields, never from the model size: ``feat_extract_norm`` picks
    GroupNorm-after-conv-0 ("group") or LayerNorm-after-every-conv ("layer"), and
    ``do_stable_layer_norm`` picks pre-LN blocks with a final LayerNorm (True) or post-LN blocks
    with an input LayerNorm (False).
    """

    model_type: str
    conv_dim: tuple[int, ...]
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_bias: bool
    feat_extract_norm: str
    feat_extract_activation: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    num_conv_pos_embeddings: int
    num_conv_pos_embedding_groups: int
    do_stable_layer_norm: bool
    layer_norm_eps: float = 1e-5
    feat_proj_layer_norm: bool = True
    ctc_head: bool = False
    vocab_size: int | None = None

    def __post_init__(self):
        def fail(field: str, value: Any, why: str):
            raise ConfigError(f"config field {field!r} = {value!r}: {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            fail("model_type", self.model_type, f"expected one of {SUPPORTED_MODEL_TYPES}")
        if self.feat_extract_norm not in SUPPORTED_NORMS:
            fail("feat_extract_norm", self.feat_extract_norm, f"expected one of {SUPPORTED_NORMS}")
        for field in ("feat_extract_activation", "hidden_act"):
            value = getattr(self, field)
            if value not in SUPPORTED_ACTIVATIONS:
                fail(field, value, f"unsupported activation; supported: {SUPPORTED_ACTIVATIONS}")
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0):
            fail(
                "conv_dim/conv_kernel/conv_stride",
                (self.conv_dim, self.conv_kernel, self.conv_stride),
                "expected three non-empty lists of the same length",
            )
        for field in ("conv_dim", "conv_kernel", "conv_stride"):
            if any(int(v) < 1 for v in getattr(self, field)):
                fail(field, getattr(self, field), "every entry must be a positive integer")
        for field in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_conv_pos_embeddings",
            "num_conv_pos_embedding_groups",
        ):
            if int(getattr(self, field)) < 1:
                fail(field, getattr(self, field), "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail(
                "num_attention_heads",
                self.num_attention_heads,
                f"must divide hidden_size = {self.hidden_size}",
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            fail(
                "num_conv_pos_embedding_groups",
                self.num_conv_pos_embedding_groups,
                f"must divide hidden_size = {self.hidden_size}",
            )
        if not self.layer_norm_eps > 0:
            fail("layer_norm_eps", self.layer_norm_eps, "must be positive")
        if self.ctc_head and (self.vocab_size is None or self.vocab_size < 1):
            fail("vocab_size", self.vocab_size, "a CTC head needs a positive vocab_size")

    def encoder(self) -> ModelConfig:
        """This config without what leaves the encoder's computation unchanged: no CTC head,
        and one model type (the modules read the layout from fields, never from
        ``model_type``). Models whose encoders compute alike, such as wav2vec2-base and
        hubert-base-ls960 or a model and its CTC fine-tuned counterpart, have equal encoder
        configs, so their hidden states come from one compiled program
        (`SpeechModel.intermediates` with ``logits=False``)."""
        return dataclasses.replace(
            self, model_type=SUPPORTED_MODEL_TYPES[0], ctc_head=False, vocab_size=None
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def receptive_field(self) -> int:
        """Samples needed for one output frame of the conv feature encoder (400 for wav2vec 2.0
        and HuBERT: 25 ms)."""
        field, jump = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            field += (k - 1) * jump
            jump *= s
        return field

    @property
    def frame_stride(self) -> int:
        """Samples between consecutive frames (320 for every released checkpoint)."""
        stride = 1
        for s in self.conv_stride:
            stride *= s
        return stride

    def frame_lengths(self, lengths: Any) -> Any:
        """Valid frames per utterance after the conv feature encoder.

        transformers' ``_get_feat_extract_output_lengths``, ``(L - k) // s + 1`` per conv layer
        (`conv_output_length`), except that an utterance shorter than the receptive field gets 0
        frames (transformers would return a negative or meaningless count).

        Args:
            lengths: [B] valid samples: a ``jax.Array`` (also under ``jax.jit``) or array-like.

        Returns:
            [B] int32 frame counts, a ``jax.Array`` for ``jax.Array`` input, else ``np.ndarray``.
        """
        xp = jnp if isinstance(lengths, jax.Array) else np
        n = xp.asarray(lengths).astype(xp.int32)
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            n = conv_output_length(n, k, s)
        return n

    def num_frames(self, num_samples: int) -> int:
        """`frame_lengths` of one utterance of ``num_samples`` samples, as an int."""
        return int(self.frame_lengths(np.asarray([int(num_samples)]))[0])

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Builds the config from a transformers ``config.json`` dict.

        Fields we do not implement but that change the forward pass (adapters, batch-norm
        positional conv) are rejected with an error naming the field.
        """
        config = dict(config)
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config field 'model_type' = {model_type!r}: expected one of "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        unsupported = {
            "add_adapter": (False, None),
            "adapter_attn_dim": (None,),
            "conv_pos_batch_norm": (False, None),
        }
        for field, allowed in unsupported.items():
            if config.get(field) not in allowed:
                raise ConfigError(
                    f"config field {field!r} = {config[field]!r}: not supported by sslsim-jax "
                    f"(supported: {allowed[0]!r})"
                )
        required = (
            "conv_dim",
            "conv_kernel",
            "conv_stride",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        missing = [f for f in required if f not in config]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        architectures = config.get("architectures") or []
        return cls(
            model_type=model_type,
            conv_dim=tuple(int(v) for v in config["conv_dim"]),
            conv_kernel=tuple(int(v) for v in config["conv_kernel"]),
            conv_stride=tuple(int(v) for v in config["conv_stride"]),
            conv_bias=bool(config.get("conv_bias", False)),
            feat_extract_norm=config.get("feat_extract_norm", "group"),
            feat_extract_activation=config.get("feat_extract_activation", "gelu"),
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            hidden_act=config.get("hidden_act", "gelu"),
            num_conv_pos_embeddings=int(config.get("num_conv_pos_embeddings", 128)),
            num_conv_pos_embedding_groups=int(config.get("num_conv_pos_embedding_groups", 16)),
            do_stable_layer_norm=bool(config.get("do_stable_layer_norm", False)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            # Only HuBERT can switch off the projection LayerNorm; wav2vec 2.0 always has it.
            feat_proj_layer_norm=(
                bool(config.get("feat_proj_layer_norm", True)) if model_type == "hubert" else True
            ),
            ctc_head=any(a.endswith("ForCTC") for a in architectures),
            vocab_size=config.get("vocab_size"),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads a transformers ``config.json``; errors name the file."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no such file (expected a transformers config.json)"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_config(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
