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
