"""Builders of random-weight transformers Wav2Vec2/HuBERT checkpoints for the tests.

The models are built from configs, given weights large enough that attention is far from
uniform, and saved with ``save_pretrained``: the tests exercise the real loading path.
"""

from __future__ import annotations

import os

import numpy as np

TINY = dict(
    hidden_size=36,  # not a power of two
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=40,
    conv_dim=(16, 24, 16),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=6,
    num_conv_pos_embedding_groups=3,
)

# Layouts by config fields, never by size.
GROUP_POST_LN = dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
LAYER_PRE_LN = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


def make_config(model_type: str, **overrides):
    from transformers import HubertConfig, Wav2Vec2Config

    cls = {"wav2vec2": Wav2Vec2Config, "hubert": HubertConfig}[model_type]
    return cls(**{**overrides, "attn_implementation": "eager"})


def randomise(model, seed: int = 0, qk_gain: float = 2.0) -> None:
    """Weights ~ N(0, 1/fan_in), norms 1 ± 0.1, biases ± 0.1; attention maps far from uniform."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.1 * noise)
            elif "original0" in name or name.endswith("weight_g"):
                p.copy_(1.0 + 0.1 * noise.abs())
            else:
                fan_in = int(np.prod(p.shape[1:]))
                # Larger query/key weights (logits of std ~qk_gain²), so peaked attention maps.
                gain = qk_gain if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(gain * noise / np.sqrt(fan_in))


def build(
    path: str | os.PathLike,
    model_type: str,
    *,
    ctc: bool = False,
    seed: int = 0,
    qk_gain: float = 2.0,
    **cfg,
):
    """Builds, randomises and saves a transformers model; returns the torch model (eval mode)."""
    import torch
    from transformers import HubertForCTC, HubertModel, Wav2Vec2ForCTC, Wav2Vec2Model

    classes = {
        ("wav2vec2", False): Wav2Vec2Model,
        ("wav2vec2", True): Wav2Vec2ForCTC,
        ("hubert", False): HubertModel,
        ("hubert", True): HubertForCTC,
    }
    config = make_config(model_type, **cfg)
    torch.manual_seed(seed)
    model = classes[model_type, ctc](config).eval()
    randomise(model, seed, qk_gain)
    model.save_pretrained(path)
    return model


def torch_outputs(model, waveforms: np.ndarray) -> dict:
    """transformers' hidden states, attentions and logits as numpy arrays."""
    import torch

    with torch.no_grad():
        out = model(
            torch.from_numpy(np.asarray(waveforms, np.float32)),
            output_hidden_states=True,
            output_attentions=True,
        )
    return {
        "hidden_states": np.stack([h.numpy() for h in out.hidden_states]),
        "attentions": np.stack([a.numpy() for a in out.attentions]),
        "logits": out.logits.numpy() if hasattr(out, "logits") else None,
        "last_hidden_state": getattr(out, "last_hidden_state", None),
    }


def waveform(samples: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    """Speech-like test input: a few harmonics with noise, zero mean, unit variance."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000.0
    out = []
    for _ in range(batch):
        f0 = rng.uniform(90, 250)
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
        x = x * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.3 * rng.standard_normal(samples)
        out.append((x - x.mean()) / x.std())
    return np.stack(out).astype(np.float32)
