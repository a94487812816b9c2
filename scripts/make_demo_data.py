"""Synthesises the demo models' training data: English sentences spoken by espeak-ng.

Sentences come from a small generator written for this project (word lists combined by a few
sentence patterns), each spoken by one of several espeak-ng voices (American, British,
Scottish, Received Pronunciation, West Midlands, Caribbean; with the female variant "+f3" for
some) at a slowish rate (120-150 words per minute) and a random pitch, resampled to 16 kHz mono
with sox. Writes ``OUT/wav/<id>.wav`` and ``OUT/train.tsv`` / ``OUT/test.tsv`` (id, seconds,
transcript); the held-out split uses sentences that do not occur in training. Not shipped:
run it before ``scripts/train_demo_models.py``.

This is synthetic, phonetically regular speech, not natural speech.

    python scripts/make_demo_data.py OUT --minutes 40 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import soundfile

SUBJECTS = [
    "the farmer",
    "my sister",
    "a young doctor",
    "the old captain",
    "our teacher",
    "the baker",
    "a tired student",
    "the little dog",
    "his brother",
    "the quiet girl",
    "a tall man",
    "the singer",
    "her father",
    "the driver",
    "a clever fox",
    "the nurse",
    "my neighbour",
    "the painter",
    "a small child",
    "the king",
]
VERBS = [
    "found",
    "carried",
    "painted",
    "opened",
    "washed",
    "sold",
    "bought",
    "lost",
    "watched",
    "cleaned",
    "moved",
    "fixed",
    "dropped",
    "wanted",
    "kept",
    "pushed",
    "held",
    "liked",
]
OBJECTS = [
    "a red box",
    "the green door",
    "an old map",
    "the heavy stone",
    "a bright lamp",
    "the wooden chair",
    "a warm coat",
    "the broken clock",
    "a yellow kite",
    "the silver key",
    "a long rope",
    "the blue boat",
    "a fresh apple",
    "the paper bag",
    "a round table",
    "the black hat",
    "a glass of milk",
    "the garden gate",
]
PLACES = [
    "in the morning",
    "near the river",
    "after dinner",
    "at the market",
    "on the hill",
    "by the window",
    "before the storm",
    "in the kitchen",
    "at school",
    "under the bridge",
    "during the night",
    "behind the house",
    "on sunday",
    "in the park",
]
ADJECTIVES = ["cold", "quiet", "busy", "happy", "dark", "sunny", "long", "strange", "calm"]
TIMES = ["today", "yesterday", "last week", "this evening", "every day", "all winter"]
PATTERNS = [
    "{s} {v} {o} {p}",
    "{s} {v} {o}",
    "{p} {s} {v} {o}",
    "it was {a} {t} and {s} {v} {o}",
    "{s} did not know who {v} {o}",
    "{t} {s} {v} {o} {p}",
    "the day was {a} so {s} {v} {o}",
]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029"]


def sentences(rng: random.Random):
    """Endless distinct sentences (lower case, no punctuation)."""
    seen = set()
    while True:
        text = rng.choice(PATTERNS).format(
            s=rng.choice(SUBJECTS),
            v=rng.choice(VERBS),
            o=rng.choice(OBJECTS),
            p=rng.choice(PLACES),
            a=rng.choice(ADJECTIVES),
            t=rng.choice(TIMES),
        )
        if text not in seen:
            seen.add(text)
            yield text


def speak(text: str, path: str, rng: random.Random) -> float:
    """Speaks ``text`` into a 16 kHz mono wav at ``path``; returns its duration in seconds."""
    voice = rng.choice(VOICES) + rng.choice(["", "", "+f3", "+m3"])
    rate, pitch = rng.randint(120, 150), rng.randint(30, 70)
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", raw.name, text],
            check=True,
        )
        subprocess.run(
            ["sox", "-V1", raw.name, "-r", "16000", "-c", "1", "-b", "16", path], check=True
        )
    return soundfile.info(path).duration


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--minutes", type=float, default=40.0, help="training audio (minutes)")
    parser.add_argument("--test", type=int, default=100, help="held-out sentences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes: expected > 0, got {args.minutes}")
    os.makedirs(os.path.join(args.out, "wav"), exist_ok=True)
    rng = random.Random(args.seed)
    source = sentences(rng)
    test = [next(source) for _ in range(args.test)]
    # Training sentences: about 3 s each at these rates.
    train = [next(source) for _ in range(int(args.minutes * 60 / 3.0))]
    jobs = [("test", i, t) for i, t in enumerate(test)] + [
        ("train", i, t) for i, t in enumerate(train)
    ]

    def one(job):
        split, i, text = job
        uid = f"{split}{i:05d}"
        seconds = speak(
            text, os.path.join(args.out, "wav", f"{uid}.wav"), random.Random(f"{args.seed}-{uid}")
        )
        return split, uid, seconds, text

    with ThreadPoolExecutor(args.workers) as pool:
        rows = list(pool.map(one, jobs))
    for split in ("train", "test"):
        with open(os.path.join(args.out, f"{split}.tsv"), "w") as f:
            for s, uid, seconds, text in rows:
                if s == split:
                    f.write(f"{uid}\t{seconds:.3f}\t{text}\n")
        total = sum(r[2] for r in rows if r[0] == split)
        print(
            f"{split}: {sum(r[0] == split for r in rows)} sentences, {total / 60:.1f} min",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
