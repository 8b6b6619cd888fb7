"""Builders shared by several test modules (one definition each; test modules never import each other).

Heavy imports (torch, cxr) happen inside the functions that need them, so a torch-free test module can
import this file.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from cxrbase.labels import LABELS

# ------------------------------------------------- launching training runs (accelerate, 2 gloo ranks)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CPU2 = ROOT / "launch" / "configs" / "cpu-2proc.yaml"
STEPS_PER_EPOCH = 13  # 419 train images // (2 ranks × 16)
EPOCHS = 2
RUN_TIMEOUT = 600


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"))
    return env


@contextlib.contextmanager
def exclusive(lock: Path):
    """Hold an exclusive flock on LOCK (created with its folder), waiting while another process holds it; the
    kernel releases it when the file closes or its holder dies. For what the suite's processes share."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def install_web_deps() -> str | None:
    """Chromium, node and build/npm for the browser tests and the demo's page stage, installed by
    scripts/web-deps.sh when missing; None when present, else why they cannot be (the caller skips, saying so).

    The suite runs in several processes (`make test`: pytest-xdist) that share build/npm and apt: the check
    and the install hold one lock (build/.web-deps.lock, blocking), so nobody reads build/npm half installed."""
    from cxr.tools.export import WEB_VENDOR

    with exclusive(ROOT / "build" / ".web-deps.lock"):
        missing = (
            not shutil.which("chromium")
            or not (WEB_VENDOR / "package.json").is_file()
            or not (WEB_VENDOR.parent / "playwright-core" / "package.json").is_file()
            or not (WEB_VENDOR.parent / "dicom-parser" / "package.json").is_file()
        )
        if not missing:
            return None
        if not shutil.which("node") or not shutil.which("npm"):
            return "node/npm missing: install Node.js, then run `make web-deps`"
        if not shutil.which("chromium") and (os.geteuid() != 0 or not shutil.which("apt-get")):
            return "chromium is not installed and cannot be (needs root and apt-get): run `make web-deps`"
        subprocess.run(["bash", str(ROOT / "scripts" / "web-deps.sh"), "all"], check=True, timeout=900)
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    shards: Path,
    run_dir: Path,
    *overrides: str,
    config_file: Path = CPU2,
    port: int | None = None,
    readme_cli: bool = False,
    launcher_args: Sequence[str] = (),
) -> subprocess.Popen:
    """`python -m accelerate.commands.launch --config_file X LAUNCHER_ARGS cxr/train.py --config tiny ...`
    (accelerate's launch command without the CLI's import of every other subcommand, ~2 CPU s less;
    slurm/run-training.sh starts it so too; ``readme_cli``: `accelerate launch` as the README writes it), with
    the cnn 8 channels wide (model.width=8: half the CPU of the default 32, which these runs' claims about
    ranks, resumes and storage do not depend on). Output to run_dir.parent/<name>.out."""
    cmd = [
        *(
            [str(BIN / "accelerate"), "launch"]
            if readme_cli
            else [str(BIN / "python"), "-m", "accelerate.commands.launch"]
        ),
        "--config_file",
        str(config_file),
        *launcher_args,
        "--main_process_port",
        str(port or free_port()),
        "cxr/train.py",
        "--config",
        "cxr/configs/tiny.yaml",
        f"data.shards={shards}",
        f"checkpoint.run_dir={run_dir}",
        "data.resolution=64",
        "data.batch_size=16",
        "model.width=8",
        f"train.epochs={EPOCHS}",
        "logging.progress=false",
        "logging.log_every=1",
        *overrides,
    ]
    out = open(run_dir.parent / f"{run_dir.name}.out", "ab")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=launch_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text(errors="replace")


