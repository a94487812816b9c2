"""Forward pass without attention maps: plain attention vs blocks of queries (``attention_block``).

Base-size wav2vec 2.0 config with random weights (no checkpoint needed), one utterance of each
length, ``attentions=False``. The models run interleaved, one call of each per round, so that
load from other processes on a shared machine hits every setting alike; wall and process CPU
times are reported (min and median over the rounds). A block at least T is the plain path.

    python scripts/bench_attention_block.py --seconds 10 30 --blocks none 512 256 --reps 3
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _bench import machine

BASE = dict(
    model_type="wav2vec2",
    conv_dim=[512] * 7,
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    feat_extract_norm="group",
    do_stable_layer_norm=False,
    conv_bias=False,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", nargs="+", type=float, default=[10.0, 30.0])
    parser.add_argument("--blocks", nargs="+", default=["none", "512", "256"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision", default="highest")
    args = parser.parse_args(argv)

    from sslsim_jax.intermediates import SpeechModel
    from sslsim_jax.models import ModelConfig
    from sslsim_jax.models.modules import SpeechEncoder

    config = ModelConfig.from_hf_config(BASE)
    params = SpeechEncoder(config).init(jax.random.key(0), jnp.zeros((1, 400)))["params"]
    blocks = [None if b == "none" else int(b) for b in args.blocks]
    print(f"# machine: {machine()}; base config, attentions=False, {args.reps} rounds")
    print("| seconds | T | block | wall min (s) | wall median (s) | cpu min (s) | cpu median (s) |")
    print("|---|---|---|---|---|---|---|")
    for seconds in args.seconds:
        x = np.random.default_rng(0).standard_normal((1, int(seconds * 16000)), np.float32)
        models = {
            b: SpeechModel(config, params, attention_block=b, precision=args.precision)
            for b in blocks
        }
        for model in models.values():  # compile
            jax.block_until_ready(model.intermediates(x))
        times = {b: [] for b in blocks}
        for _ in range(args.reps):
            for b, model in models.items():
                wall, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(model.intermediates(x))
                times[b].append((time.perf_counter() - wall, time.process_time() - cpu))
        for b in blocks:
            wall, cpu = np.array(times[b]).T
            print(
                f"| {seconds:g} | {config.num_frames(x.shape[1])} | {b} | {wall.min():.3f} "
                f"| {np.median(wall):.3f} | {cpu.min():.3f} | {np.median(cpu):.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
