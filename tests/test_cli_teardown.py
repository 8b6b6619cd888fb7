"""Every CLI tears down the launcher's process group on exit (cxrbase.errors.cli_entry),
and nothing keeps the group alive past it (cxr.runs.distributed.import_before_process_group).

Left to interpreter shutdown, gloo's threads are destroyed while still joinable and a
rank that finishes early aborts ("terminate called without an active exception",
SIGABRT) — seen on rank 1 of a two-rank ``cxr.evaluate`` / ``cxr.tools.explain``. The second
test reproduces how that happened although the group was destroyed: the model built
after the group was up imported ``torch.distributed.nn``, whose default arguments kept
the group, so its threads were still running after ``destroy_process_group``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import free_port

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

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


# The evaluator's and cxr.tools.explain's order: the launcher's group first, then the model.
LAUNCHED = textwrap.dedent("""
    import argparse, os, sys
    from cxrbase.errors import cli_entry

    def gloo_threads():
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                names.append(open(f"/proc/self/task/{task}/comm").read().strip())
            except OSError:
                pass  # a thread that ended while listed
        return sorted(n for n in names if "gloo" in n)

    @cli_entry
    def main(argv):
        from accelerate.utils import gather_object
        from cxr.evaluation.inference import process_state

        state = process_state(cpu=True)
        from cxr.models import build_model

        build_model("cnn", num_labels=14)
        gather_object([state.process_index])
        print("gloo threads with the group:", gloo_threads())
        return 0

    code = main(sys.argv[3:])
    print("gloo threads after main:", gloo_threads())
    sys.exit(code)
""")


def _two_ranks(tmp_path: Path, *args: str, script_text: str = SCRIPT) -> list[subprocess.CompletedProcess]:
    tmp_path.mkdir(parents=True)
    script = tmp_path / "rank.py"
    script.write_text(script_text)
    store = tmp_path / "store"
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(store), str(rank), *args],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_cli_entry_destroys_the_process_group_on_return_and_on_error(tmp_path):
    for args, code in (((), 0), (("fail",), 2)):
        for done in _two_ranks(tmp_path / "-".join(args or ("ok",)), *args):
            assert done.returncode == code, done.stderr[-2000:]
            assert "initialised after main: False" in done.stdout


def test_no_gloo_thread_outlives_a_cli_that_builds_its_model_after_the_group(tmp_path):
    for done in _two_ranks(tmp_path / "launched", script_text=LAUNCHED):
        assert done.returncode == 0, done.stderr[-4000:]
        with_group, after = [line for line in done.stdout.splitlines() if line.startswith("gloo threads")]
        assert with_group != "gloo threads with the group: []", "no gloo thread seen: the check would prove nothing"
        assert after == "gloo threads after main: []", f"{with_group}\n{after}"
