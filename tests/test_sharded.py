"""Sharded joint statistics (`sslsim_jax.sharded`) on 8 fake CPU devices: the same statistics
and metrics as one full copy, and a quarter of the memory per device with 4 shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sslsim_jax import sharded
from tests.conftest import run_on_devices

CODE = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from sslsim_jax import distributed, sharded, stats
    from sslsim_jax.metrics import kernels
    from sslsim_jax.pairwise import compare_moments

    metrics = ("maxcorr", "linreg", "svcca", "pwcca", "linear_cka", "debiased_cka", "procrustes")
    sizes = (5, 7, 6, 7, 3)  # 5 networks of mixed widths: padded to 8 networks of 7
    names = [f"n{i}" for i in range(len(sizes))]
    rng = np.random.default_rng(0)
    layout = sharded.Layout(sizes, 4)
    mesh = distributed.make_mesh(8, stat_shards=4)  # 2 along "data" x 4 along "stats"
    full, full_r = stats.init(sizes), None
    m, reps = sharded.init(layout, mesh), sharded.init(layout, mesh, replicates=2)
    for i in range(3):  # 3 batches of 16 frames, large means, a duplicated neuron, a mask
        cols = [rng.standard_normal((16, s)) * (1 + k) + 50 * k for k, s in enumerate(sizes)]
        cols[1][:, 2] = 2 * cols[0][:, 0]
        cols[4][:, 1] = 7.0  # a constant neuron
        cols = [jnp.asarray(c, jnp.float32) for c in cols]
        w = jnp.asarray((rng.random(16) > 0.25).astype(np.float32))
        w_r = jnp.asarray(rng.poisson(1.0, (2, 16)).astype(np.float32)) * w
        z = jnp.concatenate(cols, 1)
        full = stats.update(full, z, where=w)
        one = jax.vmap(lambda wr: stats.moments(z, where=wr, sizes=sizes))(w_r)
        full_r = one if full_r is None else jax.vmap(stats.merge)(full_r, one)
        zp = jax.device_put(layout.pad(cols), distributed.data_sharding(mesh))
        m = sharded.update(m, zp, w, mesh)
        reps = sharded.update_replicates(reps, zp, w_r, mesh)
    out = {"sharding": list(m.comoment.sharding.spec)}
    out["shard"] = m.comoment.addressable_shards[0].data.shape
    ref = compare_moments(full, names, metrics=metrics)
    got = sharded.pairwise(m, layout, mesh, names, metrics=metrics, neurons=True)
    out["metrics"] = {k: float(np.abs(ref[k] - got[k]).max()) for k in metrics}
    b = kernels.blocks(full)
    best, matched = kernels.neuron_best(b, kernels.inv_sd(b))
    best = np.asarray(best)
    out["best"] = float(np.nanmax(np.abs(best - got["best"])))
    same = bool((np.isnan(best) == np.isnan(got["best"])).all())
    out["undefined"] = [int(np.isnan(best).sum()), same]
    out["matched"] = bool((np.asarray(matched) == got["matched"]).all())
    out["valid"] = bool((np.asarray(b.valid) == got["valid"]).all())
    rep = []
    for r in range(2):
        ref_r = compare_moments(jax.tree.map(lambda a: a[r], full_r), names, metrics=metrics)
        m_r = jax.tree.map(lambda a: a[r], reps)
        got_r = sharded.pairwise(m_r, layout, mesh, names, metrics=metrics)
        rep.append(max(float(np.abs(ref_r[k] - got_r[k]).max()) for k in metrics))
    out["replicates"] = rep

    # Wu et al.'s top-k from the shards (constant neuron and padding excluded from the counts).
    from sslsim_jax.metrics import TOPK_METRICS, topk_all_from_moments
    ks = (0.1, 0.5, 1.0)
    ref_k = topk_all_from_moments(full, metrics=TOPK_METRICS, ks=ks)
    got_k = sharded.pairwise(m, layout, mesh, names, metrics=(), topk=TOPK_METRICS, ks=ks)
    out["topk"] = {
        k: [float(np.nanmax(np.abs(ref_k[k] - got_k["topk:" + k]))),
            bool((np.isnan(ref_k[k]) == np.isnan(got_k["topk:" + k])).all())]
        for k in TOPK_METRICS
    }

    # On CPU devices each row block runs on its own device, one after the other
    # (sharded._per_device); the program over the mesh, forced here, gives the same values.
    def both(**kw):
        per_device = sharded.pairwise(m, layout, mesh, names, **kw)
        default, sharded._per_device = sharded._per_device, lambda m: False
        try:
            return per_device, sharded.pairwise(m, layout, mesh, names, **kw)
        finally:
            sharded._per_device = default

    a, b = both(metrics=metrics, neurons=True, topk=TOPK_METRICS, ks=ks)
    assert set(a) == set(b)

    def compared(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return [float(np.nanmax(np.abs(x - y))), bool((np.isnan(x) == np.isnan(y)).all())]

    out["per_device"] = {k: compared(a[k], b[k]) for k in a}
    out["per_device_here"] = sharded._per_device(m)

    # Memory per device of one update: 8 networks of 128 (D = 1024) on 1 and on 4 shards.
    memory = {}
    for shards in (1, 4):
        lay = sharded.Layout((128,) * 8, shards)
        mesh_s = distributed.make_mesh(shards, stat_shards=shards)
        ms = sharded.init(lay, mesh_s)
        zs = jnp.zeros((64, 1024))
        compiled = sharded._updater(mesh_s, ms.sizes, False).lower(ms, zs, jnp.ones(64)).compile()
        analysis = compiled.memory_analysis()
        memory[shards] = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
    out["memory"] = memory
    print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
    run = run_on_devices(CODE, devices=8)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_rows_are_split_over_the_stats_axis(result):
    assert result["sharding"] == ["stats"]
    assert result["shard"] == [2 * 7, 8 * 7]  # 2 of 8 padded networks' rows, all columns


def test_sharded_metrics_equal_the_full_statistics(result):
    for metric, diff in result["metrics"].items():
        assert diff < 2e-5, (metric, diff)
    assert result["best"] < 1e-5 and result["matched"] and result["valid"]
    count, same = result["undefined"]  # the constant neuron and padding: NaN in both, nowhere else
    assert count > 0 and same


def test_sharded_bootstrap_replicates_equal_the_full_ones(result):
    assert max(result["replicates"]) < 2e-5


def test_sharded_topk_equals_the_full_statistics(result):
    assert set(result["topk"]) == {"maxcorr", "linreg", "svcca", "pwcca"}
    for metric, (diff, same_nan) in result["topk"].items():
        assert diff < 2e-5 and same_nan, (metric, diff, same_nan)


def test_row_blocks_one_device_at_a_time_equal_the_mesh_program(result):
    """CPU devices run the metrics' programs one row block at a time (no two LAPACK kernels at
    once in the shared thread pool); the program over the mesh (GPUs, TPUs) gives the same."""
    assert result["per_device_here"]
    assert {"maxcorr", "pwcca", "best", "matched", "valid", "topk:svcca"} <= set(
        result["per_device"]
    )
    for name, (diff, same_nan) in result["per_device"].items():
        assert diff < 1e-6 and same_nan, (name, diff, same_nan)


def test_four_shards_need_about_a_quarter_of_the_memory(result):
    one, four = result["memory"]["1"], result["memory"]["4"]
    comoment = 1024 * 1024 * 4  # bytes of the full co-moment
    assert one > 2 * comoment  # the statistics plus the batch's and merge's temporaries
    assert four < 0.3 * one


def test_layout_and_mesh_errors():
    layout = sharded.Layout((4, 6), 4)
    assert (layout.width, layout.networks, layout.padded_sizes) == (6, 4, (6,) * 4)
    assert layout.real.sum() == 10
    padded = np.asarray(layout.pad([np.ones((3, 4)), np.ones((3, 6))]))
    assert padded.shape == (3, 24) and padded.sum() == 30
    with pytest.raises(ValueError, match=r"expected a network of shape \(3, 4\), got \(3, 5\)"):
        layout.pad([np.ones((3, 5)), np.ones((3, 6))])
    with pytest.raises(ValueError, match="expected 2 networks, got 1"):
        layout.pad([np.ones((3, 4))])
    from sslsim_jax import distributed
    from sslsim_jax.analysis import AnalysisError, Settings

    with pytest.raises(ValueError, match="^stat_shards: expected a divisor of the 1 devices"):
        distributed.make_mesh(1, stat_shards=2)
    with pytest.raises(AnalysisError, match="^stat_shards: expected >= 1, got 0"):
        Settings(stat_shards=0)
