"""Memory estimates against XLA's own accounting, the process's memory limit, and the guards
that turn out-of-memory failures (and the hang they caused) into errors before any batch."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from sslsim_jax import memory, stats
from sslsim_jax.demo import _init, demo_config
from sslsim_jax.intermediates import forward
from sslsim_jax.models.modules import SpeechEncoder
from tests.test_stats import replicates_of, vmap_update_replicates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_limited(code: str, *, address_space: int, timeout: float = 240):
    """Runs ``code`` in a fresh interpreter under an address-space limit (``ulimit -v``), set
    by the child itself before it imports JAX (no ``preexec_fn``: forking a JAX process is
    unsafe)."""
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({address_space},) * 2)\n"
    return subprocess.run(
        [sys.executable, "-c", limit + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip


def compiled_forward_memory(config, seconds: float, *, attentions: bool, block="default"):
    """XLA's (temp, output) bytes of the jitted forward pass on one utterance (not run)."""
    kw = {} if block == "default" else {"attention_block": block}
    module = SpeechEncoder(config, **kw)
    params = jax.eval_shape(lambda: _init(config, 0))
    samples = int(seconds * 16000)
    compiled = (
        jax.jit(lambda p, w, n: forward(module, p, w, n, attentions))
        .lower(
            params,
            jax.ShapeDtypeStruct((1, samples), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        )
        .compile()
    )
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


def test_attention_map_bytes():
    config = demo_config("tiny_wav2vec2")  # L = 4 blocks, H = 4 heads
    assert memory.attention_map_bytes(config, 100, 2) == 4 * 4 * 2 * 4 * 100 * 100
    with pytest.raises(ValueError, match="frames"):
        memory.attention_map_bytes(config, 0, 2)


@pytest.mark.parametrize(
    "name,seconds,attentions",
    [("tiny_wav2vec2", 80, False), ("tiny_wav2vec2", 60, True), ("tiny_hubert", 40, True)],
)
def test_activation_bytes_follow_xla(name, seconds, attentions):
    """The estimate is XLA's temp + output bytes of the compiled forward, within [0.95, 1.5]
    (measured 2026-11-28, jax 0.10.2 CPU: ratios 0.98–1.2 for the tiny and base configs)."""
    config = demo_config(name)
    temp, out = compiled_forward_memory(config, seconds, attentions=attentions)
    frames = config.num_frames(seconds * 16000)
    estimate = memory.activation_bytes(config, frames, 1, attentions=attentions)
    assert 0.95 <= estimate / (temp + out) <= 1.5, (estimate, temp, out)


def test_blocked_attention_memory_grows_linearly_in_frames():
    """Doubling T (2000 -> 4000 frames) doubles the blocked forward's temporaries; the plain
    one's [B, H, T, T] scores make them grow about 4x (the test would catch a lost block)."""
    config = demo_config("tiny_wav2vec2")
    blocked = [compiled_forward_memory(config, s, attentions=False)[0] for s in (40, 80)]
    plain = [compiled_forward_memory(config, s, attentions=False, block=None)[0] for s in (40, 80)]
    assert blocked[1] / blocked[0] < 2.3, blocked
    assert plain[1] / plain[0] > 3.3, plain
    assert blocked[1] < plain[1] / 3


@pytest.mark.slow
def test_four_minute_utterance_without_maps_runs_in_3_gb():
    """4 minutes (T = 12 000 frames) through the tiny demo model under ``ulimit -v`` 3 GB:
    blocked attention needs ~1.1 GB resident; the plain path fails allocating 4.6 GB."""
    code = """
        import numpy as np
        from sslsim_jax.demo import demo_model
        from sslsim_jax.intermediates import SpeechModel
        m = demo_model("tiny_wav2vec2")
        x = np.random.default_rng(0).standard_normal((1, 240 * 16000)).astype(np.float32)
        print(np.isfinite(np.asarray(m.intermediates(x).hidden_states)).all())
        plain = SpeechModel(m.config, m.params, attention_block=None)
        try:
            np.asarray(plain.intermediates(x).hidden_states)
        except Exception as e:
            print(type(e).__name__, str(e)[:80])
    """
    out = run_limited(code, address_space=3 * 10**9)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "True"
    assert "RESOURCE_EXHAUSTED" in lines[1]


def test_intermediates_refuse_maps_that_cannot_fit_instead_of_hanging():
    """5 minutes with attention maps (21.7 GB) under a 3 GB ``ulimit -v``: without the guard
    the failed allocation of the maps left ``np.asarray(out.frame_mask)`` waiting forever."""
    code = """
        import numpy as np
        from sslsim_jax.demo import demo_model
        m = demo_model("tiny_wav2vec2")
        x = np.zeros((1, 300 * 16000), np.float32)
        try:
            out = m.intermediates(x, attentions=True)
            np.asarray(out.frame_mask)
        except ValueError as e:
            print(e)
    """
    out = run_limited(code, address_space=3 * 10**9, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "300.0 s" in out.stdout and "attentions=False" in out.stdout
    assert "ulimit -v" in out.stdout


def test_check_forward_memory_names_max_seconds():
    configs = {"w2v": demo_config("tiny_wav2vec2"), "hubert": demo_config("tiny_hubert")}
    limit = 2 * 10**9
    memory.check_forward_memory(configs, 60 * 16000, 1, attentions=True, limit_bytes=limit)
    memory.check_forward_memory(configs, 300 * 16000, 1, attentions=False, limit_bytes=limit)
    with pytest.raises(ValueError) as e:
        memory.check_forward_memory(
            configs, 300 * 16000, 1, attentions=True, limit_bytes=limit, limit_description="RAM"
        )
    message = str(e.value)
    assert "300.0 s" in message and "model w2v" in message and "of RAM" in message
    assert "--max-seconds" in message and "\n" not in message
    # The suggested crop fits, one more second does not.
    seconds = int(message.split("--max-seconds ")[1].split()[0])
    config = configs["w2v"]
    kw = dict(attentions=True)
    fits = memory.activation_bytes(config, config.num_frames(seconds * 16000), 1, **kw)
    more = memory.activation_bytes(config, config.num_frames((seconds + 1) * 16000), 1, **kw)
    assert fits <= limit < more
    with pytest.raises(ValueError, match="limit_bytes"):
        memory.check_forward_memory(configs, 16000, 1, attentions=True, limit_bytes=0)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def no_rlimits(monkeypatch):
    limits = {}
    monkeypatch.setattr(memory.resource, "getrlimit", lambda which: limits.get(which, (-1, -1)))
    monkeypatch.setattr(memory.resource, "RLIM_INFINITY", -1)
    return limits


def test_available_memory_reads_cgroup_v2_and_v1(tmp_path, no_rlimits):
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    write(proc, "0::/job/step\n4:memory:/job\n")
    write(root / "job" / "step" / "memory.max", "max\n")  # no limit on the leaf...
    write(root / "job" / "memory.max", f"{ram // 4}\n")  # ...but on its parent
    write(root / "memory" / "job" / "memory.limit_in_bytes", "9223372036854771712\n")  # none
    limit, what = memory.available_memory(cgroup_root=str(root), proc_cgroup=str(proc))
    assert limit == ram // 4 and "cgroup" in what and "job/memory.max" in what
    write(root / "memory" / "job" / "memory.limit_in_bytes", f"{ram // 8}\n")
    limit, what = memory.available_memory(cgroup_root=str(root), proc_cgroup=str(proc))
    assert limit == ram // 8 and "memory.limit_in_bytes" in what
    # Without cgroup files: physical RAM.
    limit, what = memory.available_memory(cgroup_root=str(root), proc_cgroup=str(tmp_path / "x"))
    assert (limit, what) == (ram, "physical RAM")


def test_available_memory_smallest_rlimit_wins(tmp_path, no_rlimits):
    absent = dict(cgroup_root=str(tmp_path), proc_cgroup=str(tmp_path / "none"))
    no_rlimits[resource.RLIMIT_DATA] = (3 * 10**9, -1)
    assert memory.available_memory(**absent) == (3 * 10**9, "data-segment limit (ulimit -d)")
    no_rlimits[resource.RLIMIT_AS] = (2 * 10**9, -1)
    assert memory.available_memory(**absent) == (2 * 10**9, "address-space limit (ulimit -v)")


def test_available_memory_under_a_real_ulimit():
    code = """
        from sslsim_jax import memory
        print(*memory.available_memory(), sep="|")
    """
    out = run_limited(code, address_space=5 * 10**9, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    limit, what = out.stdout.strip().split("|")
    assert int(limit) <= 5 * 10**9
    assert what == "address-space limit (ulimit -v)" or "cgroup" in what


def _compiled_temp(update, r, n, d):
    m = jax.eval_shape(lambda: replicates_of(r, d, (d,)))
    args = (m, jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((r, n), jnp.float32))
    return jax.jit(update).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("chunk", [1, 4])
def test_bootstrap_bytes_follow_xla(chunk):
    """R = 24 replicates of N = 500 frames, D = 128: the formula is XLA's temp bytes within a
    factor 2, and the vmap (all replicates at once) needs far more."""
    r, n, d = 24, 500, 128
    temp = _compiled_temp(lambda m, z, w: stats.update_replicates(m, z, w, chunk=chunk), r, n, d)
    estimate = memory.bootstrap_bytes(d, n, r, chunk)
    assert 0.5 <= estimate / temp <= 2.0, (estimate, temp)
    assert _compiled_temp(vmap_update_replicates, r, n, d) > 3 * temp
