"""Checkpoint conversion: transformers (PyTorch) Wav2Vec2/HuBERT -> sslsim-jax Flax params.

Command line: ``python -m convert SRC DST`` (or ``sslsim convert SRC DST``).
"""
