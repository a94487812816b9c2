"""Tests of the pass planner: every pair of networks in exactly one pass, every pass within the
budget, and the --plan dry run."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sslsim_jax.analysis import AnalysisError
from sslsim_jax.analysis.plan import parse_size, plan_passes, statistics_bytes
from sslsim_jax.cli import main


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.sampled_from([8, 16, 24, 64]), min_size=1, max_size=30),
    budget_width=st.integers(16, 400),
    bootstrap=st.integers(0, 3),
)
def test_every_pair_is_in_exactly_one_pass_within_the_budget(sizes, budget_width, bootstrap):
    budget = statistics_bytes(budget_width, bootstrap=bootstrap)
    widest = sum(sorted(sizes)[-2:])
    if statistics_bytes(widest, bootstrap=bootstrap) > budget and len(sizes) > 1:
        with pytest.raises(AnalysisError, match="one pair of networks"):
            plan_passes(sizes, budget=budget, bootstrap=bootstrap)
        return
    if len(sizes) == 1 and statistics_bytes(sizes[0], bootstrap=bootstrap) > budget:
        return
    plan = plan_passes(sizes, budget=budget, bootstrap=bootstrap)
    group_of = plan.group_of
    for p in plan.passes:
        assert p.bytes <= budget
        assert p.bytes == statistics_bytes(sum(sizes[n] for n in p.networks), bootstrap=bootstrap)
    for a, b in itertools.combinations_with_replacement(range(len(sizes)), 2):
        owners = [p for p in plan.passes if p.owns(group_of, a, b)]
        assert len(owners) == 1, (a, b)
        assert a in owners[0].networks and b in owners[0].networks
    if statistics_bytes(sum(sizes), bootstrap=bootstrap) <= budget:
        assert len(plan.passes) == 1
    else:
        g = len(plan.groups)
        assert g >= 2 and len(plan.passes) == g * (g - 1) // 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16G", 16 * 2**30),
        ("500M", 500 * 2**20),
        ("1.5T", int(1.5 * 2**40)),
        ("2048", 2048),
        ("4GiB", 4 * 2**30),
        (None, None),
    ],  # fmt: skip
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_a_budget_too_small_for_one_pair_is_refused_in_readable_units():
    """Two networks of 96 neurons need 0.6 MB; a 10K budget is said as 10.2 kB, not 0.0 MB."""
    with pytest.raises(
        AnalysisError, match=r"needs 0\.6 MB per device, more than the budget of 10\.2 kB"
    ):
        plan_passes([96, 96], budget=parse_size("10K"))


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "1X"])
def test_bad_sizes_name_max_memory(text):
    with pytest.raises(AnalysisError, match="^max_memory: expected"):
        parse_size(text)


def test_plan_dry_run_reads_configs_only(tmp_path, capsys):
    """--plan needs no weights: config.json alone (here of base-sized models)."""
    from transformers import HubertConfig, Wav2Vec2Config

    paths = []
    for name, cls in (("w2v", Wav2Vec2Config), ("hubert", HubertConfig)):
        cls().save_pretrained(tmp_path / name)
        paths.append(str(tmp_path / name))
    # 26 networks of 768: 4·19968²·4 bytes = 6.4 GB in one pass; 2G gives groups of 8 networks.
    assert main(["analyze", *paths, "--plan", "--max-memory", "2G"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 26 networks in 4 group(s), 6 pass(es) over the audio")
    assert "runs w2v, hubert" in out and "all networks in one pass would need 6.4 GB" in out
