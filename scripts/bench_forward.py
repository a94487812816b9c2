"""Forward pass: sslsim-jax (jit, all hidden states and attentions) vs transformers PyTorch eager.

Both run side by side in one process on the same random-weight model (base and large sizes),
10 s of audio, batch 1 and 8, their calls alternating (medians of ``--reps`` each); the JAX
compile time is reported separately. Prints one row per case with the steady-state times, audio
seconds per second, the ratio torch / jax (> 1 means JAX is faster) and how far JAX's hidden
states and attentions are from PyTorch's (max abs difference over all layers, relative to
max |h|; attention absolute).

``--precision`` sets both sides: JAX's matmul precision, and for PyTorch on CUDA whether TF32
is allowed (``highest``/``float32``: not allowed, in matmuls and cuDNN convolutions alike;
anything else: allowed, PyTorch's ``"high"``).

    python scripts/bench_forward.py                       # base and large, batch 1 and 8
    python scripts/bench_forward.py --sizes base --batches 1 --reps 3
    python scripts/bench_forward.py --torch-device cuda --precision tensorfloat32   # on a GPU
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


def run_torch(model, x):
    import torch

    with torch.inference_mode():
        out = model(x, output_hidden_states=True, output_attentions=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out


def alternating(first, second, reps: int) -> tuple[float, float]:
    """Median wall seconds of ``reps`` calls of each, called in turn: a slow spell of a shared
    machine lands on both sides instead of on whichever ran then (measured on a 2-core VM:
    PyTorch alone from 0.93 to 1.26 s between runs)."""
    times = ([], [])
    for _ in range(reps):
        for fn, out in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return float(np.median(times[0])), float(np.median(times[1]))


def deviation(model, torch_model, x, xt) -> tuple[float, float]:
    """(max |Δh| / max |h| over all hidden states, max |Δ attention|), JAX vs PyTorch."""
    ours = model.intermediates(x, attentions=True)
    theirs = run_torch(torch_model, xt)
    h = np.stack([t.float().cpu().numpy() for t in theirs.hidden_states])
    a = np.stack([t.float().cpu().numpy() for t in theirs.attentions])  # [L, B, H, T, T]
    dh = np.abs(np.asarray(ours.hidden_states, np.float32) - h).max() / np.abs(h).max()
    da = np.abs(np.asarray(ours.attentions, np.float32) - a).max()
    return float(dh), float(da)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision", default="highest", help="JAX matmul precision")
    parser.add_argument("--no-torch", action="store_true", help="time JAX only")
    parser.add_argument("--torch-device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)

    import torch
    from sslsim_jax.convert.hf import convert_state_dict
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from sslsim_jax.checkpoints import param_shapes
    from sslsim_jax.intermediates import SpeechModel
    from sslsim_jax.models import ModelConfig

    exact = args.precision in ("highest", "float32")
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact
    torch.set_float32_matmul_precision("highest" if exact else "high")
    gpu = torch.cuda.get_device_name() if args.torch_device.startswith("cuda") else ""
    print(f"# machine: {machine()} {gpu}; torch {torch.__version__} on {args.torch_device}")
    print(
        f"# {args.seconds:g} s audio each; precision={args.precision}; "
        f"median of {args.reps}, JAX and PyTorch calls alternating"
    )
    print(
        "| model | batch | jax compile (s) | jax (s) | jax audio s/s | torch eager (s) "
        "| torch audio s/s | torch / jax | max rel Δh | max Δattn |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    samples = int(args.seconds * 16000)
    for size in args.sizes:
        hf_config = Wav2Vec2Config(**SIZES[size], attn_implementation="eager")
        torch.manual_seed(0)
        torch_model = Wav2Vec2Model(hf_config).eval()
        torch_model.to(args.torch_device)
        config = ModelConfig.from_hf_config(hf_config.to_dict())
        state = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
        params = convert_state_dict(state, config, expected_shapes=param_shapes(config))
        model = SpeechModel(config, params, precision=args.precision)
        for batch in args.batches:
            x = np.random.default_rng(0).standard_normal((batch, samples)).astype(np.float32)

            start = time.perf_counter()
            run_jax(model, x)
            compile_s = time.perf_counter() - start
            audio_s = batch * args.seconds
            if args.no_torch:
                jax_s = timed(lambda: run_jax(model, x), args.reps, warmup=False)  # noqa: B023
            else:
                xt = torch.from_numpy(x).to(args.torch_device)
                run_torch(torch_model, xt)
                jax_s, torch_s = alternating(
                    lambda: run_jax(model, x),  # noqa: B023
                    lambda: run_torch(torch_model, xt),  # noqa: B023
                    args.reps,
                )
            row = f"| {size} | {batch} | {compile_s:.1f} | {jax_s:.3f} | {audio_s / jax_s:.1f} "
            if args.no_torch:
                print(row + "| - | - | - | - | - |", flush=True)
                continue
            dh, da = deviation(model, torch_model, x, xt) if batch == 1 else (np.nan, np.nan)
            print(
                row + f"| {torch_s:.3f} | {audio_s / torch_s:.1f} | {torch_s / jax_s:.2f} "
                f"| {dh:.1e} | {da:.1e} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
