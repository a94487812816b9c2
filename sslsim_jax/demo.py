"""The built-in default: the whole analysis with no downloads.

The demo compares the small models trained by ``scripts/train_demo_models.py`` and shipped as
converted checkpoints in ``sslsim_jax/data/models/<name>/`` (`model_paths`): pre-trained
models (HuBERT-style masked prediction; wav2vec 2.0-style contrastive where shipped), their CTC
fine-tuned counterparts, and a randomly initialised model of the same shape as a baseline.
They run over the speech clips shipped in ``sslsim_jax/data/speech`` (see SOURCE.md there)
through ``sslsim_jax.analysis.analyze``.

`demo_model` and `finetuned_variant` build seeded random models from the configs shipped in
``sslsim_jax/data`` (a wav2vec 2.0-style model: group norm, post-LN; a HuBERT-style model:
layer norm, pre-LN); the tests use them, and the demo falls back to them when no trained
model is shipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources

import jax
import jax.numpy as jnp
import pandas as pd

from sslsim_jax.intermediates import SpeechModel
from sslsim_jax.models import ModelConfig
from sslsim_jax.models.modules import SpeechEncoder


def demo_config(name: str) -> ModelConfig:
    text = resources.files("sslsim_jax").joinpath("data", f"{name}.json").read_text()
    return ModelConfig.from_hf_config(json.loads(text))


def _init(config: ModelConfig, seed: int):
    # Jitted: one compilation instead of one per op of eager flax init (measured for the
    # demo's random-init model: 4.5 s instead of 13.4 s on 2 shared cores; same values).
    dummy = jnp.zeros((1, config.receptive_field), jnp.float32)
    return jax.jit(SpeechEncoder(config).init)(jax.random.key(seed), dummy)["params"]


def demo_model(name: str, *, seed: int = 0) -> SpeechModel:
    """A small model from a config shipped in ``sslsim_jax/data``, with seeded random weights."""
    config = demo_config(name)
    return SpeechModel(config, _init(config, seed), path=f"<built-in {name}, seed {seed}>")


def finetuned_variant(base: SpeechModel, *, seed: int = 0, vocab_size: int = 32) -> SpeechModel:
    """A CTC model whose block i weights are the base's plus noise of relative size 0.1·i/L."""
    config = dataclasses.replace(base.config, ctc_head=True, vocab_size=vocab_size)
    fresh = _init(config, seed)
    layers = config.num_hidden_layers
    key = jax.random.key(seed + 1000)

    def perturb(path, value):
        nonlocal key
        if "layers" not in [getattr(p, "key", "") for p in path]:
            return value
        # Block params are stacked [L, ...]: block i gets noise of relative size 0.1·(i+1)/L.
        depth = jnp.arange(1, layers + 1, dtype=value.dtype) / layers
        depth = depth.reshape((layers,) + (1,) * (value.ndim - 1))
        scale = jnp.std(value, axis=tuple(range(1, value.ndim)), keepdims=True)
        key, sub = jax.random.split(key)
        return value + 0.1 * depth * scale * jax.random.normal(sub, value.shape, value.dtype)

    params = jax.tree_util.tree_map_with_path(perturb, base.params)
    params = {**params, "lm_head": fresh["lm_head"]}
    return SpeechModel(config, params, path=f"<built-in fine-tuned variant of {base.path}>")


def model_paths() -> dict[str, str]:
    """``{name: directory}`` of the trained demo models shipped in ``sslsim_jax/data/models``,
    each loadable by ``sslsim_jax.load_model``; sorted by name."""
    from sslsim_jax.checkpoints import is_converted_dir

    root = resources.files("sslsim_jax").joinpath("data", "models")
    if not root.is_dir():
        return {}
    return {
        entry.name: str(entry)
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.is_dir() and is_converted_dir(str(entry))
    }


def demo_models(seed: int = 0) -> list[tuple[str, SpeechModel]]:
    """The demo's models: the shipped trained models and ``random-init``, seeded random weights
    in the shape of the first pre-trained one (no CTC head); without shipped models, seeded
    random ones.
    """
    from sslsim_jax.intermediates import load_model

    paths = model_paths()
    if not paths:
        base = demo_model("tiny_wav2vec2", seed=seed)
        return [
            ("tiny-wav2vec2", base),
            ("tiny-wav2vec2-ft", finetuned_variant(base, seed=seed)),
            ("tiny-hubert", demo_model("tiny_hubert", seed=seed + 1)),
        ]
    models = [(name, load_model(path)) for name, path in paths.items()]
    pretrained = next((m for name, m in models if not m.config.ctc_head), models[0][1])
    config = dataclasses.replace(pretrained.config, ctc_head=False, vocab_size=None)
    random = SpeechModel(config, _init(config, seed), path=f"<random init, seed {seed}>")
    return [*models, ("random-init", random)]


def run(
    *,
    out: str | os.PathLike = "demo-report",
    progress: bool = True,
    report: bool = True,
    settings=None,
) -> pd.DataFrame:
    """Runs the demonstration analysis into ``out`` and returns the similarity table."""
    from sslsim_jax import audio
    from sslsim_jax.analysis import Settings, analyze

    settings = settings or Settings(
        metrics=("maxcorr", "linreg", "svcca", "pwcca", "linear_cka", "debiased_cka"),
        attention=True,
        bootstrap=20,
        batch_seconds=20.0,
    )
    return analyze(
        demo_models(), audio.demo_audio_paths(), out, settings, progress=progress, report=report
    )
