"""The neuron tables at the paper's scale: writing ``neurons.csv`` and ``neuron_rankings.csv`` and
reading them back, before and now.

The paper's grid (8 models, base and large, every layer: 156 networks, 146,432 neurons) has
22.8 million ``neurons.csv`` rows, one per neuron and network. Synthetic matches (random |r|,
some constant neurons) stand in for a run's; nothing is run on a device. Each case runs in a
fresh process, so its peak resident memory (VmHWM) is its own:

- ``before``: the row tables of pandas as `analyze` built them until this script was written:
  one small frame per network pair, concatenated, sorted into network order by string keys,
  written with ``to_csv``; the rankings grouped by string keys; read back as strings and
  checked cell by cell (`results.read_results` without its typed parser).
- ``now``: `NeuronMatches` (arrays, written row by row in order, ranked with NumPy) and
  `results.read_results`' typed parser.

    python scripts/bench_tables.py              # the paper's grid: about 10 minutes, 9 GB
    python scripts/bench_tables.py --scale 0.25 # a quarter of each model's layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)
from _bench import cpu_model, peak_rss  # noqa: E402

# The paper's models: (name, width, networks); large models add the "final" network.
MODELS = [
    ("wav2vec2-base", 768, 13),
    ("wav2vec2-base-960h", 768, 13),
    ("hubert-base-ls960", 768, 13),
    ("hubert-base-ft", 768, 13),
    ("wav2vec2-large-lv60", 1024, 26),
    ("wav2vec2-large-960h-lv60-self", 1024, 26),
    ("hubert-large-ll60k", 1024, 26),
    ("hubert-large-ls960-ft", 1024, 26),
]


def grid(scale: float):
    """(names, sizes, best, matched) of the synthetic run."""
    names, sizes = [], []
    for model, width, count in MODELS:
        count = max(2, round(count * scale))
        layers = [str(i) for i in range(count - 1)] + ["final" if width == 1024 else str(count - 1)]
        names += [f"{model}:{layer}" for layer in layers]
        sizes += [width] * count
    k, p = len(names), max(sizes)
    rng = np.random.default_rng(0)
    best = rng.random((k, p, k), dtype=np.float32)
    best[:, ::97, :] = np.nan  # constant neurons
    matched = rng.integers(0, p, (k, p, k), dtype=np.int32)
    return names, tuple(sizes), best, matched


def before(names, sizes, best, matched, out: str) -> dict:
    """The pandas row tables (the code `analyze` ran before `NeuronMatches`)."""
    times = {}
    start = time.perf_counter()
    parts = []
    for i, name in enumerate(names):
        model_a, layer_a = name.rsplit(":", 1)
        for j, other in enumerate(names):
            model_b, layer_b = other.rsplit(":", 1)
            parts.append(
                pd.DataFrame(
                    {
                        "model_a": model_a,
                        "layer_a": layer_a,
                        "neuron_a": np.arange(sizes[i]),
                        "model_b": model_b,
                        "layer_b": layer_b,
                        "matched_neuron_b": matched[i, : sizes[i], j],
                        "correlation": best[i, : sizes[i], j].astype(np.float64),
                    }
                )
            )
    pairs = pd.concat(parts, ignore_index=True)
    del parts
    index = {n: i for i, n in enumerate(names)}
    keys = pd.DataFrame(
        {
            "a": (pairs.model_a + ":" + pairs.layer_a).map(index),
            "n": pairs.neuron_a,
            "b": (pairs.model_b + ":" + pairs.layer_b).map(index),
        }
    )
    pairs = pairs.iloc[keys.sort_values(["a", "n", "b"], kind="stable").index]
    pairs = pairs.reset_index(drop=True)
    del keys
    times["build"] = time.perf_counter() - start
    start = time.perf_counter()
    pairs.to_csv(os.path.join(out, "neurons.csv"), index=False)
    times["write"] = time.perf_counter() - start
    start = time.perf_counter()
    a = pairs.model_a + ":" + pairs.layer_a
    b = pairs.model_b + ":" + pairs.layer_b
    pooled = pairs[a != b]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled.groupby(["model_a", "layer_a", "neuron_a"], sort=False).correlation.agg(
            ["max", "min"]
        )
    times["rankings"] = time.perf_counter() - start
    del pairs, pooled, a, b
    start = time.perf_counter()
    read(out, typed=False)
    times["read"] = time.perf_counter() - start
    return times


def read(out: str, *, typed: bool) -> None:
    """`read_results`' reading of neurons.csv; ``typed=False``: as strings, cell by cell only
    (what it did before its typed parser)."""
    from pathlib import Path

    from sslsim_jax import results

    kinds, _ = results._OPTIONAL[results.NEURONS]
    if not typed:
        results._read_typed = lambda *args, **kwargs: None
    results._read_csv(Path(out) / results.NEURONS, results.NEURON_COLUMNS, **kinds)


def now(names, sizes, best, matched, out: str) -> dict:
    from sslsim_jax.analysis.tables import NeuronMatches

    times = {}
    start = time.perf_counter()
    matches = NeuronMatches(list(names), sizes, best, matched)
    times["build"] = time.perf_counter() - start
    start = time.perf_counter()
    matches.write(out)
    times["write"] = time.perf_counter() - start
    start = time.perf_counter()
    matches.rankings()
    times["rankings"] = time.perf_counter() - start
    del matches
    start = time.perf_counter()
    read(out, typed=True)
    times["read"] = time.perf_counter() - start
    return times


def child(case: str, scale: float) -> None:
    names, sizes, best, matched = grid(scale)
    with tempfile.TemporaryDirectory() as out:
        times = (before if case == "before" else now)(names, sizes, best, matched, out)
        size = os.path.getsize(os.path.join(out, "neurons.csv"))
    rows = sum(sizes) * len(names)
    print(json.dumps({**times, "rows": rows, "bytes": size, "peak": peak_rss()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each model's layers")
    parser.add_argument("--cases", nargs="+", default=["before", "now"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.scale)
    print(f"{cpu_model()}, nproc={os.cpu_count()}, pandas {pd.__version__}, numpy {np.__version__}")
    got = {}
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--scale", str(args.scale)]
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if run.returncode:
            sys.exit(f"{case} failed:\n{run.stderr[-3000:]}")
        got[case] = json.loads(run.stdout.strip().splitlines()[-1])
    first = next(iter(got.values()))
    print(f"{first['rows']:,} neurons.csv rows, {first['bytes'] / 1e9:.2f} GB")
    stages = ("build", "write", "rankings", "read")
    print(f"| case | {' | '.join(f'{s} (s)' for s in stages)} | total (s) | peak RSS (GiB) |")
    print("|---|" + "---|" * (len(stages) + 2))
    for case, t in got.items():
        cells = " | ".join(f"{t[s]:.1f}" for s in stages)
        total = sum(t[s] for s in stages)
        print(f"| {case} | {cells} | {total:.1f} | {t['peak'] / 2**30:.2f} |")
    if {"before", "now"} <= set(got):
        ratio = sum(got["before"][s] for s in stages) / sum(got["now"][s] for s in stages)
        print(f"before / now: {ratio:.1f}x")


if __name__ == "__main__":
    main()
