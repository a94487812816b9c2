"""sslsim-jax converted checkpoints -> transformers directories (the reverse of ``hf``).

``export_state_dict`` inverts ``sslsim_jax.convert.hf.convert_state_dict`` through the same name
map (``hf.name_map``): kernels go back to PyTorch layout and the stacked block params are split
per layer. The positional conv's folded kernel w is written as weight norm with
``weight_v = w`` and ``weight_g = ‖w‖`` (norm over every axis but 2), which reproduces w.
``export_directory`` writes ``config.json`` and ``model.safetensors`` (plus ``vocab.json`` and
the tokenizer config of CTC models), loadable with ``Wav2Vec2Model`` / ``HubertModel`` or
``Wav2Vec2ForCTC`` / ``HubertForCTC``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from sslsim_jax.convert.hf import CheckpointError, name_map

from sslsim_jax.models.config import ModelConfig

COPIED_FILES = ("preprocessor_config.json", "vocab.json", "tokenizer_config.json")
MODEL_CLASSES = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert"}


def _get(params: dict, path: tuple[str, ...]) -> np.ndarray:
    node = params
    for part in path:
        if part not in node:
            raise CheckpointError(f"params lack {'/'.join(path)}")
        node = node[part]
    return np.asarray(node, np.float32)


def export_state_dict(
    params: dict, config: ModelConfig, *, masked_spec_embed: bool = True
) -> dict[str, np.ndarray]:
    """The transformers state dict ``{torch_name: array}`` of ``SpeechEncoder(config)`` params.

    CTC models (``config.ctc_head``) get the ``wav2vec2.``/``hubert.`` prefix the ``*ForCTC``
    classes expect; ``lm_head.*`` stays unprefixed. With ``masked_spec_embed`` (transformers
    builds that param when the config's ``mask_time_prob`` or ``mask_feature_prob`` is
    positive) it is written as zeros: SpecAugment's mask embedding is training-only and
    converted checkpoints do not keep it.
    """
    prefix = f"{config.model_type}." if config.ctc_head else ""
    out: dict[str, np.ndarray] = {}
    for entry in name_map(config):
        value = _get(params, entry.flax_path)
        if entry.layer is not None:
            value = value[entry.layer]
        if entry.kind != "vector":
            value = value.T  # [in, out] -> [out, in]; [k, in, out] -> [out, in, k]
        value = np.ascontiguousarray(value)
        name = (
            entry.torch_key if entry.torch_key.startswith("lm_head") else prefix + entry.torch_key
        )
        if entry.kind == "weight_norm_conv":
            stem = name[: -len(".weight")]
            norm = np.sqrt(np.sum(np.square(value.astype(np.float64)), axis=(0, 1), keepdims=True))
            out[f"{stem}.weight_g"] = norm.astype(np.float32)
            out[f"{stem}.weight_v"] = value
        else:
            out[name] = value
    if masked_spec_embed:
        out[f"{prefix}masked_spec_embed"] = np.zeros((config.hidden_size,), np.float32)
    return out


def hf_config_dict(source_config: dict, config: ModelConfig) -> dict:
    """``source_config`` (a config.json dict) with ``architectures`` and ``vocab_size`` set for
    the model class that matches ``config``."""
    stem = MODEL_CLASSES[config.model_type]
    out = dict(source_config)
    if config.ctc_head:
        out.update(architectures=[f"{stem}ForCTC"], vocab_size=config.vocab_size)
        out.setdefault("pad_token_id", 0)
    else:
        out["architectures"] = [f"{stem}Model"]
    return out


def export_directory(source: str | os.PathLike, destination: str | os.PathLike) -> str:
    """Writes the model at ``source`` (anything ``sslsim_jax.load_model`` reads) as a
    transformers directory ``destination`` (which must not hold a model already)."""
    from safetensors.numpy import save_file

    from sslsim_jax.checkpoints import load_config_and_params

    config, params, path = load_config_and_params(source)
    destination = os.path.abspath(destination)
    target = os.path.join(destination, "model.safetensors")
    if os.path.exists(target):
        raise FileExistsError(f"{target}: already exists; choose a new destination")
    with open(os.path.join(path, "config.json")) as f:
        source_config = json.load(f)
    os.makedirs(destination, exist_ok=True)
    with open(os.path.join(destination, "config.json"), "w") as f:
        json.dump(hf_config_dict(source_config, config), f, indent=2)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(path, name)):
            shutil.copyfile(os.path.join(path, name), os.path.join(destination, name))
    # transformers' defaults: mask_time_prob 0.05, mask_feature_prob 0.0.
    spec_augment = (
        source_config.get("mask_time_prob", 0.05) > 0
        or source_config.get("mask_feature_prob", 0.0) > 0
    )
    state_dict = export_state_dict(params, config, masked_spec_embed=spec_augment)
    save_file(state_dict, target, metadata={"format": "pt"})
    return destination
