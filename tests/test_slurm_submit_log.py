"""Where the sbatch submit jobs of slurm/ensemble.sh and slurm/ablate.sh leave their own `.out`, without Slurm.

Under `sbatch slurm/ensemble.sh` Slurm opens the submit job's output file, named by the script's
`#SBATCH --output` line, in the submit directory (the repository root) before the script runs; the
script must move it beside the jobs' logs and write the rest there (issue 28, item 9). Here the
file Slurm would have opened is made from the script's own `#SBATCH --output` line, the script runs
with the variables sbatch sets, and `sbatch` is a stand-in on PATH that records its arguments and
answers a job id as `sbatch --parsable` does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SBATCH = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_SBATCH_CALLS"
echo "$((1000 + $(wc -l < "$FAKE_SBATCH_CALLS")))"
"""


def _slurm_output_name(script: Path, job_id: str) -> str:
    """The file name Slurm opens for the job: the script's `#SBATCH --output=` with %j filled in."""
    lines = re.findall(r"^#SBATCH --output=(\S+)$", script.read_text(), re.M)
    assert len(lines) == 1, lines
    assert "/" not in lines[0]  # relative: Slurm opens it in the submit directory
    return lines[0].replace("%j", job_id)


def _submit(script: str, tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path, Path, str]:
    submit_dir, bin_dir = tmp_path / "repo-root", tmp_path / "bin"
    submit_dir.mkdir()
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    job = "4242"
    own = submit_dir / _slurm_output_name(ROOT / "slurm" / script, job)
    own.write_text("slurm: job 4242 started\n")  # what Slurm has written before the script runs
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": job,
        "SLURM_SUBMIT_DIR": str(submit_dir),
        "CXR_REPO": str(ROOT),
        "CXR_PYTHON": sys.executable,
        "CXR_SHARDS": str(tmp_path / "shards"),
        "CXR_RUNS": str(tmp_path / "runs"),
        "FAKE_SBATCH_CALLS": str(tmp_path / "sbatch-calls.txt"),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / script)],
        cwd=submit_dir,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    calls = (tmp_path / "sbatch-calls.txt").read_text() if (tmp_path / "sbatch-calls.txt").is_file() else ""
    return proc, submit_dir, own, calls


def test_ensemble_submit_job_writes_its_out_into_the_logs_folder(tmp_path):
    proc, submit_dir, own, calls = _submit("ensemble.sh", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not own.exists(), sorted(p.name for p in submit_dir.iterdir())
    assert list(submit_dir.iterdir()) == []  # nothing left in the repository root
    moved = tmp_path / "runs" / "logs" / own.name
    text = moved.read_text()
    assert text.startswith("slurm: job 4242 started\n")  # Slurm's part kept, the script's appended
    assert "evaluator job 1002 after all members succeed" in text
    # the member array and the evaluator log into the same folder
    outputs = re.findall(r"--output=(\S+)", calls)
    assert len(outputs) == 2 and all(Path(o).parent == moved.parent for o in outputs), calls


def test_ablate_submit_job_writes_its_out_beside_the_sweep_logs(tmp_path):
    # CXR_PYTHON prints the launch.submit command instead of running it (the sweep is tested elsewhere)
    proc, submit_dir, own, _ = _submit("ablate.sh", tmp_path, CXR_PYTHON="/bin/echo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not own.exists(), sorted(p.name for p in submit_dir.iterdir())
    moved = tmp_path / "runs" / "submitit" / own.name
    text = moved.read_text()
    assert text.startswith("slurm: job 4242 started\n")
    assert re.search(r"-m launch\.submit ablate --cluster slurm .*--runs " + re.escape(str(tmp_path / "runs")), text)


@pytest.mark.parametrize("script", ["ensemble.sh", "ablate.sh"])
def test_submit_output_line_is_the_name_the_script_moves(script):
    """The script finds its own .out by name: the #SBATCH --output line and the name in the script agree."""
    text = (ROOT / "slurm" / script).read_text()
    stem = _slurm_output_name(ROOT / "slurm" / script, "").removesuffix(".out")
    assert f"{stem}${{SLURM_JOB_ID:-}}.out" in text
