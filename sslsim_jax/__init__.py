"""sslsim-jax: inter- and intra-model similarity of wav2vec 2.0 and HuBERT models, in JAX."""

__version__ = "0.1.0"
