"""Forward pass: sslsim-jax (jit, all hidden states and attentions) vs transformers PyTorch eager.

Both run side by side in one process on the same random-weight model (base and large sizes),
10 s of audio, batch 1 and 8; the JAX compile time is reported separately. Prints one row per
case with the steady-state times and the ratio torch / jax (> 1 means JAX is faster).

    python scripts/bench_forward.py                       # base and large, batch 1 and 8
    python scripts/bench_forward.py --sizes base --batches 1 --reps 3
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
from _bench import machine, timed

SIZES = {
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "large": dict(
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
    ),
}


def run_jax(model, x) -> None:
    jax.block_until_ready(model.intermediates(x, attentions=True))


def run_torch(model, x) -> None:
    import torch

    with torch.inference_mode():
        model(x, output_hidden_states=True, output_attentions=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision", default="highest", help="JAX matmul precision")
    parser.add_argument("--no-torch", action="store_true", help="time JAX only")
    args = parser.parse_args(argv)

    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from convert.hf import convert_state_dict
    from sslsim_jax.checkpoints import param_shapes
    from sslsim_jax.intermediates import SpeechModel
    from sslsim_jax.models import ModelConfig

    print(f"# machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# {args.seconds:g} s audio each; precision={args.precision}; median of {args.reps}")
    print("| model | batch | jax compile (s) | jax (s) | torch eager (s) | torch / jax |")
    print("|---|---|---|---|---|---|")
    samples = int(args.seconds * 16000)
    for size in args.sizes:
        hf_config = Wav2Vec2Config(**SIZES[size], attn_implementation="eager")
        torch.manual_seed(0)
        torch_model = Wav2Vec2Model(hf_config).eval()
        config = ModelConfig.from_hf_config(hf_config.to_dict())
        state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
        params = convert_state_dict(state, config, expected_shapes=param_shapes(config))
        model = SpeechModel(config, params, precision=args.precision)
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, samples)).astype(np.float32)

            start = time.perf_counter()
            run_jax(model, x)
            compile_s = time.perf_counter() - start
            jax_s = timed(lambda: run_jax(model, x), args.reps, warmup=False)  # noqa: B023
            if args.no_torch:
                print(f"| {size} | {batch} | {compile_s:.1f} | {jax_s:.3f} | - | - |", flush=True)
                continue
            xt = torch.from_numpy(x)
            run_torch(torch_model, xt)
            torch_s = timed(lambda: run_torch(torch_model, xt), args.reps, warmup=False)  # noqa: B023
            print(
                f"| {size} | {batch} | {compile_s:.1f} | {jax_s:.3f} | {torch_s:.3f} "
                f"| {torch_s / jax_s:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
