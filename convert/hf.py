"""transformers Wav2Vec2/HuBERT checkpoints -> sslsim-jax Flax params.

``convert_state_dict`` is a pure function from a flat ``{torch_name: array}`` dict to the params
pytree of ``sslsim_jax.models.SpeechEncoder``, driven by one explicit name map (``name_map``).
``read_state_dict`` is the I/O edge: it reads ``model.safetensors`` or ``pytorch_model.bin``
(optionally sharded with an index file) from a checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Literal

import numpy as np

from sslsim_jax.models.config import ModelConfig

# Keys that pre-training checkpoints carry and inference does not use. The one place they are
# listed: anything else the name map does not consume is an error.
DROPPED_PREFIXES = (
    "quantizer.",  # wav2vec 2.0 codebooks (Wav2Vec2ForPreTraining)
    "project_q.",  # projection of quantized targets
    "project_hid.",  # projection of context vectors for the contrastive loss
    "masked_spec_embed",  # SpecAugment mask embedding, training only
    "final_proj.",  # HuBERT pre-training projection (fairseq ports)
    "label_embs_concat",  # HuBERT pre-training cluster embeddings (fairseq ports)
    "dropout_features",
)
MODEL_PREFIXES = ("wav2vec2.", "hubert.")
WEIGHT_NORM_RENAMES = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}

Kind = Literal["linear", "conv", "vector", "weight_norm_conv"]


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: missing, unexpected or misshapen keys."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Flax parameter and the PyTorch name(s) it comes from."""

    torch_key: str
    flax_path: tuple[str, ...]
    kind: Kind
    layer: int | None = None  # transformer block index: stacked along the leading axis


def name_map(config: ModelConfig) -> list[Entry]:
    """The explicit PyTorch -> Flax name map for ``config``.

    Linear weights [out, in] become kernels [in, out]; conv weights [out, in, k] become
    [k, in, out]; the positional conv's weight norm (``weight_g``, ``weight_v``; dim 2) is folded
    into one kernel.
    """
    entries: list[Entry] = []

    def linear(torch_prefix: str, *path: str, layer: int | None = None):
        entries.append(Entry(f"{torch_prefix}.weight", (*path, "kernel"), "linear", layer))
        entries.append(Entry(f"{torch_prefix}.bias", (*path, "bias"), "vector", layer))

    def norm(torch_prefix: str, *path: str, layer: int | None = None):
        entries.append(Entry(f"{torch_prefix}.weight", (*path, "scale"), "vector", layer))
        entries.append(Entry(f"{torch_prefix}.bias", (*path, "bias"), "vector", layer))

    fe = "feature_extractor"
    for i in range(len(config.conv_dim)):
        conv = (fe, f"conv_layers_{i}_conv")
        entries.append(Entry(f"{fe}.conv_layers.{i}.conv.weight", (*conv, "kernel"), "conv"))
        if config.conv_bias:
            entries.append(Entry(f"{fe}.conv_layers.{i}.conv.bias", (*conv, "bias"), "vector"))
        if config.feat_extract_norm == "layer" or i == 0:
            norm(f"{fe}.conv_layers.{i}.layer_norm", fe, f"conv_layers_{i}_norm")
    if config.feat_proj_layer_norm:
        norm("feature_projection.layer_norm", "feature_projection_layer_norm")
    linear("feature_projection.projection", "feature_projection")
    pos_t, pos = "encoder.pos_conv_embed.conv", ("encoder", "pos_conv_embed", "conv")
    entries.append(Entry(f"{pos_t}.weight", (*pos, "kernel"), "weight_norm_conv"))
    entries.append(Entry(f"{pos_t}.bias", (*pos, "bias"), "vector"))
    norm("encoder.layer_norm", "encoder", "layer_norm")
    f = ("encoder", "layers")  # the scanned blocks: one stacked [L, ...] array per name
    for i in range(config.num_hidden_layers):
        t = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{t}.attention.{proj}", *f, "attention", proj, layer=i)
        norm(f"{t}.layer_norm", *f, "layer_norm", layer=i)
        norm(f"{t}.final_layer_norm", *f, "final_layer_norm", layer=i)
        ff = (*f, "feed_forward")
        linear(f"{t}.feed_forward.intermediate_dense", *ff, "intermediate_dense", layer=i)
        linear(f"{t}.feed_forward.output_dense", *ff, "output_dense", layer=i)
    if config.ctc_head:
        linear("lm_head", "lm_head")
    return entries


