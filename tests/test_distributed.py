"""Mesh, shardings and data-parallel analysis: one device and eight fake CPU devices give the
same table. Fake devices live in subprocesses, so the rest of the suite keeps one device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pandas as pd
import pytest

from sslsim_jax import demo, distributed
from sslsim_jax.analysis import AnalysisError, Settings, analyze
from sslsim_jax.audio import demo_audio_paths
from tests.conftest import fake_devices_env, run_on_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = demo_audio_paths()
# 5 utterances of 1.5 s in batches of 3 and 2 (batch_seconds=4.5): neither divides over 8
# devices, so every batch carries dummies.
SETTINGS = dict(
    metrics=("linear_cka", "maxcorr", "svcca", "debiased_cka"),
    attention=True,
    attention_methods=("fro", "js", "linear_cka"),
    max_seconds=1.5,
    batch_seconds=4.5,
    bootstrap=2,
)
KEYS = ["model_a", "layer_a", "model_b", "layer_b", "metric"]


def _models():
    return [
        ("w2v", demo.demo_model("tiny_wav2vec2", seed=0)),
        ("hubert", demo.demo_model("tiny_hubert", seed=1)),
    ]


def read_table(path, keys=KEYS) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={"layer_a": str, "layer_b": str})
    return table.sort_values(keys).reset_index(drop=True)


def assert_tables_close(table: pd.DataFrame, expected: pd.DataFrame, columns, name: str):
    """≤ 1e-6 relative, except Frobenius similarity of a head with itself: its distance 0 comes
    out of a Gram identity as up to ~10 √ε ‖A‖ in float32 (``attention.head_similarity_sums``),
    a rounding residue that depends on the matmul shapes, hence on the per-device batch."""
    same = (table.model_a == table.model_b) & (table.layer_a == table.layer_b)
    if "head_a" in table:
        same &= table.head_a == table.head_b
    fro = table.get("metric", table.get("method")).isin(["attention_fro", "fro"])
    residue = (same & fro).to_numpy()
    for column in columns:
        a, b = table[column].to_numpy(), expected[column].to_numpy()
        np.testing.assert_allclose(
            a[~residue], b[~residue], rtol=1e-6, atol=1e-6, err_msg=f"{name} {column}"
        )
        np.testing.assert_allclose(a[residue], b[residue], atol=1e-3, err_msg=f"{name} {column}")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    analyze(_models(), SPEECH, out, Settings(**SETTINGS), progress=False, report=False)
    return out


def test_mesh_and_shardings():
    mesh = distributed.make_mesh()
    assert mesh.axis_names == (distributed.DATA, distributed.STATS)
    assert mesh.size == jax.device_count() and mesh.shape[distributed.STATS] == 1
    assert distributed.batch_multiple(mesh) == 1
    x = distributed.shard_batch(np.arange(6.0).reshape(3, 2), mesh)
    assert x.sharding == distributed.data_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(x), np.arange(6.0).reshape(3, 2))
    with pytest.raises(ValueError, match="^devices: expected 1 <= N <= 1"):
        distributed.make_mesh(2)
    with pytest.raises(AnalysisError, match="^devices: expected >= 1, got 0"):
        Settings(devices=0)


def test_initialize_checks_its_flags():
    assert distributed.initialize() is False
    with pytest.raises(ValueError, match="--num-processes/--process-id: need --coordinator"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="also give --num-processes and --process-id"):
        distributed.initialize("127.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match="--process-id: expected 0 <= id < 2"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="--coordinator: expected HOST:PORT"):
        distributed.initialize("localhost", num_processes=2, process_id=0)


@pytest.mark.parametrize("stat_shards", [1, 4])
def test_eight_fake_devices_give_the_one_device_table(one_device, tmp_path, stat_shards):
    """Same analysis on 8 devices: 5 utterances, batches of 3 and 2 padded to 8; with
    ``stat_shards=4`` the statistics are split over 4 devices (2 along "data"), in one pass and
    in several (``max_memory``)."""
    code = f"""
        import jax
        from sslsim_jax import demo, distributed
        from sslsim_jax.audio import demo_audio_paths
        from sslsim_jax.analysis import Settings, analyze
        assert jax.device_count() == 8, jax.devices()
        mesh = distributed.make_mesh(stat_shards={stat_shards})
        x = distributed.shard_batch(jax.numpy.zeros((8 // {stat_shards}, 3)), mesh)
        assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (1, 3)
        models = [
            ("w2v", demo.demo_model("tiny_wav2vec2", seed=0)),
            ("hubert", demo.demo_model("tiny_hubert", seed=1)),
        ]
        settings = Settings(**{SETTINGS!r}, devices=8, stat_shards={stat_shards})
        out = {str(tmp_path / "d8")!r}
        table = analyze(models, demo_audio_paths(), out, settings, progress=False, report=False)
        # Split statistics are checkpointed by orbax, each device's rows apart; others in a .npz.
        import os
        kept = sorted(os.path.splitext(f)[1] for f in os.listdir(out + "/.sslsim_state"))
        assert kept == [".0", (".orbax" if {stat_shards} > 1 else ".npz")], kept
        # Same run, other metrics: the statistics come back from the checkpoint, onto their
        # devices (sharded when stat_shards > 1), and no model runs.
        def no_extraction(*args, **kwargs):
            raise AssertionError("a finished run must not run the models again")
        for _, model in models:
            model.intermediates = no_extraction
        import dataclasses, shutil
        shutil.copytree(out, out + "-again")
        cka = dataclasses.replace(settings, metrics=("linear_cka",))
        again = analyze(models, demo_audio_paths(), out + "-again", cka, progress=False,
                        report=False)
        ours = table[table.metric == "linear_cka"].value.to_numpy()
        assert (again[again.metric == "linear_cka"].value.to_numpy() == ours).all()
        if {stat_shards} > 1:  # and in passes over groups of networks: the same table
            for _, model in models:
                del model.intermediates
            passes = dataclasses.replace(settings, max_memory="4000000")
            split = analyze(models, demo_audio_paths(), out + "-passes", passes, progress=False,
                            report=False)
            import json
            plan = json.load(open(out + "-passes/run.json"))["plan"]
            assert len(plan["passes"]) > 1, plan
            import pandas as pd
            pd.testing.assert_frame_equal(split, table, check_exact=False, rtol=1e-5, atol=1e-5)
        """
    run = run_on_devices(code, devices=8)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_outputs(tmp_path / "d8", one_device)


def assert_same_outputs(out, expected_out):
    """similarities.csv, neurons.csv, attention_heads.csv and run.json's counts agree."""
    expected = read_table(expected_out / "similarities.csv")
    table = read_table(out / "similarities.csv")
    assert table[KEYS].equals(expected[KEYS])
    assert_tables_close(table, expected, ("value", "ci_low", "ci_high"), "similarities.csv")
    neurons = pd.read_csv(out / "neurons.csv")
    expected_neurons = pd.read_csv(expected_out / "neurons.csv")
    np.testing.assert_allclose(neurons.correlation, expected_neurons.correlation, rtol=1e-6,
                               atol=1e-6)  # fmt: skip
    keys = ["model_a", "layer_a", "head_a", "model_b", "layer_b", "head_b", "method"]
    heads = read_table(out / "attention_heads.csv", keys)
    expected_heads = read_table(expected_out / "attention_heads.csv", keys)
    assert heads[keys].equals(expected_heads[keys])
    assert_tables_close(heads, expected_heads, ("value",), "attention_heads.csv")
    # Top-k (maxcorr, svcca), also from statistics split over devices.
    topk_keys = [*KEYS, "k"]
    topk, expected_topk = (read_table(d / "topk.csv", topk_keys) for d in (out, expected_out))
    assert len(expected_topk) and topk[topk_keys].equals(expected_topk[topk_keys])
    np.testing.assert_allclose(topk.value, expected_topk.value, rtol=1e-5, atol=1e-5)
    run = json.loads((out / "run.json").read_text())
    expected_run = json.loads((expected_out / "run.json").read_text())
    assert run["frames"] == expected_run["frames"]
    assert run["attention_skipped_utterances"] == expected_run["attention_skipped_utterances"]
    assert all(v == 0 for v in run["attention_skipped_utterances"].values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_rows_are_assembled_by_shard_index():
    """`merge_processes` puts each process's statistics in its rows of a global array
    (`state._to_world`) by shard index: split and replicated arrays land whole in every row,
    and so does an array that comes back from its put on fewer devices than the mesh has (one
    two-process run failed there: a 2-device put with 1 shard)."""
    code = """
        import jax
        import numpy as np
        from jax.sharding import PartitionSpec as P
        from sslsim_jax import distributed
        from sslsim_jax.analysis import state as S
        mesh = distributed.make_mesh(stat_shards=2)  # data 2 x stats 2
        x = np.arange(24, dtype=np.float32).reshape(4, 6)
        for spec in (P(distributed.STATS), P(), P(None, distributed.STATS)):
            out = S._to_world(x, spec, mesh, mesh)
            assert out.shape == (2, 4, 6) and len(out.addressable_shards) == 4, spec
            np.testing.assert_array_equal(np.asarray(out), np.stack([x, x]), err_msg=str(spec))
        put, calls = jax.device_put, []
        def first_on_one_device(a, target):  # the put onto the mesh gives one shard only
            calls.append(target)
            return put(a, jax.devices()[1] if len(calls) == 1 else target)
        jax.device_put = first_on_one_device
        try:
            out = S._to_world(x, P(), mesh, mesh)
        finally:
            jax.device_put = put
        np.testing.assert_array_equal(np.asarray(out), np.stack([x, x]))
        assert {d.id for d in out.sharding.device_set} == {0, 1, 2, 3}
        print("ok")
    """
    result = run_on_devices(code, devices=4, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_two_processes_merge_statistics_like_one_pass():
    """Two real processes on localhost (gloo CPU collectives), 2 fake devices each.

    1. A jitted update on the mesh of both processes' devices, each holding half of the frames:
       the cross-process reduction gives the one-pass statistics of all frames.
    2. `merge_processes`, unequal shares of the frames: statistics (whole, and split over
       "stats"), bootstrap replicates, head sums and frame counts equal one pass over all
       frames; split statistics stay split over the process's devices.
    """
    code = """
        import dataclasses
        import os
        import sys
        import tempfile
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        from sslsim_jax import distributed, sharded, stats
        from sslsim_jax.analysis import Settings
        from sslsim_jax.analysis.state import (init_state, load_checkpoint, merge_processes,
                                               save_checkpoint)
        from sslsim_jax.metrics import attention as attn
        pid, port = int(sys.argv[1]), sys.argv[2]
        assert distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                                      timeout_seconds=60)
        FIELDS = (("count", 0), ("mean", 1e-6), ("comoment", 2e-5), ("row_cross", 1e-3),
                  ("row_gram", 1e-4))  # float32 against float64: row_* keep fewer digits

        def assert_moments(m, expected, what):
            for field, rtol in FIELDS:
                np.testing.assert_allclose(np.asarray(getattr(m, field)),
                                           getattr(expected, field), rtol=rtol, atol=1e-2,
                                           err_msg=f"{field}, {what}")

        mesh = distributed.make_mesh()
        assert mesh.size == 4 and distributed.batch_multiple(mesh) == 2
        rng = np.random.default_rng(0)
        z = (rng.normal(size=(16, 5)) * 3 + 100).astype(np.float32)  # [N, D], large mean
        w = rng.random(16) > 0.3  # [N]
        half = slice(8 * pid, 8 * pid + 8)
        update = jax.jit(lambda m, z, w: stats.update(m, z, where=w),
                         out_shardings=distributed.replicated(mesh))
        m = update(stats.init((2, 3)), distributed.shard_batch(z[half], mesh),
                   distributed.shard_batch(w[half], mesh))
        assert_moments(distributed.fetch_replicated(m),
                       stats.moments(z.astype(np.float64), where=w, sizes=(2, 3)), "global mesh")

        sizes = (2, 3, 3)
        z = (rng.normal(size=(40, 8)) * 3 + 100).astype(np.float32)  # large mean
        w = (rng.random(40) > 0.3).astype(np.float32)
        reps = rng.poisson(1.0, size=(2, 40)).astype(np.float32) * w
        mine = slice(0, 24) if pid == 0 else slice(24, 40)
        for shards in (1, 2):
            settings = Settings(stat_shards=shards, bootstrap=2)
            mesh = distributed.make_mesh(local=True, stat_shards=shards)
            state = init_state(sizes, settings, [], mesh)
            if shards == 1:
                cols, padded = z, sizes
                m = stats.update(state.moments, z[mine], where=w[mine])
                r = stats.update_replicates(state.replicates, z[mine], reps[:, mine])
            else:
                layout = sharded.Layout(sizes, shards)
                cols, padded = np.asarray(layout.pad([z[:, :2], z[:, 2:5], z[:, 5:]])), None
                padded = layout.padded_sizes
                put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
                data = PartitionSpec(distributed.DATA)
                zs = put(cols[mine], data)
                m = sharded.update(state.moments, zs, put(w[mine], data), mesh)
                r = sharded.update_replicates(
                    state.replicates, zs, put(reps[:, mine], PartitionSpec(None, distributed.DATA)),
                    mesh)
            heads = {("a", "b", "fro"): attn.HeadSimilarityState(
                jnp.full((2, 3), pid + 1.0), jnp.asarray(pid + 1), jnp.asarray(pid))}
            state.moments, state.replicates, state.heads = m, r, heads
            state.frames = int(w[mine].sum())
            # rbf_cka's subsample: 3 + 2 of 6 rows filled; merged in process order
            rows = np.arange(48, dtype=np.float32).reshape(6, 8)
            state.rbf = np.zeros((6, 8), np.float32)
            state.rbf_filled = 3 if pid == 0 else 2
            state.rbf[: state.rbf_filled] = rows[:3] if pid == 0 else rows[3:5]
            merged = merge_processes(state, settings)
            if shards > 1:  # still split over this process's devices
                assert len(merged.moments.comoment.sharding.device_set) == 2
                # and checkpointed by each process on its own, piece by piece (orbax writes
                # only arrays spanning every process), restored onto this process's devices
                path = os.path.join(tempfile.mkdtemp(), f"p{pid}.npz")
                save_checkpoint(path, merged)
                folder = path.removesuffix(".npz") + ".pieces"
                assert not os.path.exists(path) and os.listdir(folder) == [str(merged.done)]
                step = os.path.join(folder, str(merged.done))
                d = merged.moments.comoment.shape[0]
                for i in range(2):  # each device's rows of the co-moment, never all of them
                    piece = np.load(os.path.join(step, f"moments.comoment.{i}.npy"))
                    assert piece.shape == (d // 2, d), piece.shape
                back = load_checkpoint(path, init_state(sizes, settings, [], mesh))
                assert back.frames == int(w.sum())
                assert back.moments.comoment.sharding == merged.moments.comoment.sharding
                np.testing.assert_array_equal(np.asarray(back.replicates.comoment),
                                              np.asarray(merged.replicates.comoment))
                # a newer checkpoint replaces the step (and a write killed before its rename
                # is cleared); a damaged one is set aside, not used
                os.makedirs(os.path.join(folder, ".9.killed.partial"))
                save_checkpoint(path, dataclasses.replace(merged, done=merged.done + 1))
                assert os.listdir(folder) == [str(merged.done + 1)]
                with open(os.path.join(folder, str(merged.done + 1), "manifest.json"), "w") as f:
                    f.write("{")
                import warnings
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    empty = load_checkpoint(path, init_state(sizes, settings, [], mesh))
                assert empty.done == 0 and os.path.isdir(folder + ".bad"), caught
                assert "unreadable checkpoint" in str(caught[0].message)
                merged = dataclasses.replace(back, heads=merged.heads)
            got = distributed.fetch_replicated(merged)
            assert got.frames == int(w.sum())
            if shards == 1:  # (the checkpoint round trip above keeps no rbf rows)
                assert got.rbf_filled == 5 and (got.rbf[:5] == rows[:5]).all(), got.rbf
                assert not got.rbf[5:].any()
            h = got.heads["a", "b", "fro"]
            assert np.all(h.total == 3.0) and int(h.count) == 3 and int(h.skipped) == 1
            cases = [(got.moments, w)] + [
                (jax.tree.map(lambda a, i=i: a[i], got.replicates), reps[i]) for i in range(2)]
            for m, weights in cases:
                expected = stats.moments(cols.astype(np.float64), where=weights, sizes=padded)
                assert_moments(m, expected, f"{shards} shard(s)")
        print("ok", pid)
        """
    run_two_processes(code, devices=2, timeout=180)


def run_two_processes(code: str, *, devices: int, timeout: float, port: int | None = None) -> None:
    """Runs ``code`` as processes 0 and 1 (``argv``: id, port) on localhost with ``devices``
    fake CPU devices each; each must print ``ok <id>``."""
    port = str(port or free_port())
    env = fake_devices_env(devices)
    # A process still running shortly before the limit prints every thread's Python stack and
    # exits, so that a hang says where it was (the limit's own kill would leave no trace).
    dump = f"import faulthandler\nfaulthandler.dump_traceback_later({timeout - 20}, exit=True)\n"
    command = [sys.executable, "-c", dump + textwrap.dedent(code)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    procs = [subprocess.Popen([*command, str(pid), port], **pipes) for pid in (0, 1)]
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [f"process {pid}: " + p.communicate()[1][-6000:] for pid, p in enumerate(procs)]
        pytest.fail(f"two processes still running after {timeout} s\n" + "\n".join(tails))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [
        f"process {pid} (exit {p.returncode}): {stderr[-6000:]}"
        for pid, (p, (stdout, stderr)) in enumerate(zip(procs, results, strict=True))
        if p.returncode != 0 or f"ok {pid}" not in stdout
    ]
    # Both stacks: a process waiting in a collective says little without the other's.
    assert not failed, "\n".join(failed)


# The start of a two-process analysis (`run_two_processes`): joins the run, builds `models`.
ANALYSIS_PROCESS = textwrap.dedent("""
    import sys
    from sslsim_jax import demo, distributed
    from sslsim_jax.analysis import Settings, analyze
    pid, port = int(sys.argv[1]), sys.argv[2]
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           timeout_seconds=60)
    models = [
        ("w2v", demo.demo_model("tiny_wav2vec2", seed=0)),
        ("hubert", demo.demo_model("tiny_hubert", seed=1)),
    ]
    """)


def test_two_processes_give_the_one_process_table(one_device, tmp_path):
    """Each process analyses its share of the 5 utterances (0, 2, 4 and 1, 3) on 2 devices;
    process 0 writes the merged table, equal to the one-process one, also with the statistics
    split over each process's devices (``stat_shards=2``)."""
    code = ANALYSIS_PROCESS + textwrap.dedent(f"""
        import os
        from sslsim_jax.audio import demo_audio_paths
        out = {str(tmp_path)!r} + f"/p{{pid}}"
        analyze(models, demo_audio_paths(), out, Settings(**{SETTINGS!r}), progress=False,
                report=False)
        assert os.path.isfile(out + "/similarities.csv") == (pid == 0)
        # Statistics split over each process's devices too (on these CPU devices the metrics
        # run one row block at a time: sharded._per_device).
        analyze(models, demo_audio_paths(), out + "-split",
                Settings(**{SETTINGS!r}, stat_shards=2), progress=False, report=False)
        print("ok", pid)
        """)
    run_two_processes(code, devices=2, timeout=300)
    assert_same_outputs(tmp_path / "p0", one_device)
    assert_same_outputs(tmp_path / "p0-split", one_device)
    run = json.loads((tmp_path / "p0" / "run.json").read_text())
    assert run["processes"] == 2 and [u["path"] for u in run["utterances"]] == SPEECH


def test_two_processes_with_many_collective_programs_per_batch(tmp_path):
    """Every attention measure with bootstrap intervals, 20 utterances in batches of one (and
    a dummy): about ten programs per batch that reduce across a process's two devices.
    Dispatched without waiting, gloo deadlocked (process 1 stuck mid-extraction, process 0 in
    the merge: 3 runs in 3 at 72f0fb9, and with `distributed.settle` disabled); settled one
    at a time, never. The table equals one process's."""
    speech = SPEECH * 4
    settings = dict(
        SETTINGS,
        metrics=("linear_cka",),
        attention_methods=("fro", "js", "pearson", "linear_cka"),
        batch_seconds=1.5,
    )
    code = ANALYSIS_PROCESS + textwrap.dedent(f"""
        analyze(models, {speech!r}, {str(tmp_path)!r} + f"/p{{pid}}", Settings(**{settings!r}),
                progress=False, report=False)
        print("ok", pid)
        """)
    run_two_processes(code, devices=2, timeout=240)
    analyze(_models(), speech, tmp_path / "one", Settings(**settings), progress=False, report=False)
    table, expected = (read_table(tmp_path / d / "similarities.csv") for d in ("p0", "one"))
    assert table[KEYS].equals(expected[KEYS]) and table.ci_low.notna().all()
    assert_tables_close(table, expected, ("value", "ci_low", "ci_high"), "similarities.csv")


def test_a_failing_process_ends_the_whole_run(tmp_path):
    """Process 1's audio does not exist: it stops with an error naming the file, and process 0,
    waiting for it in the run's first collective, stops with an error too, in seconds. Without
    the CLI's immediate exit, process 1 would wait in JAX's shutdown barrier and process 0 in
    its collective, both for the barrier's 5 minutes."""
    port = str(free_port())
    model = os.path.join(ROOT, "sslsim_jax", "data", "models", "tiny-hubert")
    missing = str(tmp_path / "missing.wav")
    procs = []
    for pid, audio in enumerate((SPEECH[0], missing)):
        command = [
            sys.executable, "-m", "sslsim_jax.cli", "analyze", model, "--audio", audio,
            "--out", str(tmp_path / f"p{pid}"), "--quiet", "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2", "--process-id", str(pid),
        ]  # fmt: skip
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(subprocess.Popen(command, env=fake_devices_env(1), **pipes))
    try:
        errors = [p.communicate(timeout=150)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode != 0 for p in procs] == [True, True], errors
    assert "sslsim analyze: error: " in errors[1] and "missing.wav" in errors[1], errors[1]


def test_exit_on_failure_ends_a_joined_process_at_once():
    """`distributed.exit_on_failure`: outside a multi-process run an exception propagates; in
    one, it prints the traceback and the process ends with status 1 at once (no atexit
    handler, nothing after the block)."""
    with pytest.raises(ValueError, match="alone"), distributed.exit_on_failure():
        raise ValueError("alone")
    code = """
        import atexit
        from sslsim_jax import distributed
        atexit.register(print, "atexit ran")
        distributed._joined = True  # as `initialize` leaves it
        with distributed.exit_on_failure():
            raise ValueError("a clip that cannot be read")
        print("after the block")
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done
    assert "ValueError: a clip that cannot be read" in done.stderr
    assert "after the block" not in done.stdout and "atexit ran" not in done.stdout


def test_cli_multi_process_flags_need_a_coordinator(tmp_path, capsys):
    from sslsim_jax import cli

    args = ["analyze", "m", "--audio", "a", "--out", str(tmp_path), "--num-processes", "2"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "sslsim analyze: error: --num-processes/--process-id: need --coordinator HOST:PORT "
        "(or 'auto')"
    )


def test_coordinator_auto_reads_the_cluster_from_the_environment():
    """``--coordinator auto``: two processes of a (simulated) SLURM job of 2 tasks on this host
    find each other through JAX's cluster detection alone."""
    first = 65536 - 2**12  # JAX derives the port from the job id: 61440 + id % 4096
    port = next(p for p in range(first + 1000, 65536) if _port_free(p))
    code = f"""
        import os, sys
        pid = int(sys.argv[1])
        for name in ("KUBERNETES_SERVICE_HOST", "OMPI_MCA_orte_hnp_uri"):
            os.environ.pop(name, None)
        os.environ.update(
            SLURM_JOB_ID="{port - first}", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
            SLURM_PROCID=str(pid), SLURM_LOCALID=str(pid),
        )
        import jax
        from sslsim_jax import distributed
        assert distributed.initialize("auto", timeout_seconds=60)
        assert (jax.process_count(), jax.process_index()) == (2, pid)
        assert distributed.allgather_json({{"pid": pid}}) == [{{"pid": 0}}, {{"pid": 1}}]
        print("ok", pid)
        """
    run_two_processes(code, devices=1, timeout=120, port=port)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
