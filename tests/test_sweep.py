"""Sweep planning (launch.submit ablate) and the memory probe's choice, without training."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cxr.training import memory
from cxr.training import probe as probe
from cxrbase.errors import CxrError
from launch.plans import parse_grid, plan_ablate
from launch.profiles import get_profile
from launch.submit import build_parser, debug_layout_note

CONFIG = "cxr/configs/phantom_sweep.yaml"  # batch 16, accumulation 1


def _args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["ablate", "--shards", "/s", "--runs", "/r", "--config", CONFIG, *argv])
    args.overrides = list(args.overrides)
    return args


def test_grid_seeds_resolutions_same_effective_batch(capsys):
    args = _args(
        "train.epochs=2",
        "--no-probe",
        "--effective-batch",
        "32",
        "--resolutions",
        "32",
        "64",
        "--seeds",
        "0",
        "1",
        "--grid",
        "loss.name=bce,focal",
    )
    plan = plan_ablate(args, get_profile("cpu-local"))
    assert len(plan.runs) == 2 * 2 * 2
    argv = plan.runs["res64_name-focal_seed1"]
    assert {
        "data.resolution=64",
        "loss.name=focal",
        "train.seed=1",
        "train.epochs=2",
        "train.grad_accum_steps=2",
    } <= set(argv)
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
    plan = plan_ablate(
        _args("data.batch_size=8", *probe, "--effective-batch", "16", "--resolutions", "32"), get_profile("cpu-local")
    )
    assert "train.grad_accum_steps=2" in plan.runs["res32"]
    assert "; micro-batch 8 × accumulation 2" in capsys.readouterr().out


def test_probe_is_planned_per_resolution():
    plan = plan_ablate(_args("--resolutions", "32", "128"), get_profile("cpu-local"))
    assert {n: (p["resolution"], p["effective_batch"]) for n, p in plan.probes.items()} == {
        "res32": (32, 16),
        "res128": (128, 16),
    }
    assert not any(a.startswith("train.grad_accum_steps") for a in plan.runs["res32"])
    # the probe measures under the run's numerics: the profile's precision reaches it
    assert any(o.startswith("train.mixed_precision=") for o in plan.probes["res32"]["overrides"])


@pytest.mark.parametrize("item", ["loss.name", "loss.name=", "=a,b", "loss.name=a,,b"])
def test_bad_grid_item(item):
    with pytest.raises(CxrError, match="--grid"):
        parse_grid([item])


def test_probe_choice_by_hand(monkeypatch):
    """peak(b) = 500 + 100 b MB plain, 300 + 100 b checkpointed; budget 1000 → largest divisor of 16
    that fits either way is 4 (plain 900 fits: no checkpointing at equal micro-batch)."""

    def fake(config, overrides, resolution, batch, device, method="measure"):
        return (500 if "false" in overrides[-1] else 300) + 100 * batch

    monkeypatch.setattr(probe, "measure", fake)
    got = probe.choose(None, [], 256, 16, device="cpu", budget_mb=1000)
    assert (got.micro_batch, got.grad_accum, got.grad_checkpointing, got.peak_mb) == (4, 4, False, 900)
    assert got.overrides() == ["data.batch_size=4", "train.grad_accum_steps=4", "model.grad_checkpointing=false"]
    # plain: 500 + 100 b ≤ 550 fits nothing; checkpointed: 300 + 100 b ≤ 550 → b = 2
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


def test_probe_prefers_the_largest_micro_batch_with_checkpointing(monkeypatch):
    """plain 1000 + 2000 b, checkpointed 1000 + 500 b, budget 10000 (+ 500 overhead): plain fits
    b ≤ 4 (9500), checkpointed b ≤ 16 (9500) → 16 × 1 with checkpointing, not 4 × 4 (BatchNorm
    would see 4 images instead of 16); the overhead counts (without it b = 16 still, with 1000
    more it is b = 8)."""

    def fake(config, overrides, resolution, batch, device, method="measure"):
        return 1000 + (2000 if "false" in overrides[-1] else 500) * batch

    monkeypatch.setattr(probe, "measure", fake)
    got = probe.choose(None, [], 256, 16, device="cpu", budget_mb=10000, overhead_mb=500)
    assert (got.micro_batch, got.grad_accum, got.grad_checkpointing, got.peak_mb) == (16, 1, True, 9500)
    assert "without checkpointing micro-batch 16 needs 33500 MB" in got.reason
    got = probe.choose(None, [], 256, 16, device="cpu", budget_mb=10000, overhead_mb=1500)
    assert (got.micro_batch, got.grad_checkpointing) == (8, True)
    assert got.config_micro_batch == 16 and "config 16" in got.differs_from_config()


@pytest.mark.slow
def test_probe_keeps_densenet121_batch_16_with_checkpointing_on_an_a10g():
    """The shipped DenseNet-121 config at 1024² on an A10G (23028 MiB listed) in bf16: the memory
    curve modelled from live tensor bytes of real CPU steps at 128² keeps micro-batch 16 with
    checkpointing (fp32 without checkpointing, the old probe, chose 4 × 4)."""
    got = probe.choose(
        "cxr/configs/densenet121.yaml",
        ["train.mixed_precision=bf16"],
        1024,
        16,
        device="cpu",
        capacity_mb=23028,
        method="model",
    )
    assert (got.micro_batch, got.grad_accum, got.grad_checkpointing) == (16, 1, True), got.reason
    assert got.numerics == {"autocast": "bfloat16", "channels_last": True, "cudnn_benchmark": False}
    assert got.differs_from_config() is None
    # the curve itself: checkpointing keeps much less per image than storing every activation
    plain, ckpt = got.curves["checkpointing=false"], got.curves["checkpointing=true"]
    assert ckpt["per_sample_mb"] < 0.25 * plain["per_sample_mb"]


def test_live_tensor_peak_counts_a_hand_computed_peak():
    """Two float32 tensors of 1 MiB alive at once, then one freed and a 2 MiB one made: peak 3 MiB."""
    import torch

    with memory.LiveTensorPeak() as tracker:
        a = torch.ones(2**18)  # 1 MiB
        b = a * 2  # 1 MiB: 2 live
        del a
        c = torch.cat([b, b])  # 2 MiB: b + c = 3 MiB live
        del b, c
    assert tracker.peak == 3 * 2**20
    assert tracker.current == 0


def test_ablation_report_names_runs_whose_probed_layout_differs():
    import pandas as pd

    from cxr.tools.ablation_report import _layout_notes

    same = probe.ProbeResult(
        1024, "cuda", 16, 16, 1, True, 20000, 100, 40, 2000, {}, config_micro_batch=16, config_grad_checkpointing=True
    )
    other = probe.ProbeResult(
        1024, "cuda", 16, 4, 4, False, 20000, 100, 40, 2000, {}, config_micro_batch=16, config_grad_checkpointing=True
    )
    costs = pd.DataFrame(
        {"run": ["a", "b"], "layout_note": [same.differs_from_config() or "", other.differs_from_config()]}
    )
    lines = _layout_notes(costs)
    assert [ln for ln in lines if ln.startswith("- ")] == [
        (
            "- b: the memory probe chose micro-batch 4 (config 16: BatchNorm sees 4 images per step instead); "
            "checkpointing false (config true)"
        )
    ]
