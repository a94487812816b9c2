"""sslsim-jax: inter- and intra-model similarity of wav2vec 2.0 and HuBERT models, in JAX."""

__version__ = "0.1.0"

from sslsim_jax.intermediates import Intermediates, SpeechModel, load_model
from sslsim_jax.models import ModelConfig
from sslsim_jax.pairwise import compare

__all__ = ["Intermediates", "ModelConfig", "SpeechModel", "compare", "load_model"]
