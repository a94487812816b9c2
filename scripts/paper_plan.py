"""The plan of the paper's full grid: 8 full-size models, every layer, under memory budgets.

Writes the config.json of each of the paper's models (base and large wav2vec 2.0 and HuBERT,
pre-trained and CTC fine-tuned; transformers' full-size configs, no weights) into a temporary
folder and prints ``sslsim analyze MODELS --plan --max-memory SIZE`` for each budget: the groups,
passes, bytes per pass and the forward passes they imply. Nothing is run.

    python scripts/paper_plan.py --budgets 80G 16G
"""

from __future__ import annotations

import argparse
import os
import tempfile

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
LARGE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    conv_bias=True,
)
# name: (model type, size, CTC head); names as the hub ids the paper's models have.
MODELS = {
    "wav2vec2-base": ("wav2vec2", BASE, False),
    "wav2vec2-base-960h": ("wav2vec2", BASE, True),
    "hubert-base-ls960": ("hubert", BASE, False),
    "hubert-base-ft": ("hubert", BASE, True),
    "wav2vec2-large-lv60": ("wav2vec2", LARGE, False),
    "wav2vec2-large-960h-lv60-self": ("wav2vec2", LARGE, True),
    "hubert-large-ll60k": ("hubert", LARGE, False),
    "hubert-large-ls960-ft": ("hubert", LARGE, True),
}


def write_configs(folder: str, names: list[str] | None = None) -> list[str]:
    """Writes the config.json of each model of ``names`` (default: all of `MODELS`) into its
    own folder under ``folder``; returns the folders."""
    from transformers import HubertConfig, Wav2Vec2Config

    paths = []
    for name in names or MODELS:
        kind, size, ctc = MODELS[name]
        cls = {"wav2vec2": Wav2Vec2Config, "hubert": HubertConfig}[kind]
        arch = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert"}[kind]
        config = cls(**size, architectures=[f"{arch}ForCTC" if ctc else f"{arch}Model"])
        path = os.path.join(folder, name)
        config.save_pretrained(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["80G", "16G"])
    parser.add_argument("--bootstrap", type=int, default=0)
    args = parser.parse_args()
    from sslsim_jax.analysis import Settings
    from sslsim_jax.analysis.run import describe_plan

    with tempfile.TemporaryDirectory() as folder:
        paths = write_configs(folder)
        for budget in args.budgets:
            settings = Settings(max_memory=budget, bootstrap=args.bootstrap)
            print(f"$ sslsim analyze <8 models> --plan --max-memory {budget}")
            print(describe_plan(paths, settings))
            print()


if __name__ == "__main__":
    main()
