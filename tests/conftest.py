import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NIH = Path(os.environ.get("CXR_NIH", ROOT.parent / "shared" / "data" / "nih"))


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    """The real NIH metadata/sample folder (../shared/data/nih); skip visibly if absent."""
    if not (NIH / "Data_Entry_2017_v2020.csv.gz").exists():
        pytest.skip(f"real NIH data not found at {NIH} (set CXR_NIH)")
    return NIH


@pytest.fixture(scope="session")
def nih_sample_dir(nih_dir: Path) -> Path:
    sample = nih_dir / "sample"
    if not (sample / "labels.csv").exists():
        pytest.skip(f"real NIH sample not found at {sample}")
    return sample


@pytest.fixture(scope="module")
def one_torch_thread():
    """2 shared cores: a second intra-op thread only adds contention for tiny models.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- test tiers
# unit (the default): no shards, no training loop, no subprocess — `make test-fast` / `pytest -m unit`;
# integration: packs shards or trains/evaluates in-process (mark it `integration`);
# e2e: several processes, launchers, Slurm, the browser, the demo (every `slow` test is one).
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    """Give every test exactly one tier: `slow` implies e2e, an unmarked test is unit."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)
        tiers = [tier for tier in TIERS if item.get_closest_marker(tier) is not None]
        if not tiers:
            item.add_marker(pytest.mark.unit)
        elif len(tiers) > 1 and "unit" in tiers:
            raise pytest.UsageError(f"{item.nodeid}: marked unit and {tiers[1]} — a test has one tier")
