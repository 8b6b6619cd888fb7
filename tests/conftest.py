import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `make test` runs pytest-xdist workers (TEST_WORKERS, one per core here): each gets its share of the
# cores as intra-op threads, for in-process torch and the children that inherit the environment. More
# threads than cores only contend, and libgomp's spin-waits burn what the other worker needs: test_models,
# test_vit_input_size and test_gpu_check under `-n 2` took 174 CPU s with 2 threads per worker, 91 with 1.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )
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
    # Files whose tests start processes go first, unit files last, each file's tests kept together and in
    # order: `make test` hands files to its workers in this order (--no-loadscope-reorder), so the long
    # files start early and both workers end on short ones. By test count, xdist's default, the
    # one-test end-to-end files came last: one worker ran them alone for ~45 s at the end of the run.
    rank = {}
    for item in items:
        tier = max(TIERS.index(t) for t in TIERS if item.get_closest_marker(t) is not None)
        rank[item.path] = max(rank.get(item.path, 0), tier)
    items.sort(key=lambda item: -rank[item.path])


# ------------------------------------------------------------------------------ shared fixtures
@pytest.fixture(scope="session", autouse=True)
def phantom_cache(tmp_path_factory):
    """helpers.phantom_shards builds each set of arguments once per test run and copies it after that.

    Under pytest-xdist (`make test`) the folder is shared by the run's worker processes: the workers'
    base folders (…/pytest-N/popen-gwK) sit in one folder of that run."""
    import helpers

    base = tmp_path_factory.getbasetemp()
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    helpers.PHANTOM_CACHE = base.parent / "phantom-cache" if shared else tmp_path_factory.mktemp("phantom-cache")
    yield helpers.PHANTOM_CACHE
    helpers.PHANTOM_CACHE = None


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """600 phantoms at 64 px → stratified 70/15/15 patient split → shards in 2 MB shards (the real CLI,
    in child processes). tests/test_s3.py packs the same synth/ and splits.parquet into a bucket."""
    from helpers import phantom_shards

    root = tmp_path_factory.mktemp("train_data")
    return phantom_shards(
        root, 600, 64, 0, scheme="stratified", fractions="0.7,0.15,0.15", pack_args=["--shard-size-mb", "2"],
        subprocess_cli=True,
    ).shards  # fmt: skip


@pytest.fixture(scope="session")
def export_runs(tmp_path_factory):
    """A trained-for-3-steps ood_ae, two cnn members (the evaluator tests' builder) and their report."""
    from helpers import make_member, phantom_shards

    from cxr.config import load_config
    from cxr.evaluate import main as evaluate_main
    from cxr.tools.ood import main as ood_main
    from cxr.train import train

    root = tmp_path_factory.mktemp("export")
    phantom_shards(root, 120, 64, 3, fractions="0.5,0.25,0.25", split_seed=1)  # test_ood's shards_dir too
    shards = root / "shards"
    gate = root / "gate"
    cfg = load_config(
        ROOT / "cxr" / "configs" / "ood_ae.yaml",
        [
            "train.epochs=1",
            "train.max_steps=3",
            f"checkpoint.run_dir={gate}",
            "logging.progress=false",
            f"data.shards={shards}",
            "data.num_threads=0",
        ],
    )
    assert train(cfg) == 0
    assert ood_main(["threshold", "--run", str(gate), "--shards", str(shards), "--percentile", "99"]) == 0
    members = [make_member(root / f"m{s}", shards, seed=s) for s in (1, 2)]
    report = root / "report"
    assert (
        evaluate_main(
            [
                "--runs",
                *map(str, members),
                "--shards",
                str(shards),
                "--split",
                "test",
                "--out",
                str(report),
                "--bootstrap",
                "0",
                "--no-figures",
            ]
        )
        == 0
    )
    return {"shards": shards, "gate": gate, "members": members, "report": report, "root": root}


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto) on 127.0.0.1 with this process's AWS environment pointed at it."""
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency (pip install -e .[dev])")
    from s3_server import running_s3_server

    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server():
    """A local GCS JSON-API server (gcp-storage-emulator) on 127.0.0.1 with this process's GCS environment
    pointed at it."""
    why = "is a dev dependency (pip install -e .[dev])"
    pytest.importorskip("gcp_storage_emulator", reason=f"gcp-storage-emulator {why}")
    pytest.importorskip("gcsfs", reason=f"gcsfs (the gcs extra) {why}")
    from gcs_server import running_gcs_server

    with running_gcs_server() as server:
        yield server
