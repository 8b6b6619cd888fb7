"""bench/gpu_check.py in its --device cpu smoke mode: every row present with finite numbers.

The references are independent of the script's own arithmetic: the row list is written out
here by hand from the script's documented order, and the smoke runs in a subprocess that
refuses to import DALI, DeepSpeed, webdataset or submitit (the GPU machine has none of them).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]

# what the GPU machine lacks: importing any of these on the check's path fails as there
BLOCK = """
import sys
for name in ("deepspeed", "webdataset", "submitit", "nvidia.dali", "transformers"):
    sys.modules[name] = None  # import raises ImportError, find_spec says absent: as if not installed
sys.argv = ["bench/gpu_check.py"] + sys.argv[1:]
sys.path.insert(0, "bench")
import runpy
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


def expected_rows(models: list[str], resolutions: list[int], extra: bool = False) -> list[tuple[str, str, str]]:
    """(check, model, res) of every row, in the order the module docstring gives."""
    big = str(max(resolutions))
    rows = [(c, m, str(r)) for m in models for r in resolutions for c in ("throughput", "checkpoint")]
    rows += [("compile", m, big) for m in models for _ in (0, 1)]
    rows += [("probe", models[0], big), ("png decode", "-", "1024"), ("resume", models[0], "32")]
    rows += [("compile", m, str(r)) for m in models for r in resolutions if str(r) != big for _ in (0, 1)]
    if extra:
        rows += [("max batch", models[0], big), ("jpeg decode", "-", big)]
    return rows


def run_check(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, "--device", "cpu", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert out.exists(), proc.stderr[-3000:]
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]
    return proc, rows


def test_budget_zero_skips_every_row_with_a_note(tmp_path):
    proc, rows = run_check(tmp_path, "--budget-s", "0", "--models", "cnn", "--resolutions", "32,48", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(r["check"], r["model"], r["res"]) for r in rows] == expected_rows(["cnn"], [32, 48])
    assert all(r["note"].startswith("skipped: needs") and r["value"] == "nan" for r in rows)


@pytest.mark.slow
def test_cpu_smoke_every_row_finite_without_dali_or_deepspeed(tmp_path):
    proc, rows = run_check(
        tmp_path, "--models", "cnn", "--resolutions", "32", "--budget-s", "600", "--extra", timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["check"], r["model"], r["res"]) for r in rows] == expected_rows(["cnn"], [32], extra=True)
    for r in rows:
        assert math.isfinite(float(r["value"])), r
        assert r["check"] in ("png decode", "probe") or math.isfinite(float(r["peak_mib"])), r
        assert not r["note"].startswith(("FAILED", "skipped")), r
    by_check = {r["check"]: r for r in rows}
    assert float(by_check["resume"]["value"]) == 1.0, by_check["resume"]  # bitwise equal after resume
    assert int(by_check["max batch"]["value"]) == 4  # the CPU cap: nothing runs out of memory on CPU
    assert all(float(r["value"]) > 0 for r in rows)
    assert "real NIH PNGs" in by_check["png decode"]["note"]
    assert "predicted" in by_check["probe"]["note"] and "peak RSS" in by_check["probe"]["note"]


def test_default_gpu_run_fits_six_minutes_by_its_own_estimate_in_order_of_value(monkeypatch):
    """DenseNet-121 at 512 and 1024: eager ± checkpointing, then compiled, the probe, PNG decode,
    resume; the estimate of what runs stays within the default 360 s budget."""
    gpu_check = _load_gpu_check(monkeypatch)
    plan = gpu_check.build_plan(gpu_check.parse_args(["--device", "cuda"]))
    assert plan.budget_s == 360 and gpu_check.estimated_seconds(plan) <= 360
    order = [(c, a) for c, _e, _s, a in gpu_check.rows_to_run(plan)]
    assert order[:4] == [
        ("throughput", ("densenet121", 512, False, False)),
        ("checkpoint", ("densenet121", 512, True, False)),
        ("throughput", ("densenet121", 1024, False, False)),
        ("checkpoint", ("densenet121", 1024, True, False)),
    ]
    checks = [c for c, _ in order]
    assert checks[4:9] == ["compile", "compile", "probe", "png decode", "resume"]
    assert all(c == "compile" for c in checks[9:])  # optional: the compiled 512 rows, dropped first


