"""slurm/local-cluster.sh keeps to CXR_SLURM_HOME and refuses where another Slurm is configured
or running (fast: only the safety checks run, no Slurm needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
OLD_HEADER = "# Written by slurm/local-cluster.sh: a single-node Slurm for trying the workflow.\nClusterName=cxrlocal\n"


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    full.update(
        CXR_SLURM_HOME=str(tmp_path / "home"), CXR_SLURM_SYSTEM_CONF=str(tmp_path / "etc-slurm" / "slurm.conf"), **env
    )
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, env=full, timeout=60)


def test_config_path_is_under_cxr_slurm_home(tmp_path):
    assert run(tmp_path, "conf").stdout.strip() == str(tmp_path / "home" / "etc" / "slurm.conf")


def test_a_site_slurm_conf_is_refused_and_left_alone(tmp_path):
    site = tmp_path / "etc-slurm" / "slurm.conf"
    site.parent.mkdir()
    site.write_text("ClusterName=site\nSlurmctldHost=head\n")
    for command in ("check", "start"):
        proc = run(tmp_path, command)
        assert proc.returncode == 3, proc.stderr
        assert str(site) in proc.stderr and "make test-fast" in proc.stderr
    assert site.read_text() == "ClusterName=site\nSlurmctldHost=head\n"
    assert not (tmp_path / "home").exists()  # refused before writing anything
    other = tmp_path / "elsewhere.conf"
    other.write_text("ClusterName=other\n")
    site.unlink()
    proc = run(tmp_path, "check", SLURM_CONF=str(other))  # SLURM_CONF of a real cluster's login node
    assert proc.returncode == 3 and str(other) in proc.stderr


def test_a_config_written_by_an_earlier_version_is_ours(tmp_path):
    site = tmp_path / "etc-slurm" / "slurm.conf"
    site.parent.mkdir()
    site.write_text(OLD_HEADER)
    proc = run(tmp_path, "check")
    # the config is ours: never named in a refusal. (A slurmctld of another checkout on this shared
    # machine may still be refused; then the refusal names the daemons, and only them.)
    assert str(site) not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        assert "no other Slurm found" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 3 and "running and not started by local-cluster.sh" in proc.stderr, proc.stderr
        assert "configuration" not in proc.stderr, proc.stderr


def test_a_foreign_slurmctld_process_is_refused(tmp_path):
    fake = tmp_path / "slurmctld"
    shutil.copy("/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "60"])
    try:
        out = run(tmp_path, "check")
        assert out.returncode == 3 and f"pid {proc.pid}" in out.stderr, out.stderr
    finally:
        proc.kill()
        proc.wait()
