"""Sweep planning (launch.submit ablate) and the memory probe's choice, without training."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import cxr.probe as probe
from launch.profiles import get_profile
from launch.submit import build_parser, debug_layout_note, parse_grid, plan_ablate
from cxrbase.errors import CxrError

CONFIG = "cxr/configs/phantom_sweep.yaml"  # batch 16, accumulation 1


def _args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["ablate", "--shards", "/s", "--runs", "/r", "--config", CONFIG, *argv])
    args.overrides = list(args.overrides)
    return args


def test_grid_seeds_resolutions_same_effective_batch(capsys):
    args = _args("train.epochs=2", "--no-probe", "--effective-batch", "32", "--resolutions", "32", "64",
                 "--seeds", "0", "1", "--grid", "loss.name=bce,focal")
    plan = plan_ablate(args, get_profile("cpu-local"))
    assert len(plan.runs) == 2 * 2 * 2
    argv = plan.runs["res64_name-focal_seed1"]
    assert {"data.resolution=64", "loss.name=focal", "train.seed=1", "train.epochs=2",
            "train.grad_accum_steps=2"} <= set(argv)
    assert all("train.grad_accum_steps=2" in a for a in plan.runs.values())
    report, extra = plan.ablation_report
    assert report == plan.run_dirs["res32_name-bce_seed0"].parent / "report"
    assert extra[:3] == ["--by", "data.resolution", "loss.name"]
    assert "unknown (no readable /s/manifest.json)" in capsys.readouterr().out


@pytest.mark.parametrize("probe", [[], ["--no-probe"]])
def test_a_batch_size_override_is_what_the_plan_prints_and_the_runs_use(capsys, probe):
    """phantom_sweep.yaml says batch 16; with data.batch_size=8 on the command line every run trains
    8 × 1, with or without --no-probe (the job skips the probe when the batch is given), and the plan
    says so (it printed 16 × 1 before); --effective-batch 16 makes it 8 × 2."""
    plan = plan_ablate(_args("data.batch_size=8", *probe, "--resolutions", "32"), get_profile("cpu-local"))
    argv = plan.runs["res32"]
    assert argv.index("data.batch_size=8") < argv.index("train.grad_accum_steps=1") and not plan.probes
    assert "; micro-batch 8 × accumulation 1" in capsys.readouterr().out
    plan = plan_ablate(_args("data.batch_size=8", *probe, "--effective-batch", "16", "--resolutions", "32"),
                       get_profile("cpu-local"))
    assert "train.grad_accum_steps=2" in plan.runs["res32"]
    assert "; micro-batch 8 × accumulation 2" in capsys.readouterr().out


def test_probe_is_planned_per_resolution():
    plan = plan_ablate(_args("--resolutions", "32", "128"), get_profile("cpu-local"))
    assert {n: (p["resolution"], p["effective_batch"]) for n, p in plan.probes.items()} == {
        "res32": (32, 16), "res128": (128, 16)}
    assert not any(a.startswith("train.grad_accum_steps") for a in plan.runs["res32"])


@pytest.mark.parametrize("item", ["loss.name", "loss.name=", "=a,b", "loss.name=a,,b"])
def test_bad_grid_item(item):
    with pytest.raises(CxrError, match="--grid"):
        parse_grid([item])


def test_probe_choice_by_hand(monkeypatch):
    """peak(b) = 500 + 100 b MB; budget 1000 → largest divisor of 16 with 500 + 100 b ≤ 1000 is 4."""
    calls = []

    def fake(config, overrides, resolution, batch, device):
        calls.append(overrides[-1])
        return (500 if "false" in overrides[-1] else 300) + 100 * batch

    monkeypatch.setattr(probe, "measure", fake)
    got = probe.choose(None, [], 256, 16, device="cpu", budget_mb=1000)
    assert (got.micro_batch, got.grad_accum, got.grad_checkpointing, got.peak_mb) == (4, 4, False, 900)
    assert got.overrides() == ["data.batch_size=4", "train.grad_accum_steps=4", "model.grad_checkpointing=false"]
    # b = 1 does not fit without checkpointing (600 > 550), fits with it (300 + 100 b ≤ 550 → b = 2)
    got = probe.choose(None, [], 256, 16, device="cpu", budget_mb=550)
    assert (got.micro_batch, got.grad_accum, got.grad_checkpointing) == (2, 8, True)
    with pytest.raises(CxrError, match="even micro-batch 1"):
        probe.choose(None, [], 256, 16, device="cpu", budget_mb=350)


def test_debug_cluster_says_it_runs_one_process_whatever_the_profile():
    """profiles.yaml's cpu-local asks for 1 node × 2 processes; --cluster debug runs 1 and says so."""
    import yaml

    table = yaml.safe_load(Path("launch/profiles.yaml").read_text())["cpu-local"]
    note = debug_layout_note(get_profile("cpu-local"))
    assert f"not the {table['nodes']} node(s) × {table['processes_per_node']} of profile cpu-local" in note
    assert "1 node(s) × 3" in debug_layout_note(get_profile("cpu-local"), processes=3)
