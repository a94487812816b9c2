"""Checkpoint conversion: transformers (PyTorch) Wav2Vec2/HuBERT -> sslsim-jax Flax params.

This folder installs as ``sslsim_jax.convert`` (never as a top-level ``convert`` module).
Command line: ``sslsim convert SRC DST``.
"""