def normalise_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips ``wav2vec2.``/``hubert.`` prefixes, renames weight-norm parametrizations, and drops
    the pre-training keys of ``DROPPED_PREFIXES``."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = key
        for prefix in MODEL_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        for old, new in WEIGHT_NORM_RENAMES.items():
            name = name.replace(old, new)
        if name.startswith(DROPPED_PREFIXES):
            continue
        if name in out:
            raise CheckpointError(f"checkpoint has {key!r} twice (with and without a prefix)")
        out[name] = value
    return out


def has_ctc_head(state_dict: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith("lm_head.") for k in state_dict)


def _fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """w = g * v / ||v||, the norm over every axis but 2 (torch ``weight_norm(dim=2)``)."""
    v64 = v.astype(np.float64)
    norm = np.sqrt(np.sum(np.square(v64), axis=(0, 1), keepdims=True))
    return (g.astype(np.float64) * v64 / norm).astype(np.float32)


def _torch_layout(flax_shape: tuple[int, ...], kind: Kind) -> tuple[int, ...]:
    return tuple(reversed(flax_shape)) if kind != "vector" else tuple(flax_shape)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: ModelConfig,
    *,
    expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]] | None = None,
    param_dtype: np.dtype | type = np.float32,
) -> dict:
    """Converts a transformers state dict to the params pytree for ``config``.

    Args:
        state_dict: flat ``{torch_name: array}``, with or without ``wav2vec2.``/``hubert.``
            prefixes; either weight-norm storage format of the positional conv.
        config: the architecture the params are for.
        expected_shapes: ``{flax_path: shape}`` of the module's params (see
            ``sslsim_jax.checkpoints.param_shapes``); when given, every array is checked.
        param_dtype: dtype of the returned arrays.

    Returns:
        Nested dict of numpy arrays, the ``params`` collection of ``SpeechEncoder``.

    Raises:
        CheckpointError: listing every missing key, every unexpected key, or a key whose shape
            does not match the config (with both shapes, in PyTorch layout).
    """
    tensors = normalise_names(state_dict)
    entries = name_map(config)
    used: set[str] = set()
    missing: list[str] = []
    params: dict = {}
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for entry in entries:
        if entry.kind == "weight_norm_conv":
            stem = entry.torch_key[: -len(".weight")]
            if f"{stem}.weight_g" in tensors or f"{stem}.weight_v" in tensors:
                sources = [f"{stem}.weight_g", f"{stem}.weight_v"]
            else:
                sources = [entry.torch_key]  # already folded
        else:
            sources = [entry.torch_key]
        absent = [s for s in sources if s not in tensors]
        if absent:
            missing.extend(absent)
            continue
        used.update(sources)
        arrays = [np.asarray(tensors[s]) for s in sources]
        torch_value = _fold_weight_norm(*arrays) if len(arrays) == 2 else arrays[0]
        if expected_shapes is not None:
            shape = expected_shapes[entry.flax_path]
            want = _torch_layout(shape[1:] if entry.layer is not None else shape, entry.kind)
            if tuple(torch_value.shape) != want:
                key = sources[-1]
                raise CheckpointError(
                    f"{key}: checkpoint shape {tuple(torch_value.shape)} does not match "
                    f"shape {want} expected from config"
                )
        value = np.ascontiguousarray(torch_value.T if entry.kind != "vector" else torch_value)
        if entry.layer is not None:
            stacked.setdefault(entry.flax_path, {})[entry.layer] = value
        else:
            _place(params, entry.flax_path, value.astype(param_dtype))
    unexpected = sorted(set(tensors) - used)
    problems = []
    if missing:
        problems.append(f"missing key(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {', '.join(unexpected)}")
    if problems:
        raise CheckpointError("; ".join(problems))
    for path, layers in stacked.items():
        # [L] arrays of one block parameter -> [L, ...]
        value = np.stack([layers[i] for i in range(config.num_hidden_layers)])
        _place(params, path, value.astype(param_dtype))
    return params


def _place(params: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    node = params
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def find_weights(directory: str | os.PathLike) -> str | None:
    """The weights file (or index) of a transformers checkpoint directory, safetensors first."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            out[key] = f.get_tensor(key)
    return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading pytorch_model.bin needs torch; install the extra: "
            "pip install 'sslsim-jax[convert]' (or convert the checkpoint to safetensors)"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()}


def _read_one(path: str) -> dict[str, np.ndarray]:
    return _read_safetensors(path) if path.endswith(".safetensors") else _read_torch_bin(path)


def read_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a transformers checkpoint directory into numpy arrays."""
    path = find_weights(directory)
    if path is None:
        raise FileNotFoundError(
            f"{directory}: no weights found (expected one of {', '.join(WEIGHT_FILES)})"
        )
    if not path.endswith(".index.json"):
        return _read_one(path)
    with open(path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: index file has no 'weight_map'")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{shard_path}: shard listed in {path} does not exist")
        out.update(_read_one(shard_path))
    return out
