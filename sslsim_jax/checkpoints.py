"""Loading models: transformers checkpoint directories, converted (orbax) directories, hub ids.

A *converted* directory holds the transformers ``config.json``, the Flax params saved with
orbax-checkpoint under ``params/``, and a marker file ``sslsim_jax.json``. Loading it needs
neither torch nor a conversion step, and gives bit-identical params.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sslsim_jax.convert.hf import (
    CheckpointError,
    convert_state_dict,
    find_weights,
    has_ctc_head,
    read_state_dict,
)
from sslsim_jax.models.config import ModelConfig
from sslsim_jax.models.modules import SpeechEncoder

MARKER = "sslsim_jax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 2  # 2: transformer block params stacked along a leading layer axis
HUB_PATTERNS = [
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
]


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{flax_path: shape}`` of the params ``SpeechEncoder(config)`` expects."""
    module = SpeechEncoder(config)
    samples = max(config.receptive_field, 1)
    abstract = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, samples), jnp.float32)
    )
    flat = flax.traverse_util.flatten_dict(abstract["params"])
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def is_converted_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def is_hf_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and find_weights(path) is not None


def convert_hf_dir(path: str | os.PathLike, *, param_dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Reads and converts a transformers checkpoint directory; errors name the directory."""
    config = ModelConfig.from_json_file(os.path.join(path, "config.json"))
    state_dict = read_state_dict(path)
    if has_ctc_head(state_dict) and not config.ctc_head:
        # Hand-written configs may lack `architectures`; the lm_head keys say it is CTC.
        config = _with_ctc_head(config, state_dict)
    try:
        params = convert_state_dict(
            state_dict, config, expected_shapes=param_shapes(config), param_dtype=param_dtype
        )
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, params


def _with_ctc_head(config: ModelConfig, state_dict: dict) -> ModelConfig:
    vocab = np.shape(state_dict.get("lm_head.weight", np.zeros((config.vocab_size or 0, 0))))[0]
    return dataclasses.replace(config, ctc_head=True, vocab_size=int(vocab))


def save_converted(
    config_source: str | os.PathLike, params: Any, destination: str | os.PathLike, **info: Any
) -> str:
    """Saves params with orbax next to a copy of the transformers ``config.json``.

    Args:
        config_source: the ``config.json`` to copy (the transformers one, unchanged).
        params: the params pytree.
        destination: directory to create (must not already hold a converted model).
        **info: extra provenance written into the marker file.

    Returns:
        The absolute destination path.
    """
    import orbax.checkpoint as ocp

    destination = os.path.abspath(destination)
    params_dir = os.path.join(destination, PARAMS_DIR)
    if os.path.exists(params_dir):
        raise FileExistsError(f"{destination}: already holds converted params ({PARAMS_DIR}/)")
    os.makedirs(destination, exist_ok=True)
    shutil.copyfile(config_source, os.path.join(destination, "config.json"))
    preprocessor = os.path.join(os.path.dirname(config_source), "preprocessor_config.json")
    if os.path.isfile(preprocessor):
        shutil.copyfile(preprocessor, os.path.join(destination, "preprocessor_config.json"))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, jax.tree.map(np.asarray, params))
    marker = {"format_version": FORMAT_VERSION, **info}
    with open(os.path.join(destination, MARKER), "w") as f:
        json.dump(marker, f, indent=2)
    return destination


def load_converted(path: str | os.PathLike, *, param_dtype=None) -> tuple[ModelConfig, dict]:
    """Loads a directory written by ``save_converted``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/{MARKER}: not valid JSON ({e})") from None
    if marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}/{MARKER}: format_version {marker.get('format_version')!r}, "
            f"expected {FORMAT_VERSION}"
        )
    config = ModelConfig.from_json_file(os.path.join(path, "config.json"))
    if marker.get("ctc_head") and not config.ctc_head:
        config = dataclasses.replace(config, ctc_head=True, vocab_size=marker["vocab_size"])
    params_dir = os.path.join(path, PARAMS_DIR)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir)
        params = jax.tree.map(np.asarray, params)
    except Exception as e:  # orbax raises many kinds for a damaged file; all mean the same here
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{params_dir}: damaged or incomplete orbax checkpoint of model {path} "
            f"({type(e).__name__}: {detail[:200]}); convert the model again"
        ) from None
    shapes = param_shapes(config)
    flat = flax.traverse_util.flatten_dict(params)
    if set(flat) != set(shapes):
        diff = sorted("/".join(p) for p in set(flat) ^ set(shapes))
        raise CheckpointError(f"{path}: params do not match config.json: {', '.join(diff)}")
    for key, value in flat.items():
        if tuple(value.shape) != shapes[key]:
            raise CheckpointError(
                f"{path}: param {'/'.join(key)} has shape {value.shape}, config expects "
                f"{shapes[key]}"
            )
    if param_dtype is not None:
        params = jax.tree.map(lambda a: a.astype(param_dtype), params)
    return config, params


def resolve(path_or_hub_id: str | os.PathLike, **hub_kwargs: Any) -> str:
    """A local directory for ``path_or_hub_id``: the path itself, or a hub snapshot.

    Hub ids are fetched (or found in the cache) by ``huggingface_hub.snapshot_download``;
    ``hub_kwargs`` (``cache_dir``, ``revision``, ``local_files_only``, ``token``) pass through.
    """
    path = os.fspath(path_or_hub_id)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise NotADirectoryError(
                f"{path}: expected a model directory (config.json plus weights), got a file"
            )
        return path
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1 or not path
    if looks_like_path:
        raise FileNotFoundError(f"{path}: no such model directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=path, allow_patterns=HUB_PATTERNS, **hub_kwargs)
    except Exception as e:
        raise FileNotFoundError(
            f"{path}: not a local directory, and the hub id could not be fetched or found in "
            f"the cache ({type(e).__name__}: {e})"
        ) from None


def load_config_and_params(
    path_or_hub_id: str | os.PathLike, *, param_dtype=np.float32, **hub_kwargs: Any
) -> tuple[ModelConfig, dict, str]:
    """Config, params and the resolved directory for anything ``load_model`` accepts."""
    path = resolve(path_or_hub_id, **hub_kwargs)
    if is_converted_dir(path):
        config, params = load_converted(path, param_dtype=param_dtype)
    elif is_hf_dir(path):
        config, params = convert_hf_dir(path, param_dtype=param_dtype)
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path}: no config.json; expected a transformers checkpoint directory (config.json "
            f"plus model.safetensors or pytorch_model.bin) or an sslsim-jax converted directory "
            f"(config.json, {PARAMS_DIR}/ and {MARKER})"
        )
    else:
        raise FileNotFoundError(
            f"{path}: has config.json but no weights; expected model.safetensors, "
            f"pytorch_model.bin (or their .index.json) or an sslsim-jax converted checkpoint "
            f"({PARAMS_DIR}/ and {MARKER})"
        )
    return config, params, path


def convert_directory(
    source: str | os.PathLike, destination: str | os.PathLike, *, param_dtype=np.float32
) -> str:
    """Converts a transformers checkpoint directory (or hub id) into a converted directory."""
    path = resolve(source)
    if not is_hf_dir(path):
        raise FileNotFoundError(
            f"{path}: not a transformers checkpoint directory (expected config.json plus "
            f"model.safetensors or pytorch_model.bin)"
        )
    config, params = convert_hf_dir(path, param_dtype=param_dtype)
    return save_converted(
        os.path.join(path, "config.json"),
        params,
        destination,
        source=os.fspath(source),
        ctc_head=config.ctc_head,
        vocab_size=config.vocab_size,
    )
