"""The built-in demonstration: no downloads, two small models shipped as configs, seeded weights.

It shows the data flow end to end on synthetic speech-like audio: every layer's hidden states
from ``SpeechModel.intermediates`` stream, batch by batch and masked to valid frames, into
``sslsim_jax.compare``, which returns every layer-pair similarity.
"""

from __future__ import annotations

import json
import os
from importlib import resources

import jax
import numpy as np
import pandas as pd

from sslsim_jax.intermediates import SpeechModel
from sslsim_jax.models import ModelConfig
from sslsim_jax.models.modules import SpeechEncoder

DEMO_MODELS = ("tiny_wav2vec2", "tiny_hubert")


def demo_model(name: str, *, seed: int = 0) -> SpeechModel:
    """A small model from a config shipped in ``sslsim_jax/data``, with seeded random weights."""
    text = resources.files("sslsim_jax").joinpath("data", f"{name}.json").read_text()
    config = ModelConfig.from_hf_config(json.loads(text))
    dummy = np.zeros((1, config.receptive_field), np.float32)
    params = SpeechEncoder(config).init(jax.random.key(seed), dummy)["params"]
    return SpeechModel(config, params, path=f"<built-in {name}, seed {seed}>")


def synthetic_speech(count: int, seconds: float, *, seed: int = 0) -> list[np.ndarray]:
    """Speech-like test signals: harmonic voices with gliding pitch, syllable-rate amplitude
    modulation and noise; lengths vary between half and all of ``seconds``; zero mean, unit
    variance (as the feature extractor normalises)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(16000 * seconds * rng.uniform(0.5, 1.0))
        t = np.arange(n) / 16000
        f0 = rng.uniform(90, 240) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        voice = sum(np.sin(k * phase) / k for k in range(1, 8))
        envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t))
        x = voice * envelope + 0.05 * rng.standard_normal(n)
        out.append(((x - x.mean()) / x.std()).astype(np.float32))
    return out


def pad(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[B, S] zero-padded waveforms and [B] lengths."""
    lengths = np.array([len(x) for x in batch])
    out = np.zeros((len(batch), lengths.max()), np.float32)
    for i, x in enumerate(batch):
        out[i, : len(x)] = x
    return out, lengths


def run(
    *,
    out: str | os.PathLike | None = None,
    utterances: int = 8,
    seconds: float = 2.0,
    batch_size: int = 4,
    metrics: tuple[str, ...] = ("linear_cka", "svcca", "maxcorr"),
    seed: int = 0,
) -> pd.DataFrame:
    """Runs the demonstration and returns the tidy similarity table.

    Args:
        out: directory to write ``similarities.csv`` into (None: write nothing).
        utterances, seconds: how much synthetic audio.
        batch_size: utterances per padded batch.
        metrics: metric names understood by ``sslsim_jax.compare``.
        seed: seeds the weights and the audio.
    """
    from sslsim_jax.pairwise import compare

    models = {name: demo_model(name, seed=seed + i) for i, name in enumerate(DEMO_MODELS)}
    audio = synthetic_speech(utterances, seconds, seed=seed)

    def batches():
        for start in range(0, len(audio), batch_size):
            waveforms, lengths = pad(audio[start : start + batch_size])
            networks, mask = {}, None
            for name, model in models.items():
                inter = model.intermediates(waveforms, lengths)
                mask = np.asarray(inter.frame_mask).reshape(-1)  # [B, T] -> [B*T]
                hidden = np.asarray(inter.hidden_states)
                for layer in range(hidden.shape[0]):
                    # [B, T, D] -> [B*T, D]; padded frames are masked out by `where`.
                    networks[f"{name}:{layer}"] = hidden[layer].reshape(-1, hidden.shape[-1])
            yield networks, mask

    table = compare(batches(), metrics=list(metrics))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "similarities.csv")
        tmp = path + ".tmp"
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    return table
