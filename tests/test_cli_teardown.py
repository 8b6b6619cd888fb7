"""Every CLI tears down the launcher's process group on exit (cxrbase.errors.cli_entry).

Left to interpreter shutdown, gloo's threads are destroyed while still joinable and a
rank that finishes early aborts ("terminate called without an active exception",
SIGABRT) — seen on rank 1 of a two-rank ``cxr.evaluate`` / ``cxr.explain``.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from cxrbase.errors import CxrError, cli_entry

    @cli_entry
    def main(argv):
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=int(sys.argv[2]), world_size=2)
        dist.barrier()
        if argv and argv[0] == "fail":
            raise CxrError("a user error after the group is up")
        return 0

    code = main(sys.argv[3:])
    print("initialised after main:", dist.is_initialized())
    sys.exit(code)
""")


def _two_ranks(tmp_path: Path, *args: str) -> list[subprocess.CompletedProcess]:
    tmp_path.mkdir(parents=True)
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    store = tmp_path / "store"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(store), str(rank), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_cli_entry_destroys_the_process_group_on_return_and_on_error(tmp_path):
    for args, code in (((), 0), (("fail",), 2)):
        for done in _two_ranks(tmp_path / "-".join(args or ("ok",)), *args):
            assert done.returncode == code, done.stderr[-2000:]
            assert "initialised after main: False" in done.stdout
