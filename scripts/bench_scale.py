"""Data-parallel extraction throughput on 1, 2, 4, 8 devices (`sslsim_jax.analysis.extract`).

Runs the models over the audio once per device count (forward passes, NaN checks, joint
statistics update; attention with ``--attention``) and reports seconds of audio per second and
valid frames per second through the statistics, compilation excluded (each device count runs
once untimed first). Defaults: the built-in tiny demo models and the shipped speech repeated.

On a CPU, ``--fake-devices 8`` splits the one host into 8 XLA devices that share the same cores:
the numbers then show the overhead of sharding (dummy utterances, collectives, smaller
per-device matmuls), never a speed-up. Real scaling needs real devices (GPUs, TPU cores).

Usage::

    python scripts/bench_scale.py --fake-devices 8 --devices 1 2 4 8
    python scripts/bench_scale.py MODEL_DIR [MODEL_DIR ...] --audio DIR --devices 1 2 4 8
    python scripts/bench_scale.py --size base --devices 1      # two random base-size models
    python scripts/bench_scale.py --size base --devices 1 --tile-seconds 600 --batch-seconds 80

The first pass over the audio (which compiles) is timed too, with XLA's compile seconds in it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def random_model(size: str, seed: int):
    """A random-weight wav2vec2 model of the base or large shapes (``bench_forward.SIZES``)."""
    import jax
    from bench_forward import SIZES
    from transformers import Wav2Vec2Config

    from sslsim_jax.intermediates import SpeechModel
    from sslsim_jax.models import ModelConfig
    from sslsim_jax.models.modules import SpeechEncoder

    config = ModelConfig.from_hf_config(Wav2Vec2Config(**SIZES[size]).to_dict())
    samples = jax.numpy.zeros((1, config.receptive_field), jax.numpy.float32)
    params = SpeechEncoder(config).init(jax.random.key(seed), samples)["params"]
    return SpeechModel(config, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model directories (default: demo models)")
    parser.add_argument("--audio", nargs="+", help="audio (default: shipped speech)")
    parser.add_argument(
        "--tile-seconds", type=float, help="the shipped speech tiled into 10 s clips, S s in all"
    )
    parser.add_argument("--repeat", type=int, default=4, help="list the audio R times")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--fake-devices", type=int, help="split the CPU into N XLA devices")
    parser.add_argument("--batch-seconds", type=float, default=20.0)
    parser.add_argument("--attention", action="store_true")
    parser.add_argument(
        "--size", choices=["base", "large"], help="two random-weight models of this size"
    )
    parser.add_argument("--precision", default="highest", help="matmul precision of the run")
    parser.add_argument(
        "--log-compiles", action="store_true", help="log each compilation as it ends (stderr)"
    )
    args = parser.parse_args()
    if args.fake_devices:
        if "jax" in sys.modules:
            raise SystemExit("--fake-devices must be set before jax is imported")
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.fake_devices}"
        )

    import jax
    from _bench import log_compiles, machine

    if args.log_compiles:
        log_compiles()
    from bench_pipeline import make_audio

    from sslsim_jax import audio, demo
    from sslsim_jax.analysis import Settings, extract, load_audio, prepare_models
    from sslsim_jax.compile_log import compile_log

    if args.size:
        models = [(f"{args.size}-{seed}", random_model(args.size, seed)) for seed in (0, 1)]
    else:
        models = args.models or [
            ("w2v", demo.demo_model("tiny_wav2vec2", seed=0)),
            ("hubert", demo.demo_model("tiny_hubert", seed=1)),
        ]
    if args.tile_seconds:
        tiles = tempfile.TemporaryDirectory()  # removed when the script ends
        make_audio(tiles.name, args.tile_seconds)
        args.audio = audio.list_audio(tiles.name)
    paths = (args.audio or audio.demo_audio_paths()) * args.repeat
    print(machine(), f"devices={jax.device_count()}, precision={args.precision}")
    print(
        "| devices | utterances | audio s | first pass s | compile s | wall s | audio s/s | "
        "frames/s | vs 1 device |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for n in args.devices:
        settings = Settings(
            batch_seconds=args.batch_seconds,
            attention=args.attention,
            devices=n,
            precision=args.precision,
        )
        entries = prepare_models(models, settings)
        utterances = load_audio(paths, entries, settings)
        with jax.default_matmul_precision(args.precision):
            start = time.perf_counter()
            with compile_log() as compiled:
                extract(entries, utterances, settings, progress=False)  # compiles
            first = time.perf_counter() - start
            start = time.perf_counter()
            state = extract(entries, utterances, settings, progress=False)
            wall = time.perf_counter() - start
        seconds = sum(u.num_samples for u in utterances) / audio.SAMPLE_RATE
        base = base or wall
        print(
            f"| {n} | {len(utterances)} | {seconds:.1f} | {first:.1f} | "
            f"{compiled['compile_seconds']:.1f} | {wall:.2f} | {seconds / wall:.1f} | "
            f"{state.frames / wall:.0f} | {base / wall:.2f}× |"
        )


if __name__ == "__main__":
    main()
