"""``sslsim``: the command line. Thin: parses arguments, calls the library, reports errors.

Every error a user can cause (a bad path, audio, model, argument) is one line on stderr naming
the file or argument, with exit status 1 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _settings(args: argparse.Namespace):
    from sslsim_jax.pipeline import Settings

    layers = None
    if args.layers is not None:
        layers = tuple(x if x == "final" else _layer_index(x) for x in args.layers)
    return Settings(
        metrics=tuple(args.metrics),
        layers=layers,
        attention=args.attention,
        max_utterances=args.max_utterances,
        max_seconds=args.max_seconds,
        batch_seconds=args.batch_seconds,
        bootstrap=args.bootstrap,
        seed=args.seed,
        checkpoint_seconds=args.checkpoint_seconds,
        devices=args.devices,
        precision=args.precision,
        dtype=args.dtype,
        stat_shards=args.stat_shards,
    )


def _layer_index(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--layers: expected layer indices or 'final', got {text!r}") from None


def _analyze(args: argparse.Namespace) -> int:
    import jax

    from sslsim_jax import distributed
    from sslsim_jax.pipeline import analyze

    settings = _settings(args)
    distributed.initialize(
        args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )
    audio = args.audio[0] if len(args.audio) == 1 else args.audio
    table = analyze(
        args.models, audio, args.out, settings, progress=not args.quiet,
        report=not args.no_report,
    )  # fmt: skip
    if jax.process_index() != 0:
        return 0
    print(f"wrote {len(table)} rows to {args.out}/similarities.csv")
    if not args.no_report:
        print(f"report: {args.out}/report.html")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sslsim_jax import demo

    demo.run(out=args.out, progress=not args.quiet)
    print(f"report: {args.out}/report.html")
    return 0


def _report(args: argparse.Namespace) -> int:
    from sslsim_jax.report import build_report

    print(f"report: {build_report(args.out)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from sslsim_jax.checkpoints import convert_directory

    print(f"converted {args.source} -> {convert_directory(args.source, args.destination)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sslsim_jax.pipeline import DEFAULT_METRICS, DTYPES, LAYER_METRICS, PRECISIONS

    parser = argparse.ArgumentParser(
        prog="sslsim",
        description="Similarity analysis of wav2vec 2.0 and HuBERT models (sslsim-jax).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze",
        help="compare models layer by layer on a set of audio files",
        description="Runs every MODEL over the audio and writes similarities.csv, neurons.csv, "
        "run.json, figures and report.html into --out. Resumable: run the same command again "
        "after an interruption.",
    )
    analyze.add_argument(
        "models", nargs="+", metavar="MODEL",
        help="transformers checkpoint directory, converted directory or hub id",
    )  # fmt: skip
    analyze.add_argument(
        "--audio", required=True, nargs="+", metavar="PATH",
        help="audio directory (wav/flac/ogg, recursive), audio files, or a text file of paths",
    )  # fmt: skip
    analyze.add_argument("--out", required=True, help="output directory")
    analyze.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
        help=f"layer metrics among {', '.join(LAYER_METRICS)} (default: %(default)s)",
    )  # fmt: skip
    analyze.add_argument(
        "--layers", nargs="+", metavar="LAYER",
        help="layer indices to keep (0 = transformer input; 'final' = final LayerNorm of "
        "pre-LN models); default: all",
    )  # fmt: skip
    analyze.add_argument(
        "--attention", action="store_true",
        help="also compare attention heads (Frobenius, Pearson, Jensen-Shannon)",
    )  # fmt: skip
    analyze.add_argument("--max-utterances", type=int, help="use at most N utterances")
    analyze.add_argument("--max-seconds", type=float, help="crop utterances to S seconds")
    analyze.add_argument(
        "--batch-seconds", type=float, default=40.0,
        help="padded audio per batch, in seconds (default: %(default)s)",
    )  # fmt: skip
    analyze.add_argument(
        "--bootstrap", type=int, default=0, metavar="B",
        help="confidence intervals from B bootstrap replicates over utterances (default: none)",
    )  # fmt: skip
    analyze.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    analyze.add_argument(
        "--checkpoint-seconds", type=float, default=120.0,
        help="seconds between checkpoints of the statistics (default: %(default)s)",
    )  # fmt: skip
    analyze.add_argument(
        "--devices", type=int, metavar="N",
        help="split batches over the first N local devices (default: all); results do not "
        "depend on N",
    )  # fmt: skip
    analyze.add_argument(
        "--stat-shards", type=int, default=1, metavar="S",
        help="split the joint statistics over S devices (a divisor of --devices), for more "
        "networks than one device's memory holds (default: %(default)s, a copy per device)",
    )  # fmt: skip
    analyze.add_argument(
        "--precision", default="highest", choices=PRECISIONS,
        help="matmul precision of models and metrics: 'highest' is exact float32 on every "
        "device; 'tensorfloat32' (GPU) or 'bfloat16' (TPU) is faster and less exact "
        "(default: %(default)s)",
    )  # fmt: skip
    analyze.add_argument(
        "--dtype", default="float32", choices=DTYPES,
        help="the models' compute dtype; statistics are float32 either way (default: %(default)s)",
    )  # fmt: skip
    analyze.add_argument(
        "--coordinator", metavar="HOST:PORT",
        help="multi-process run: process 0's address ('auto': read the cluster environment, "
        "e.g. on Cloud TPU VMs); each process reads its share of the audio, process 0 writes",
    )  # fmt: skip
    analyze.add_argument(
        "--num-processes", type=int, metavar="P", help="multi-process run: number of processes"
    )
    analyze.add_argument(
        "--process-id", type=int, metavar="I", help="multi-process run: this process, 0..P-1"
    )
    analyze.add_argument("--no-report", action="store_true", help="skip figures and report.html")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(func=_analyze)

    demo = sub.add_parser(
        "demo",
        help="the whole analysis on built-in models and shipped speech (no downloads)",
        description="Runs `analyze` on three small built-in models (a wav2vec 2.0-style model, "
        "a fine-tuned-style CTC variant of it, and a HuBERT-style model; seeded random "
        "weights) and a few seconds of speech shipped with the package.",
    )
    demo.add_argument(
        "--out", default="demo-report", help="output directory (default: %(default)s)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    report = sub.add_parser(
        "report",
        help="redraw figures and report.html from saved results",
        description="Redraws the figures and report.html of an analysis output directory.",
    )
    report.add_argument("out", help="output directory of `sslsim analyze`")
    report.set_defaults(func=_report)

    convert = sub.add_parser(
        "convert",
        help="convert a transformers checkpoint to sslsim-jax (orbax) format",
        description="Converts a transformers Wav2Vec2/HuBERT checkpoint directory or hub id "
        "into config.json plus orbax-checkpoint params (same as python -m convert).",
    )
    convert.add_argument("source", help="transformers checkpoint directory or hub id")
    convert.add_argument("destination", help="directory to write")
    convert.set_defaults(func=_convert)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


CACHE_ENV = "SSLSIM_CACHE_DIR"


def compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None when off).

    Every padded batch shape compiles the models once: seconds on a CPU, 10-60 s on a GPU. The
    cache keeps the compiled programs across runs (a resumed run, other metrics, another corpus
    of similar lengths). Directory: ``$SSLSIM_CACHE_DIR``, default ``~/.cache/sslsim/jax``;
    ``SSLSIM_CACHE_DIR=none`` turns it off.
    """
    import os

    import jax

    path = os.environ.get(CACHE_ENV, os.path.join("~", ".cache", "sslsim", "jax"))
    if path.strip().lower() in ("", "none", "off"):
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    if args.command in ("analyze", "demo"):
        compilation_cache()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(
            f"sslsim {args.command}: interrupted; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except (OSError, ValueError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"sslsim {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