def test_compile_falls_back_without_a_c_compiler(monkeypatch):
    gpu_check = _load_gpu_check(monkeypatch)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    backend, note = gpu_check.compile_backend("inductor")
    assert backend == "aot_eager" and "no C compiler" in note
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert gpu_check.compile_backend("inductor") == ("inductor", "")


def _load_gpu_check(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_max_batch_search_stops_within_6_percent_of_the_oom_edge(tmp_path, monkeypatch):
    """The search against a fake loop that runs out of memory above 37 (both ways torch reports it)."""
    import torch

    gpu_check = _load_gpu_check(monkeypatch)
    tried = []

    def fake_train(cfg, loader_fn):
        b = cfg.data.batch_size
        tried.append(b)
        if b > 37:
            raise (torch.cuda.OutOfMemoryError if b % 2 else RuntimeError)("CUDA out of memory. Tried to allocate")
        return 0

    monkeypatch.setattr(gpu_check, "run_train", fake_train)
    plan = gpu_check.build_plan(gpu_check.parse_args(["--device", "cpu", "--batch", "16", "--max-batch-cap", "1024"]))
    row = gpu_check.max_batch(plan, tmp_path, "cnn", 32, deadline=float("inf"))
    assert 37 - 37 / 16 <= row.value <= 37, (row, tried)
    assert max(b for b in tried if b <= 37) == row.value and min(b for b in tried if b > 37) - row.value <= 37 / 16
    # an error that is not about memory is not taken for a full GPU
    monkeypatch.setattr(gpu_check, "run_train", lambda cfg, fn: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        gpu_check.fits(plan, tmp_path, "cnn", 32, 4)


def test_device_memory_views_combine_torch_and_driver_numbers(monkeypatch):
    """Fake CUDA numbers (bytes) → the row's four views and the 24 GB verdict, checked by hand."""
    import torch

    gpu_check = _load_gpu_check(monkeypatch)
    mib = 2**20
    # driver: 80 GiB card with 30 000 MiB free after the row → 51 920 MiB used
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (30_000 * mib, 81_920 * mib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 15_000 * mib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 16_500 * mib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 1_200 * mib)  # cache left after the row
    row = gpu_check.Row("checkpoint", "densenet121", 1024, 16, "on")
    gpu_check.record_memory(row, "cuda", before=600.0)
    assert (row.peak_mib, row.reserved_mib, row.driver_before_mib, row.driver_after_mib) == (
        15_000,
        16_500,
        600,
        51_920,
    )
    # non-torch after the row = 51 920 − 1 200 = 50 720 MiB; device peak = 16 500 + 50 720 = 67 220 MiB
    assert row.device_est_mib == 67_220
    assert gpu_check.device_estimate(16_500, 51_920, 1_200) == (50_720, 67_220)

    row.device_est_mib = 20_000.0  # a smaller card's row: + 2 × 1 300 MiB of DALI = 22 600 ≤ 23 028
    total, note = gpu_check.device_budget(row, 1_300.0)
    assert total == 22_600 and " fits 23028 MiB" in note and "2 × 1300" in note
    total, note = gpu_check.device_budget(row, 1_600.0)  # 20 000 + 3 200 = 23 200 > 23 028
    assert total == 23_200 and "does NOT fit" in note
    total, note = gpu_check.device_budget(row, None)  # DALI not installed: said, not silently zero
    assert total == 20_000 and "DALI not measured" in note
    assert math.isnan(gpu_check.device_budget(None, 1.0)[0])


def test_cpu_rows_have_no_driver_view(monkeypatch):
    gpu_check = _load_gpu_check(monkeypatch)
    row = gpu_check.Row("throughput")
    gpu_check.record_memory(row, "cpu", before=gpu_check.driver_used_mib("cpu"))
    assert row.peak_mib > 0 and all(
        math.isnan(v) for v in (row.reserved_mib, row.driver_before_mib, row.driver_after_mib, row.device_est_mib)
    )
