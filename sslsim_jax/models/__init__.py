"""Flax Wav2Vec2/HuBERT models and their configuration."""

from sslsim_jax.models.config import ConfigError, ModelConfig
from sslsim_jax.models.modules import SpeechEncoder

__all__ = ["ConfigError", "ModelConfig", "SpeechEncoder"]
