"""``sslsim``: the command line. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from sslsim_jax import demo

    table = demo.run(out=args.out, utterances=args.utterances, seconds=args.seconds)
    for metric, rows in table.groupby("metric", sort=False):
        matrix = rows.pivot(index="network_a", columns="network_b", values="value")
        print(f"\n{metric} (row network in terms of column network)")
        print(matrix.round(3).to_string())
    if args.out:
        print(f"\nwrote {args.out}/similarities.csv")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from sslsim_jax.checkpoints import convert_directory

    print(f"converted {args.source} -> {convert_directory(args.source, args.destination)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslsim",
        description="Similarity analysis of wav2vec 2.0 and HuBERT models (sslsim-jax).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="built-in demonstration on two small shipped models (no downloads)",
        description="Runs two small built-in models (seeded random weights) on synthetic "
        "speech-like audio and prints every layer-pair similarity.",
    )
    demo.add_argument("--out", help="directory to write similarities.csv into")
    demo.add_argument("--utterances", type=int, default=8, help="number of utterances")
    demo.add_argument("--seconds", type=float, default=2.0, help="longest utterance (s)")
    demo.set_defaults(func=_demo)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as e:
        print(f"sslsim {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