def wait_for_line(run_dir: Path, pattern: str, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> re.Match:
    """Poll RUN/train.log until a line matches (the training is still running)."""
    deadline = time.time() + timeout
    log = run_dir / "train.log"
    while time.time() < deadline:
        if log.exists():
            found = re.search(pattern, log.read_text(errors="replace"), re.M)
            if found:
                return found
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {pattern!r}:\n{output(run_dir)[-3000:]}")
        time.sleep(0.05)  # launch()'s steps take ~50 ms: a signal sent on a line lands a step or two later
    raise AssertionError(f"no {pattern!r} in {log} after {timeout} s")


def rank_pids(run_dir: Path, proc: subprocess.Popen) -> list[int]:
    found = wait_for_line(run_dir, r"start: 2 rank\(s\) .* pids \[(\d+), (\d+)\]", proc)
    return [int(found.group(1)), int(found.group(2))]


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def weights(run_dir: Path, name: str = "last") -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


# ------------------------------------------------- a trained member without the training loop
RES = 64


def member_config(shards: Path, seed: int, resolution: int = RES) -> dict:
    """A config.yaml per docs/run-dir.md: data == DataConfig fields, model == build_model kwargs."""
    return {
        "data": {
            "shards": str(shards),
            "backend": "wds",
            "resolution": resolution,
            "batch_size": 8,
            "eval_batch_size": 16,
            "num_threads": 0,
            "augment": False,
            "seed": seed,
        },
        "model": {"name": "cnn", "num_labels": 14, "dropout": 0.0},
        "loss": {"name": "bce"},
        "optim": {"lr": 0.05},  # the steps below are plain SGD; optim.name has only adam | adamw
        "train": {"epochs": 1, "seed": seed},
        "checkpoint": {"run_dir": "unused"},
    }


def make_member(run_dir: Path, shards: Path, seed: int, steps: int = 8) -> Path:
    """Build the cnn with a seed, take a few SGD steps on the train split, save a best checkpoint."""
    import torch
    from safetensors.torch import save_file

    from cxr.data import DataConfig, build_loader, to_device
    from cxr.models import build_model

    config = member_config(shards, seed)
    torch.manual_seed(seed)
    model = build_model("cnn", 14, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = build_loader(DataConfig(**config["data"]), "train", epoch=0, train=True)
    model.train()
    for step, batch in zip(range(steps), loader):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(to_device(batch, "cpu")), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    best = run_dir / "checkpoints" / "best"
    best.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(best / "model.safetensors"))
    (best / "meta.json").write_text(
        json.dumps(
            {
                "epoch": 0,
                "global_step": steps,
                "labels": list(LABELS),
                "resolution": RES,
                "model": "cnn",
                "val": {"loss": 0.5},
            }
        )
    )
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


# ------------------------------------------------- editing packed shards
def rewrite_shard(out: Path, shard: str, change) -> None:
    """Rewrite one shard with ``change(name, data) -> data``; fix its sha/bytes/index so only content differs."""
    from shards.dali_index import index_for_tar

    src = out / shard
    buf = io.BytesIO()
    with tarfile.open(src) as tar, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as new:
        for info in tar.getmembers():
            data = change(info.name, tar.extractfile(info).read())
            info.size = len(data)
            new.addfile(info, io.BytesIO(data))
    src.write_bytes(buf.getvalue())
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["bytes"], entry["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
            (out / entry["index"]).write_text(index_for_tar(src))
    (out / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------- phantom shards through the shards CLI
PHANTOM_CACHE: Path | None = None  # set for the test run by conftest.py (phantom_cache); None: always build


@dataclasses.dataclass(frozen=True)
class Phantoms:
    """Where :func:`phantom_shards` put things: ROOT/synth (images/, Data_Entry_2017.csv, boxes.csv),
    the splits table and ROOT/shards."""

    root: Path
    synth: Path
    splits: Path
    shards: Path


def phantom_shards(
    root: Path,
    n: int,
    resolution: int,
    seed: int | None = None,
    *,
    scheme: str = "random",
    fractions: str | None = None,
    split_seed: int | None = None,
    workers: int | None = 1,
    synth_args: Sequence[str] = (),
    metadata=None,
    splits: str = "splits.parquet",
    pack_args: Sequence[str] = (),
    pack_workers: int | None | str = "as synth",
    upto: str = "pack",
    subprocess_cli: bool = False,
) -> Phantoms:
    """`shards synth` → `shards split` → `shards pack` into ROOT, as a user runs them.

    synth: ``--n N --resolution R [--seed S] [--workers W] SYNTH_ARGS``; split of ``metadata(synth dir)``
    (a function writing another labels CSV from the phantoms, default their Data_Entry_2017.csv):
    ``--scheme S [--fractions F] [--seed SPLIT_SEED]`` into ROOT/SPLITS; pack: ``PACK_ARGS [--workers
    PACK_WORKERS, default: W as for synth]``. ``None`` leaves an option out (the command's default). ``upto`` stops
    after "synth" or "split". ``subprocess_cli``: ``python -m shards`` in a child process (as
    conftest's train_shards) instead of shards.cli.main in this one.

    Built once per set of arguments in a test run (conftest.py points PHANTOM_CACHE at a folder all the
    run's processes share): a second call, in any of them, copies that build into ROOT, its manifest naming
    ROOT's paths as a build there would. One lock per set of arguments: a call waits while another builds it."""
    synth, table, shards = root / "synth", root / splits, root / "shards"
    pack_workers = workers if pack_workers == "as synth" else pack_workers
    # one build per set of arguments for the whole test run, copied into ROOT (tests may edit their copy);
    # a custom metadata writer may leave files anywhere under ROOT, so those calls always build
    cached, lock = None, contextlib.nullcontext()
    if PHANTOM_CACHE is not None and metadata is None:
        argv = [n, resolution, seed, scheme, fractions, split_seed, workers, list(synth_args), splits]
        argv += [list(pack_args), pack_workers, upto, subprocess_cli]
        key = hashlib.sha256(json.dumps([str(a) for a in argv]).encode()).hexdigest()[:16]
        cached = PHANTOM_CACHE / key
        lock = exclusive(PHANTOM_CACHE.with_name(PHANTOM_CACHE.name + ".locks") / key)  # beside the cache, not in it
    with lock:
        if cached is not None and cached.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            built_in = (cached / "ROOT").read_text()
            for made in cached.iterdir():
                if made.is_dir():
                    shutil.copytree(made, root / made.name, symlinks=True)
                elif made.name != "ROOT":
                    shutil.copy2(made, root / made.name)
            # the manifest and pack journal name the splits and image paths: make them this ROOT's, as a build here
            for text in shards.glob("*.json*") if shards.is_dir() else ():
                text.write_text(text.read_text().replace(json.dumps(built_in)[1:-1], json.dumps(str(root))[1:-1]))
            return Phantoms(root, synth, table, shards)

        def opt(name: str, value) -> list[str]:
            return [] if value is None else [name, str(value)]

        def run(*argv) -> None:
            argv = [str(a) for a in argv]
            if subprocess_cli:
                done = subprocess.run(
                    [sys.executable, "-m", "shards", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
                )
                assert done.returncode == 0, (argv, done.stderr[-3000:])
            else:
                from shards.cli import main as shards_main

                assert shards_main(argv) == 0, argv

        run(
            "synth",
            "--out",
            synth,
            "--n",
            n,
            "--resolution",
            resolution,
            *opt("--seed", seed),
            *opt("--workers", workers),
            *synth_args,
        )
        if upto != "synth":
            labels = synth / "Data_Entry_2017.csv" if metadata is None else metadata(synth)
            run(
                "split",
                "--metadata",
                labels,
                "--scheme",
                scheme,
                *opt("--fractions", fractions),
                *opt("--seed", split_seed),
                "--out",
                table,
            )
            if upto != "split":
                run(
                    "pack",
                    "--splits",
                    table,
                    "--images",
                    synth / "images",
                    "--out",
                    shards,
                    *pack_args,
                    *opt("--workers", pack_workers),
                )
        if cached is not None:
            building = cached.with_name(f"{cached.name}.partial")
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            (building / "ROOT").write_text(str(root))
            for made in (synth, table, shards):
                if made.is_dir():
                    shutil.copytree(made, building / made.name, symlinks=True)
                elif made.is_file():
                    shutil.copy2(made, building / made.name)
            building.rename(cached)
    return Phantoms(root, synth, table, shards)


def build_synth_shards(base: Path) -> Path:
    """Small synthetic shards (240 phantoms at 64 px, 60/20/20 split), built once per session."""
    out = base / "synth-shards"
    if (out / "shards" / "manifest.json").is_file():
        return out / "shards"
    return phantom_shards(
        out, 240, 64, 0, scheme="stratified", fractions="0.6,0.2,0.2", pack_workers=None, subprocess_cli=True
    ).shards


# ------------------------------------------------- shards at a URL (tests/test_s3.py, tests/test_gcs.py)
def url_pack_args(train_shards: Path, out: str) -> list[str]:
    """`cxr-shards pack` argv: conftest.train_shards' images and splits into ``out`` with its settings."""
    base = train_shards.parent
    splits, images = str(base / "splits.parquet"), str(base / "synth" / "images")
    return ["pack", "--splits", splits, "--images", images, "--out", out, "--shard-size-mb", "2", "--workers", "1"]


def evaluate_to(member: Path, shards: str, out: Path) -> None:
    """`cxr.evaluate` of one member on the test split of ``shards`` (a folder or URL) into ``out``."""
    from cxr.evaluate import main as evaluate_main

    argv = ["--runs", str(member), "--shards", shards, "--split", "test", "--out", str(out)]
    assert evaluate_main([*argv, "--bootstrap", "0", "--no-figures", "--debug"]) == 0


def same_report(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "predictions.parquet"), pd.read_parquet(b / "predictions.parquet")
    )
    pd.testing.assert_frame_equal(pd.read_csv(a / "aucs.csv"), pd.read_csv(b / "aucs.csv"))


def one_line_error(capsys, argv: list[str]) -> str:
    """`cxr-shards ARGV` fails with exit 2 and one line on stderr (no traceback, no test secret); that line."""
    from s3_server import FAKE_SECRET

    from shards.cli import main as shards_main

    capsys.readouterr()
    assert shards_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and FAKE_SECRET not in err, err
    return err


# ------------------------------------------------- in-memory data for in-process training
class MemoryLoader:
    """build_loader's contract over in-memory phantoms: per-(seed, epoch) permutation, skip_batches,
    equal batch counts per rank in training, partial last batch in evaluation."""

    def __init__(self, cfg, split, rank=0, world_size=1, epoch=0, skip_batches=0, train=None, kill_at=None):
        import torch

        n = {"train": 96, "val": 40}[split]
        g = torch.Generator().manual_seed({"train": 1, "val": 2}[split])
        self.labels = (torch.rand(n, 14, generator=g) < 0.3).float()
        self.images = torch.randn(n, 1, 32, 32, generator=g) * 0.5
        for c in range(14):  # label c brightens row band c
            self.images[:, 0, 2 * c : 2 * c + 2, :] += self.labels[:, c, None, None]
        train = split == "train" if train is None else train
        bs = cfg.batch_size if train else cfg.eval_batch
        if train:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
            nb = n // (bs * world_size)
            self.batches = [order[(b * world_size + rank) * bs : (b * world_size + rank + 1) * bs] for b in range(nb)]
        else:
            ids = np.arange(n)[rank::world_size]
            self.batches = [ids[i : i + bs] for i in range(0, len(ids), bs)]
        self.batches = self.batches[skip_batches:]
        self.kill_at, self.seen = kill_at, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        import torch

        for i, ids in enumerate(self.batches):
            if self.kill_at is not None and i == self.kill_at:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, delivered mid-epoch
            self.seen += len(ids)
            ids = torch.as_tensor(ids)
            yield {
                "image": self.images[ids],
                "labels": self.labels[ids],
                "meta": torch.zeros(len(ids), 5),
                "key": [f"k{int(i):04d}" for i in ids],
            }

    def report(self):
        return {"samples": self.seen, "skipped": 0, "skipped_keys": []}


def tiny_config(run_dir: Path, *extra: str):
    """The shipped tiny config at 32 px for in-process training on MemoryLoader."""
    from cxr.config import load_config

    return load_config(
        Path(__file__).resolve().parents[1] / "cxr/configs/tiny.yaml",
        [
            f"checkpoint.run_dir={run_dir}",
            "data.batch_size=8",
            "data.resolution=32",
            "train.epochs=3",
            "logging.progress=false",
            "logging.log_every=1",
            "schedule.name=plateau",
            "schedule.warmup_epochs=0",
            "schedule.patience=0",
            "train.grad_accum_steps=2",
            *extra,
        ],
    )


def shards_config(run_dir: Path, shards: Path, resolution: int, *extra: str):
    """The shipped tiny config on phantom shards, in-process and deterministic (wds, no workers, no
    augmentation, one thread): the training of tests/test_transfer.py and the two-site tests."""
    from cxr.config import load_config

    return load_config(
        Path(__file__).resolve().parents[1] / "cxr/configs/tiny.yaml",
        [
            f"checkpoint.run_dir={run_dir}",
            f"data.shards={shards}",
            f"data.resolution={resolution}",
            "data.backend=wds",
            "data.num_threads=0",
            "data.augment=false",
            "data.batch_size=16",
            "logging.progress=false",
            "train.threads=1",
            "schedule.warmup_epochs=0",
            *extra,
        ],
    )


# ------------------------------------------------- tiny PNG data sets
def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def tiny_dataset(tmp: Path, n: int = 6, size: int = 64) -> tuple[pd.DataFrame, Path]:
    """n random grey PNGs + a splits table (patients 1..n, splits train/val/test)."""
    rng = np.random.default_rng(0)
    folder = tmp / "images"
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        key = f"{i + 1:08d}_000"
        (folder / f"{key}.png").write_bytes(png_bytes(rng.integers(0, 256, (size, size), dtype=np.uint8)))
        labels = {name: int(rng.random() < 0.3) for name in LABELS}
        rows.append(
            {
                "image": f"{key}.png",
                "patient": i + 1,
                "split": ("train", "val", "test")[i % 3],
                **labels,
                "age": 30 + i,
                "sex": "MF"[i % 2],
                "view": ("PA", "AP")[i % 2],
            }
        )
    return pd.DataFrame(rows), folder
