"""Trains the demo models from ``scripts/make_demo_data.py``'s output and writes them as
converted checkpoints under ``sslsim_jax/data/models/<name>/`` (CTC models with vocab.json).

Models (shapes of the shipped configs ``tiny_wav2vec2.json`` / ``tiny_hubert.json``):
``tiny-hubert`` (HuBERT masked prediction on MFCC k-means targets), ``tiny-wav2vec2``
(wav2vec 2.0 contrastive with a Gumbel product quantizer), and their CTC fine-tuned
counterparts ``tiny-hubert-ctc`` / ``tiny-wav2vec2-ctc`` (conv feature encoder frozen, the
transformer fine-tuned). Every random draw comes from ``--seed``. Metrics (losses, masked
prediction accuracy, CER on the held-out sentences, wall times) go to ``OUT/metrics.json``.

    python scripts/train_demo_models.py DATA --out sslsim_jax/data/models --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import soundfile

from sslsim_jax import audio as audio_io
from sslsim_jax import train
from sslsim_jax.checkpoints import load_converted, save_converted
from sslsim_jax.demo import demo_config
from sslsim_jax.models import ModelConfig
from sslsim_jax.models.modules import SpeechEncoder
from sslsim_jax.train.text import save_vocab

CONFIGS = {"tiny-hubert": "tiny_hubert", "tiny-wav2vec2": "tiny_wav2vec2"}


def read_split(data: str, split: str, vocab: dict) -> dict:
    """Padded normalised audio [N, S], lengths, labels [N, U] and texts of one split."""
    path = os.path.join(data, f"{split}.tsv")
    try:
        rows = [line.rstrip("\n").split("\t") for line in open(path)]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (run scripts/make_demo_data.py)") from None
    waves = [
        soundfile.read(os.path.join(data, "wav", f"{r[0]}.wav"), dtype="float32")[0] for r in rows
    ]
    lengths = np.array([len(w) for w in waves], np.int32)
    samples = -(-int(lengths.max()) // 320) * 320
    audio = np.zeros((len(waves), samples), np.float32)
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    texts = [r[2] for r in rows]
    ids = [train.encode(t, vocab) for t in texts]
    labels = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for i, x in enumerate(ids):
        labels[i, : len(x)] = x
    return {
        "audio": audio_io.normalize(audio, lengths),
        "lengths": lengths,
        "labels": labels,
        "label_lengths": np.array([len(x) for x in ids], np.int32),
        "texts": texts,
    }


def crops(data: dict, seconds: float, seed: int) -> dict:
    """One seeded random crop of ``seconds`` per utterance (shorter ones whole, padded)."""
    size = int(seconds * 16000)
    rng = np.random.default_rng(seed)
    audio = np.zeros((len(data["lengths"]), size), np.float32)
    lengths = np.minimum(data["lengths"], size).astype(np.int32)
    for i, n in enumerate(data["lengths"]):
        start = rng.integers(0, max(n - size, 0) + 1)
        audio[i, : lengths[i]] = data["audio"][i, start : start + lengths[i]]
    return {"audio": audio, "lengths": lengths}


def hf_config(config_name: str, vocab_size: int | None = None) -> dict:
    from importlib import resources

    text = resources.files("sslsim_jax").joinpath("data", f"{config_name}.json").read_text()
    config = json.loads(text)
    if vocab_size is not None:
        prefix = "Hubert" if config["model_type"] == "hubert" else "Wav2Vec2"
        config.update(architectures=[f"{prefix}ForCTC"], vocab_size=vocab_size, pad_token_id=0)
    return config


def save(out: str, name: str, config: dict, params: dict, vocab: dict | None, **info) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "config.json")
        with open(source, "w") as f:
            json.dump(config, f, indent=2)
        ctc = vocab is not None
        path = save_converted(
            source,
            params,
            os.path.join(out, name),
            ctc_head=ctc,
            vocab_size=len(vocab) if ctc else None,
            **info,
        )
    if ctc:
        save_vocab(vocab, path)
    return path


def evaluate_cer(config: ModelConfig, params: dict, split: dict, vocab: dict, batch: int = 16):
    forward = jax.jit(lambda p, a, n: SpeechEncoder(config).apply({"params": p}, a, n))
    hyps = []
    for i in range(0, len(split["texts"]), batch):
        out = forward(params, split["audio"][i : i + batch], split["lengths"][i : i + batch])
        hyps += train.decode_logits(
            np.asarray(out["logits"]), np.asarray(out["frame_lengths"]), vocab
        )
    return train.character_error_rate(split["texts"], hyps), hyps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="directory written by scripts/make_demo_data.py")
    parser.add_argument("--out", default="sslsim_jax/data/models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--ctc-steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ctc-lr", type=float, default=1e-3)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--crop-seconds", type=float, default=2.0, help="pre-training crops")
    parser.add_argument("--ctc-max-seconds", type=float, default=4.5)
    parser.add_argument("--models", default="tiny-hubert,tiny-wav2vec2")
    parser.add_argument(
        "--pretrained",
        help="directory of converted pre-trained models (e.g. sslsim_jax/data/models): "
        "skip pre-training and CTC fine-tune <dir>/<name> instead",
    )
    parser.add_argument(
        "--trajectory",
        help="also save the CTC model every --trajectory-every steps as converted "
        "checkpoints <dir>/<name>-ctc/step-<n> (loadable by load_model), step 0 included",
    )
    parser.add_argument("--trajectory-every", type=int, default=100)
    args = parser.parse_args(argv)
    vocab = train.build_vocab()
    data = read_split(args.data, "train", vocab)
    test = read_split(args.data, "test", vocab)
    pretrain = crops(data, args.crop_seconds, args.seed)
    # CTC on whole sentences: the ones up to --ctc-max-seconds, padded to that length.
    keep = data["lengths"] <= args.ctc_max_seconds * 16000
    samples = -(-int(data["lengths"][keep].max()) // 320) * 320
    ctc_data = {k: data[k][keep] for k in ("audio", "lengths", "labels", "label_lengths")}
    ctc_data["audio"] = ctc_data["audio"][:, :samples]
    metrics: dict = {"seed": args.seed, "args": vars(args), "models": {}}
    metrics_path = os.path.join(args.out, "metrics.json")
    os.makedirs(args.out, exist_ok=True)
    for name in args.models.split(","):
        config_name = CONFIGS[name]
        config = demo_config(config_name)
        started = time.time()
        key = jax.random.key(args.seed)
        if args.pretrained:
            _, encoder = load_converted(os.path.join(args.pretrained, name))
            summary: dict = {"pretrained": os.path.join(args.pretrained, name)}
        elif name == "tiny-hubert":
            clusters = train.fit_mfcc_clusters(
                key,
                config,
                pretrain["audio"][:200],
                pretrain["lengths"][:200],
                num_clusters=args.clusters,
            )
            targets = np.concatenate(
                [
                    np.asarray(
                        train.mfcc_targets(
                            config, jnp.asarray(pretrain["audio"][i : i + 64]), clusters
                        )
                    )
                    for i in range(0, len(pretrain["audio"]), 64)
                ]
            )
            objective = train.masked_prediction(
                config, num_clusters=args.clusters, span=5, mask_prob=0.08
            )
            arrays = {**pretrain, "targets": targets}
            counts = np.bincount(targets.ravel(), minlength=args.clusters)
            chance = float(counts.max() / counts.sum())
        else:
            # The paper's masking (p = 0.065 span starts of 10 frames, about half the frames).
            objective = train.contrastive(config, span=10, mask_prob=0.065)
            arrays = pretrain
            chance = None
        if not args.pretrained:
            summary, encoder = pretrain_model(args, name, config_name, objective, arrays, chance)
        # CTC fine-tuning: conv feature encoder frozen, transformer and new lm_head trained.
        ctc_config = ModelConfig.from_hf_config(hf_config(config_name, len(vocab)))
        objective = train.ctc(ctc_config, encoder=encoder)
        optimizer = train.make_optimizer(
            learning_rate=args.ctc_lr, steps=args.ctc_steps, warmup_steps=args.ctc_steps // 10
        )
        on_step = None
        if args.trajectory:
            on_step = trajectory_saver(
                args, os.path.join(args.trajectory, f"{name}-ctc"), config_name, vocab
            )
            on_step(0, {}, train.init_state(objective, optimizer, seed=args.seed + 1))
        started = time.time()
        state, history = train.fit(
            objective,
            ctc_data,
            optimizer=optimizer,
            steps=args.ctc_steps,
            seed=args.seed + 1,
            batch_size=args.batch_size,
            on_step=on_step,
        )
        params = jax.tree.map(np.asarray, state.params["encoder"])
        cer, hyps = evaluate_cer(ctc_config, params, test, vocab)
        summary.update(
            ctc_steps=args.ctc_steps,
            ctc_seconds=round(time.time() - started, 1),
            ctc_loss_first=history[0]["loss"],
            ctc_loss_last20=float(np.mean([h["loss"] for h in history[-20:]])),
            ctc_loss_every_100=[h["loss"] for h in history[99::100]],
            test_cer=cer,
            test_examples=[[r, h] for r, h in zip(test["texts"][:5], hyps[:5], strict=True)],
        )
        save(
            args.out,
            f"{name}-ctc",
            hf_config(config_name, len(vocab)),
            params,
            vocab,
            seed=args.seed,
            objective="ctc",
            test_cer=round(cer, 4),
        )
        metrics["models"][name] = summary
        print(json.dumps({name: summary}, indent=1), file=sys.stderr)
        with open(metrics_path, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


def trajectory_saver(args, directory: str, config_name: str, vocab: dict):
    """``on_step`` for `train.fit`: saves the CTC model every ``--trajectory-every`` steps."""

    def on_step(step: int, metrics: dict, state) -> None:
        if step % args.trajectory_every == 0 or step == args.ctc_steps:
            save(
                directory,
                f"step-{step}",
                hf_config(config_name, len(vocab)),
                jax.tree.map(np.asarray, state.params["encoder"]),
                vocab,
                seed=args.seed,
                objective="ctc",
                step=step,
                loss=metrics.get("loss"),
            )

    return on_step


def pretrain_model(args, name, config_name, objective, arrays, chance):
    """Pre-trains with ``objective``, saves the model, returns (summary, encoder params)."""
    started = time.time()
    optimizer = train.make_optimizer(
        learning_rate=args.lr, steps=args.pretrain_steps, warmup_steps=args.pretrain_steps // 10
    )
    state, history = train.fit(
        objective,
        arrays,
        optimizer=optimizer,
        steps=args.pretrain_steps,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    pre_seconds = time.time() - started
    encoder = jax.tree.map(np.asarray, state.params["encoder"])
    tail = history[-20:]
    summary = {
        "pretrain_seconds": round(pre_seconds, 1),
        "pretrain_loss_first": history[0]["loss"],
        "pretrain_loss_last20": float(np.mean([h["loss"] for h in tail])),
        "pretrain_accuracy_last20": float(np.mean([h["accuracy"] for h in tail])),
        "chance_accuracy": chance,
    }
    save(
        args.out,
        name,
        hf_config(config_name),
        encoder,
        None,
        seed=args.seed,
        objective="masked prediction" if name == "tiny-hubert" else "contrastive",
    )
    return summary, encoder


if __name__ == "__main__":
    sys.exit(main())
