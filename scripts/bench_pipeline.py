"""What an analysis costs above its forward passes: `analyze` against forward-only, same audio.

Two random-weight base-size models (the wav2vec2-base layout, which hubert-base shares;
seeds 0 and 1, so they share one compiled encoder as those two models do), every layer
(2 × 13 networks of 768), over N seconds of speech (the shipped clips, tiled into 10 s files).
Each case runs in a fresh process (so each pays its own compilation, as a user does; building
the random models is not timed) and prints its wall time, the number of XLA compilations and
their seconds, the process's peak resident memory and, for the analyses, `run.json`'s
seconds by stage:

- ``forward``: both models over the same batches as `analyze` (`inputs.plan_batches`, padded
  alike), every hidden state fetched to the device's memory and waited for; no statistics;
- ``linear_cka``: ``analyze`` with ``metrics=("linear_cka",)``, no report;
- ``default``: ``analyze`` with the default metrics, no report.

The ratios analyze / forward are measured side by side in one run.

    python scripts/bench_pipeline.py --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import soundfile as sf
from _bench import machine

CHILD = """
import json, sys, time
sys.path.insert(0, {scripts!r})
from _bench import peak_rss
import jax
from bench_scale import random_model
from sslsim_jax import audio
from sslsim_jax.compile_log import compile_log
from sslsim_jax.analysis import Settings, analyze
from sslsim_jax.analysis.inputs import PAD_MULTIPLE, PAD_STEPS, padded_batch, plan_batches

case, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
models = [("w2v", random_model("base", 0)), ("hubert", random_model("base", 1))]
jax.block_until_ready([m.params for _, m in models])
settings = Settings()
start = time.perf_counter()  # building the random models is not timed
with compile_log() as compiled:
    if case == "forward":
        clips = [audio.probe(p) for p in audio.list_audio(folder)]
        lengths = [c.num_samples for c in clips]
        for batch in plan_batches(lengths, settings):
            waves = [clips[i].load() for i in batch]
            waves += [waves[-1]] * (padded_batch(len(batch)) - len(batch))
            x, lens = audio.pad(waves, multiple_of=PAD_MULTIPLE, steps=PAD_STEPS)
            for _, model in models:
                jax.block_until_ready(model.intermediates(x, lens).hidden_states)
    else:
        metrics = ("linear_cka",) if case == "linear_cka" else settings.metrics
        settings = Settings(metrics=metrics)
        analyze(models, folder, out, settings, progress=False, report=False)
wall = time.perf_counter() - start
peak = peak_rss() / 2**30  # VmHWM, GiB
stages = {{}}
if case != "forward":
    with open(out + "/run.json") as f:
        stages = json.load(f)["seconds"]
print("RESULT" + json.dumps({{"wall": wall, "peak": peak, "stages": stages, **compiled}}))
"""


def make_audio(folder: str, seconds: float) -> None:
    """Tiles the shipped speech into 10 s FLAC files, ``seconds`` in all."""
    from sslsim_jax import audio

    speech = np.concatenate([audio.load(p) for p in audio.demo_audio_paths()])
    speech = np.tile(speech, int(np.ceil(seconds * 16000 / len(speech))))
    total = int(seconds * 16000)
    for i, start in enumerate(range(0, total, 160000)):
        chunk = speech[start : min(start + 160000, total)]
        sf.write(os.path.join(folder, f"clip{i:03d}.flac"), chunk, 16000)


def run(case: str, folder: str, out: str) -> dict:
    scripts = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SSLSIM_CACHE_DIR="none")
    code = textwrap.dedent(CHILD.format(scripts=scripts))
    done = subprocess.run(
        [sys.executable, "-c", code, case, folder, out], capture_output=True, text=True, env=env
    )
    if done.returncode:
        sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of speech")
    parser.add_argument(
        "--cases", nargs="+", default=["forward", "linear_cka", "default"],
        choices=["forward", "linear_cka", "default"],
    )  # fmt: skip
    args = parser.parse_args()
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"# two random base-size models, every layer (26 networks), {args.seconds:.0f} s")
    print(
        "| case | wall (s) | compilations | compile (s) | peak RSS (GiB) | / forward "
        "| statistics, metrics, checkpoint, tables (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "audio")
        os.makedirs(folder)
        make_audio(folder, args.seconds)
        base = None
        for case in args.cases:
            r = run(case, folder, os.path.join(tmp, case))
            base = r["wall"] if case == "forward" else base
            ratio = f"{r['wall'] / base:.2f}×" if base else "–"
            stages = r["stages"]
            parts = ("statistics", "metrics", "checkpoint", "tables")
            split = ", ".join(f"{stages[k]:.1f}" for k in parts) if stages else "–"
            print(
                f"| {case} | {r['wall']:.1f} | {r['compilations']} | {r['compile_seconds']:.1f} | "
                f"{r['peak']:.2f} | {ratio} | {split} |",
                flush=True,
            )
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
