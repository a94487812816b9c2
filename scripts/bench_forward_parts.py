"""Where a base model's forward pass spends its time, JAX against transformers PyTorch eager.

Same random-weight wav2vec2-base layout as ``bench_forward.py`` (10 s, batch 1, every hidden
state and attention map). Times, side by side and interleaved per part: the whole forward, the
conv feature encoder, the positional conv, one transformer block (with its attention map), its
feed-forward network, GELU on the two sizes it sees; then the matmul rate of the block's GEMM
shapes in JAX, PyTorch and NumPy, and the forward's GEMM floor: its matmul and conv FLOPs at
the measured rate. Times are process CPU seconds with every library on one thread (``XLA_FLAGS``
set here, ``torch.set_num_threads(1)``), so other jobs on a shared machine change them little;
a part at its floor in both libraries cannot be made faster than the other's by more than the
other's overhead.

    python scripts/bench_forward_parts.py
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def cpu_time(fn, reps: int) -> float:
    """Median process CPU seconds of ``reps`` calls after one warm-up call."""
    from _bench import timed

    return timed(fn, reps, clock=time.process_time)


def forward_flops(config, samples: int) -> tuple[float, int]:
    """(matmul + conv FLOPs of one utterance's forward pass, frames)."""
    flops, length, channels = 0.0, samples, 1
    for dim, k, s in zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True):
        length = (length - k) // s + 1
        flops += 2 * length * k * channels * dim
        channels = dim
    t, d, f = length, config.hidden_size, config.intermediate_size
    flops += 2 * t * channels * d  # feature projection
    groups, k = config.num_conv_pos_embedding_groups, config.num_conv_pos_embeddings
    flops += 2 * t * k * d * d / groups  # positional conv
    block = 2 * t * d * d * 4 + 2 * t * d * f * 2 + 2 * 2 * t * t * d  # projections, FFN, QK, PV
    return flops + config.num_hidden_layers * block, t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from _bench import machine
    from sslsim_jax.convert.hf import convert_state_dict
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from sslsim_jax.checkpoints import param_shapes
    from sslsim_jax.intermediates import SpeechModel
    from sslsim_jax.models import ModelConfig
    from sslsim_jax.models import modules as M

    torch.set_num_threads(1)
    hf = Wav2Vec2Config(
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        conv_bias=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    tm = Wav2Vec2Model(hf).eval()
    config = ModelConfig.from_hf_config(hf.to_dict())
    state = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = convert_state_dict(state, config, expected_shapes=param_shapes(config))
    p = jax.tree.map(jnp.asarray, params)
    samples = int(args.seconds * 16000)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, samples)).astype(np.float32)
    xt = torch.from_numpy(x)
    prec = "highest"
    ready = jax.block_until_ready

    model = SpeechModel(config, params, precision=prec)
    fe = M.FeatureEncoder(config, precision=prec)
    lengths = jnp.array([samples])
    fe_jit = jax.jit(lambda q, w: fe.apply({"params": q}, w, lengths))
    frames = fe_jit(p["feature_extractor"], x)[0].shape[1]
    h = rng.standard_normal((1, frames, config.hidden_size)).astype(np.float32)
    hj, ht = jnp.asarray(h), torch.from_numpy(h)
    pos = M.PositionalConv(config, precision=prec)
    pos_jit = jax.jit(lambda q, h: pos.apply({"params": q}, h))
    layer = M.EncoderLayer(config, precision=prec, output_attentions=True)
    p0 = jax.tree.map(lambda a: a[0], p["encoder"]["layers"])
    mask = jnp.ones((1, frames), bool)
    layer_jit = jax.jit(lambda q, h: layer.apply({"params": q}, h, mask))
    ff = M.FeedForward(config, precision=prec)
    ff_jit = jax.jit(lambda q, h: ff.apply({"params": q}, h))
    gelu = jax.jit(lambda a: jax.nn.gelu(a, approximate=False))
    g1 = rng.standard_normal((frames, config.intermediate_size)).astype(np.float32)
    g0 = rng.standard_normal((samples // 5, config.conv_dim[0])).astype(np.float32)
    torch_layer = tm.encoder.layers[0]
    parts = {
        "whole forward": (
            lambda: ready(model.intermediates(x, attentions=True)),
            lambda: tm(xt, output_hidden_states=True, output_attentions=True),
        ),
        "feature encoder": (
            lambda: ready(fe_jit(p["feature_extractor"], x)),
            lambda: tm.feature_extractor(xt),
        ),
        "positional conv": (
            lambda: ready(pos_jit(p["encoder"]["pos_conv_embed"], hj)),
            lambda: tm.encoder.pos_conv_embed(ht),
        ),
        "one block": (
            lambda: ready(layer_jit(p0, hj)),
            lambda: torch_layer(ht, output_attentions=True),
        ),
        "its feed-forward": (
            lambda: ready(ff_jit(p0["feed_forward"], hj)),
            lambda: torch_layer.feed_forward(ht),
        ),
        f"GELU [{frames}, {config.intermediate_size}]": (
            lambda: ready(gelu(g1)),
            lambda: torch.nn.functional.gelu(torch.from_numpy(g1)),
        ),
        f"GELU [{samples // 5}, {config.conv_dim[0]}]": (
            lambda: ready(gelu(g0)),
            lambda: torch.nn.functional.gelu(torch.from_numpy(g0)),
        ),
    }
    print(f"# machine: {machine()}; torch {torch.__version__}; load {os.getloadavg()[0]:.1f}")
    print(f"# base, {args.seconds:g} s, batch 1, one thread each, median of {args.reps} (CPU s)")
    print("| part | jax (s) | torch (s) | torch / jax |")
    print("|---|---|---|---|")
    whole = {}
    with torch.inference_mode():
        for name, (fj, ft) in parts.items():
            a, b = cpu_time(fj, args.reps), cpu_time(ft, args.reps)
            whole.setdefault("jax", a)
            whole.setdefault("torch", b)
            print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f} |", flush=True)

    print("\n| GEMM [M, K] x [K, N] | jax GFLOP/s | torch GFLOP/s | numpy GFLOP/s |")
    print("|---|---|---|---|")
    d, f = config.hidden_size, config.intermediate_size
    rates = []
    for m, k, n in ((frames, d, d), (frames, d, f), (frames, f, d)):
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        mm = jax.jit(lambda a, b: jnp.dot(a, b, precision=prec))
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        gflop = 2 * m * k * n / 1e9
        row = [gflop / cpu_time(lambda: ready(mm(ja, jb)), 5)]  # noqa: B023
        row.append(gflop / cpu_time(lambda: ta @ tb, 5))  # noqa: B023
        row.append(gflop / cpu_time(lambda: a @ b, 5))  # noqa: B023
        rates.append(row[0])
        print(f"| [{m}, {k}] x [{k}, {n}] | " + " | ".join(f"{r:.1f}" for r in row) + " |")
    flops, _ = forward_flops(config, samples)
    floor = flops / 1e9 / np.mean(rates)
    print(
        f"\nforward: {flops / 1e9:.0f} GFLOP of matmuls and convs; at jax's GEMM rate "
        f"({np.mean(rates):.1f} GFLOP/s) {floor:.2f} s. jax {whole['jax']:.2f} s "
        f"({whole['jax'] / floor:.2f}x the floor), torch {whole['torch']:.2f} s "
        f"({whole['torch'] / floor:.2f}x); torch / floor = {whole['torch'] / floor:.2f} is the "
        "most any JAX code at this GEMM rate can gain on torch"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
