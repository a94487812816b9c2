"""The ``sslsim`` command line: help, the README's demo command, conversion errors."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sslsim(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sslsim_jax.cli", *args], capture_output=True, text=True, **kw
    )


def test_help_on_every_subcommand():
    for args in (["--help"], ["analyze", "--help"], ["demo", "--help"], ["report", "--help"],
                 ["convert", "--help"]):  # fmt: skip
        run = sslsim(*args)
        assert run.returncode == 0 and "usage: sslsim" in run.stdout, run.stderr


def test_convert_error_is_one_line_without_traceback(tmp_path):
    run = sslsim("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0
    assert "missing: no such model directory" in run.stderr


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
    run = subprocess.run(
        [str(env_dir / "bin" / "sslsim"), "demo", "--out", "demo-report", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = tmp_path / "demo-report"
    assert (out / "report.html").is_file()
    table = pd.read_csv(out / "similarities.csv")
    assert {"tiny-wav2vec2", "tiny-wav2vec2-ft", "tiny-hubert"} == set(table.model_a)
    assert (out / "figures").is_dir() and any((out / "figures").glob("finetune_*.png"))
    # The package came from the clone, not from this working tree.
    where = subprocess.run(
        [str(python), "-c", "import sslsim_jax; print(sslsim_jax.__file__)"],
        cwd=tmp_path, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert where.stdout.startswith(str(env_dir)), where.stdout
