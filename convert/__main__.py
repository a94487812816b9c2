"""``python -m convert SRC DST``: convert a transformers checkpoint directory or hub id."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a transformers Wav2Vec2/HuBERT checkpoint (directory or hub id) "
        "into an sslsim-jax directory: config.json plus orbax-checkpoint params.",
    )
    parser.add_argument("source", help="transformers checkpoint directory or hub id")
    parser.add_argument("destination", help="directory to write")
    args = parser.parse_args(argv)
    from sslsim_jax.checkpoints import convert_directory

    try:
        out = convert_directory(args.source, args.destination)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
