"""Peak memory of the analysis's audio path is flat in the number of files.

Audio is planned from file headers (`sslsim_jax.audio.probe`) and decoded batch by batch on a
background thread (`sslsim_jax.analysis.inputs.prefetch`), so only a few batches of samples are
in memory at once, however long the corpus. For each corpus size this script writes that many
10 s FLAC files, then in a fresh process plans them and streams every batch, and prints the
process's peak resident memory next to the decoded audio's total size. The old path (decode
every file before the first batch) is run side by side for comparison.

    python scripts/bench_audio_memory.py --files 20 80 320
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import soundfile as sf

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
CHILD = """
import sys
sys.path.insert(0, sys.argv[3])  # scripts/, for _bench
from _bench import peak_rss
from sslsim_jax import audio
from sslsim_jax.analysis.inputs import prefetch
folder, mode = sys.argv[1], sys.argv[2]
paths = audio.list_audio(folder)
if mode == "streamed":
    clips = [audio.probe(p) for p in paths]
else:
    clips = [audio.load_utterance(p) for p in paths]
lengths = [c.num_samples for c in clips]
batches = audio.make_batches(lengths, batch_seconds=40.0)
total = 0
for samples in prefetch(batches, clips):
    total += sum(len(s) for s in samples)
peak = peak_rss() / 2**20  # VmHWM, MiB
print(f"{peak:.0f} {total * 4 / 2**20:.0f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[20, 80, 320])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(int(args.seconds * 16000)) * 0.1).astype(np.float32)
    print(f"{'files':>6} {'audio MiB':>10} {'streamed peak MiB':>18} {'preloaded peak MiB':>19}")
    for count in args.files:
        with tempfile.TemporaryDirectory() as folder:
            for i in range(count):
                sf.write(os.path.join(folder, f"{i:05d}.flac"), clip, 16000)
            peaks = {}
            for mode in ("streamed", "preloaded"):
                out = subprocess.run(
                    [sys.executable, "-c", textwrap.dedent(CHILD), folder, mode, SCRIPTS],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                peak, audio_mib = out.stdout.split()
                peaks[mode] = peak
        print(f"{count:>6} {audio_mib:>10} {peaks['streamed']:>18} {peaks['preloaded']:>19}")


if __name__ == "__main__":
    main()
