"""End-to-end tests of the ``sslsim`` command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd

from sslsim_jax import demo


def sslsim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sslsim_jax.cli", *args], capture_output=True, text=True
    )


def test_demo_writes_the_table_it_prints(tmp_path):
    run = sslsim("demo", "--out", str(tmp_path), "--utterances", "3", "--seconds", "1")
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(tmp_path / "similarities.csv")
    assert list(table.columns) == ["network_a", "network_b", "metric", "value"]
    assert set(table.metric) == {"linear_cka", "svcca", "maxcorr"}
    assert np.isfinite(table.value).all()
    self_pairs = table[table.network_a == table.network_b]
    np.testing.assert_allclose(self_pairs.value, 1.0, atol=1e-4)
    assert "linear_cka (row network in terms of column network)" in run.stdout


def test_demo_table_equals_library_on_same_activations():
    """The demo's numbers are `compare` applied to the models' masked hidden states."""
    from sslsim_jax.pairwise import compare

    table = demo.run(utterances=2, seconds=1.0, batch_size=2, metrics=("linear_cka",))
    audio = demo.synthetic_speech(2, 1.0, seed=0)
    networks = {}
    for i, name in enumerate(demo.DEMO_MODELS):
        model = demo.demo_model(name, seed=i)
        for x in audio:  # one utterance at a time, no padding
            h = np.asarray(model.intermediates(x[None]).hidden_states)[:, 0]
            for layer in range(h.shape[0]):
                networks.setdefault(f"{name}:{layer}", []).append(h[layer])
    networks = {k: np.concatenate(v) for k, v in networks.items()}
    expected = compare(networks, metrics=["linear_cka"])
    merged = table.merge(expected, on=["network_a", "network_b", "metric"])
    assert len(merged) == len(table) == 100
    np.testing.assert_allclose(merged.value_x, merged.value_y, atol=2e-5)


def test_convert_error_is_one_line_without_traceback(tmp_path):
    run = sslsim("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0
    assert "missing: no such model directory" in run.stderr


def test_help_on_every_subcommand():
    for args in (["--help"], ["demo", "--help"], ["convert", "--help"]):
        run = sslsim(*args)
        assert run.returncode == 0 and "usage: sslsim" in run.stdout
