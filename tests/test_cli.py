"""The ``sslsim`` command line: help, the README's demo command, conversion errors."""

from __future__ import annotations

import dataclasses
import os
import site
import stat
import subprocess
import venv

import pandas as pd
import pytest
import tomllib

from sslsim_jax.analysis import AnalysisError, Settings
from sslsim_jax.cli import main
from tests.hf_models import GROUP_POST_LN, TINY, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", [[], ["analyze"], ["demo"], ["report"], ["convert"]])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: sslsim" in capsys.readouterr().out


def test_analyze_flags_are_generated_from_settings(capsys):
    """Every Settings field is a flag whose help is the field's help text."""
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(Settings):
        assert "--" + field.name.replace("_", "-") in text, field.name
        assert " ".join(field.metadata["help"].split())[:40] in text, field.name


def test_flags_reach_settings_and_errors_name_flags(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_analyze(models, audio, out, settings, **kwargs):
        seen["settings"] = settings
        raise AnalysisError("expected > 0, got -1.0", argument="max_seconds")

    monkeypatch.setattr("sslsim_jax.analysis.analyze", fake_analyze)
    args = ["analyze", "m", "--audio", "a.wav", "--out", str(tmp_path), "--layers", "1", "final"]
    args += ["--metrics", "svcca", "svcca", "maxcorr", "--max-seconds", "2.5", "--attention"]
    assert main(args) == 1
    settings = seen["settings"]
    assert settings.layers == (1, "final") and settings.metrics == ("svcca", "maxcorr")
    assert settings.max_seconds == 2.5 and settings.attention and settings.bootstrap == 0
    err = capsys.readouterr().err
    assert err == "sslsim analyze: error: --max-seconds: expected > 0, got -1.0\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-seconds", "inf"], "--max-seconds: expected a finite number, got inf"),
        (["--batch-seconds", "nan"], "--batch-seconds: expected a finite number, got nan"),
        (["--seed", "-1"], "--seed: expected >= 0, got -1"),
        (["--metrics", "cosine"], "--metrics: unknown metric(s) cosine; choose from maxcorr"),
        (["--layers", "x"], "--layers: expected layer indices or 'final', got 'x'"),
    ],
)
def test_bad_flag_values_are_one_line_errors_naming_the_flag(flags, message, tmp_path, capsys):
    code = main(["analyze", "m", "--audio", "a.wav", "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"sslsim analyze: error: {message}"), err


def test_convert_error_is_one_line_without_traceback(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "missing: no such model directory" in err


def test_demo_checks_out_before_building_any_model(tmp_path, capsys, monkeypatch):
    from sslsim_jax import demo

    def no_models(*args, **kwargs):
        raise AssertionError("--out must be checked before the models are built")

    monkeypatch.setattr(demo, "demo_models", no_models)
    monkeypatch.setattr(demo, "run", no_models)
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    assert main(["demo", "--out", str(taken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sslsim demo: error: --out: {taken}: exists and is not a directory"], err


def test_every_package_is_installed():
    """pyproject lists the packages (the convert/ folder is mapped into the namespace)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {
        os.path.relpath(d, ROOT).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(ROOT, "sslsim_jax"))
        if "__init__.py" in files
    }
    assert found | {"sslsim_jax.convert"} == listed


@pytest.mark.slow
def test_readme_demo_command_in_a_fresh_clone_and_venv(tmp_path):
    """`pip install . && sslsim demo --out demo-report` from a fresh clone of the committed tree.

    The package is installed from the clone, so missing package data or entry points fail here.
    """
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # pip and setuptools come from the host below
    python = env_dir / "bin" / "python"
    # This machine's packages (no network in CI), as plain path entries: unlike
    # system_site_packages=True this skips their .pth files, so an editable install of this
    # working tree cannot shadow the package installed from the clone.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(purelib, "_host_packages.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "."],
        cwd=clone, capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(env_dir / "bin" / "sslsim"), "demo", "--out", "demo-report", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, env=env, preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    # Colleagues can read every output under umask 022 (not mkstemp's 0600).
    for path in (tmp_path / "demo-report").rglob("*"):
        if path.is_file() and ".sslsim_state" not in path.parts:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o044 == 0o044, (path, oct(mode))
    # No top-level `convert` module is installed; `sslsim convert` is the converter.
    stray = subprocess.run(
        [str(python), "-c", "import convert"], cwd=tmp_path, capture_output=True, env=env
    )
    assert stray.returncode != 0
    hf_dir = tmp_path / "hf"
    build(hf_dir, "wav2vec2", **TINY, **GROUP_POST_LN)
    converted = subprocess.run(
        [str(env_dir / "bin" / "sslsim"), "convert", str(hf_dir), str(tmp_path / "converted")],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "converted" / "sslsim_jax.json").is_file()
    out = tmp_path / "demo-report"
    assert (out / "report.html").is_file()
    table = pd.read_csv(out / "similarities.csv")
    # The shipped trained models (package data of the clone) and the random-init baseline.
    from sslsim_jax.demo import model_paths

    assert {*model_paths(), "random-init"} == set(table.model_a)
    assert {"tiny-hubert", "tiny-hubert-ctc"} <= set(model_paths())
    assert (out / "figures").is_dir() and any((out / "figures").glob("finetune_*.png"))
    # The package came from the clone, not from this working tree.
    where = subprocess.run(
        [str(python), "-c", "import sslsim_jax; print(sslsim_jax.__file__)"],
        cwd=tmp_path, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert where.stdout.startswith(str(env_dir)), where.stdout
