"""The analysis: models and audio in, similarity tables out.

The modules follow the data flow:

- `settings`: what to compute (`Settings`, the one declaration of every option).
- `networks`: the models, their kept layers and the column order of the networks.
- `inputs`: the audio list, each process's share, batches and bootstrap weights.
- `extract`: every model over the audio, batch by batch, into the joint statistics.
- `state`: what a run accumulates, its checkpoints, its run key and the process merge.
- `tables`: every metric of every pair of networks, neuron and attention tables.
- `run`: `analyze`, composing them and writing the results (`sslsim_jax.results`).
"""

from sslsim_jax.analysis.extract import check_memory, extract
from sslsim_jax.analysis.inputs import load_audio, load_share
from sslsim_jax.analysis.networks import (
    ModelEntry,
    finetune_pairs,
    network_names,
    network_sizes,
    prepare_models,
)
from sslsim_jax.analysis.run import analyze
from sslsim_jax.analysis.settings import DTYPES, FINAL, PRECISIONS, AnalysisError, Settings
from sslsim_jax.analysis.state import STATE_DIR, State, run_key
from sslsim_jax.analysis.tables import (
    NeuronMatches,
    attention_tables,
    neuron_matches,
    neuron_tables,
    similarity_table,
)

__all__ = [
    "DTYPES",
    "FINAL",
    "PRECISIONS",
    "STATE_DIR",
    "AnalysisError",
    "ModelEntry",
    "NeuronMatches",
    "Settings",
    "State",
    "analyze",
    "attention_tables",
    "check_memory",
    "extract",
    "finetune_pairs",
    "load_audio",
    "load_share",
    "network_names",
    "network_sizes",
    "neuron_matches",
    "neuron_tables",
    "prepare_models",
    "run_key",
    "similarity_table",
]
