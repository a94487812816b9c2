"""``sslsim``: the command line. Thin: parses arguments, calls the library, reports errors.

Every error a user can cause (a bad path, audio, model, argument) is one line on stderr naming
the file or argument, with exit status 1 and no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import traceback
import warnings


def _settings(args: argparse.Namespace):
    """`Settings` from the flags that `add_settings_flags` declared (fields not given keep
    their defaults)."""
    from sslsim_jax.analysis import Settings

    given = {}
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name, None)
        if value is not None:
            given[field.name] = tuple(value) if isinstance(value, list) else value
    return Settings(**given)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `Settings` field, generated from its annotation and metadata (help, metavar,
    choices); defaults come from the dataclass, so the flags default to None here."""
    from sslsim_jax.analysis import Settings
    from sslsim_jax.analysis.settings import field_type

    for field in dataclasses.fields(Settings):
        meta = dict(field.metadata)
        kind, sequence, _ = field_type(field)
        default = field.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = meta.pop("help")
        if kind is bool:
            parser.add_argument(
                _flag(field.name), action="store_true", default=None, help=help_text
            )
            continue
        if default is not None:
            help_text += f" (default: {shown})"
        parser.add_argument(
            _flag(field.name),
            type=kind if kind in (int, float) else str,
            nargs="+" if sequence else None,
            default=None,
            help=help_text,
            **meta,
        )


def _option_names() -> set[str]:
    from sslsim_jax.analysis import Settings

    return {f.name for f in dataclasses.fields(Settings)} | {
        "out",
        "audio",
        "coordinator",
        "num_processes",
        "process_id",
    }


def flag_message(message: str) -> str:
    """A library message that starts with an argument's name (``max_seconds: ...``), with that
    name shown as the command line's flag (``--max-seconds: ...``)."""
    head, sep, rest = message.partition(": ")
    if sep and all(part in _option_names() for part in head.split("/")):
        head = "/".join(_flag(part) for part in head.split("/"))
        return f"{head}: {rest}"
    return message


def _analyze(args: argparse.Namespace) -> int:
    import jax

    from sslsim_jax import distributed
    from sslsim_jax.analysis import STATE_DIR, analyze

    settings = _settings(args)
    if args.plan:
        from sslsim_jax.analysis.run import describe_plan

        print(describe_plan(args.models, settings))
        return 0
    for flag in ("audio", "out"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag}: required (unless --plan)")
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
    state = os.path.join(args.out, STATE_DIR)
    # Checkpoints: a .npz file per pass, or an orbax folder when split with --stat-shards.
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(state) for f in files)
    print(
        f"statistics kept in {state} ({size / 1e6:.1f} MB): the same command with other "
        "--metrics reuses them; delete that folder to free the space"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sslsim_jax import demo
    from sslsim_jax.analysis.run import check_output_dir

    check_output_dir(args.out)  # before any model is built or loaded
    demo.run(out=args.out, progress=not args.quiet)
    print(f"report: {args.out}/report.html")
    return 0


def _report(args: argparse.Namespace) -> int:
    from sslsim_jax.report import build_report

    print(f"report: {build_report(args.out)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.to_transformers:
        from sslsim_jax.convert.export import export_directory

        print(f"exported {args.source} -> {export_directory(args.source, args.destination)}")
        return 0
    from sslsim_jax.checkpoints import convert_directory

    print(f"converted {args.source} -> {convert_directory(args.source, args.destination)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
        "--audio", nargs="+", metavar="PATH",
        help="audio directory (wav/flac/ogg/mp3, recursive), audio files, a text file of "
        "paths, or a Hugging Face dataset saved with save_to_disk (DIR, or DIR:SPLIT for one "
        "split; its Audio column; needs the 'datasets' extra)",
    )  # fmt: skip
    analyze.add_argument("--out", help="output directory (required unless --plan)")
    add_settings_flags(analyze)
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
    analyze.add_argument(
        "--plan",
        action="store_true",
        help="print the passes the analysis would make under the memory budget (groups, bytes, "
        "models run) from the models' config.json, and stop; nothing is run",
    )
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(func=_analyze)

    demo = sub.add_parser(
        "demo",
        help="the whole analysis on built-in models and shipped speech (no downloads)",
        description="Runs `analyze` on the small models shipped with the package (trained by "
        "scripts/train_demo_models.py: pre-trained and their CTC fine-tuned counterparts) and "
        "a randomly initialised model of the same shape as a baseline, over a few seconds of "
        "speech shipped with the package.",
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
        help="convert a transformers checkpoint to sslsim-jax (orbax) format, or back",
        description="Converts a transformers Wav2Vec2/HuBERT checkpoint directory or hub id "
        "into config.json plus orbax-checkpoint params; with --to-transformers, writes a "
        "converted model back as a transformers directory (config.json, model.safetensors, "
        "vocab.json of CTC models).",
    )
    convert.add_argument(
        "--to-transformers",
        action="store_true",
        help="export SOURCE (a converted directory) as a transformers directory",
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
    ``SSLSIM_CACHE_DIR=none`` turns it off. Programs that compiled in under a second are not
    kept, unless JAX's own ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise.
    """

    import jax

    path = os.environ.get(CACHE_ENV, os.path.join("~", ".cache", "sslsim", "jax"))
    if path.strip().lower() in ("", "none", "off"):
        return None
    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    least = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", least)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    # SIGTERM (a scheduler's time limit, `kill`) stops like Ctrl-C: checkpoints stay valid.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.command in ("analyze", "demo"):
        compilation_cache()
    try:
        code = _run(args)
    except BaseException:
        if _joined():  # `distributed.exit_on_failure`, without importing JAX otherwise
            traceback.print_exc()
            sys.modules["sslsim_jax.distributed"].exit_now(1)
        raise
    if code and _joined():
        sys.modules["sslsim_jax.distributed"].exit_now(code)
    return code


def _joined() -> bool:
    """Whether this process joined a multi-process run (without importing JAX otherwise)."""
    module = sys.modules.get("sslsim_jax.distributed")
    return module is not None and module.joined()


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # A newline first: the message must not land on a progress bar's line.
        print(
            f"\nsslsim {args.command}: interrupted; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except (OSError, ValueError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = flag_message(message)
        print(f"sslsim {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
