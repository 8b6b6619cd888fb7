"""How every stage's cost grows with the data set: split, pack, verify, a loader's index build and
first batch per rank (both back ends), one rank's training epoch outside the model, the
evaluator's analysis — at two sizes (default 10,000 and 112,120 images, the full NIH table),
extrapolated to 1,000,000 from the measured curve.

What is measured how (said again in the output):
- metadata: the first N rows of the real NIH CSV (all 112,120 at full size; synthetic
  ``shards synth`` metadata when the CSV is absent), so split sees NIH's patient structure;
- images: a pool of --pool distinct 64 px phantoms (shards.synth) hard-linked under every
  image name, so pack, verify and the loaders read N real files of phantom bytes (rendering
  112k phantoms would take longer than the whole bench);
- every stage runs in its own fresh Python process (this file with --stage), which reports its
  wall time and its peak RSS (resource.getrusage: ru_maxrss of itself and of its children, i.e.
  the largest worker); the interpreter and import cost is the same at every size and sits in
  the "baseline RSS" of each row;
- loader: rank 0 of --world ranks builds its train loader (the split index: every shard's DALI
  index parsed into arrays) and takes its first batch; the per-rank index structure's own size
  is counted byte by byte (keys, arrays);
- epoch: rank 0's share of one training epoch (N_train / world images) through the default
  (DALI) loader with a trivial model (global average pool + one linear layer, Adam) — what a
  real model's step time adds to is this;
- evaluate: cxr.evaluation.report.analyse (AUROC/AUPRC table, CIs, thresholds, calibration, subgroups
  off) on N synthetic predictions with real labels and patients, --boot patient-level resamples;
- 1M: each time and memory column extrapolated from the two sizes by the log-log slope
  (time ∝ N^b); b > 1.15 is flagged superlinear.

    python bench/scale.py [--sizes 10000,112120] [--world 8] [--boot 200] [--keep] [--append bench/RESULTS.md]

With --compare CHECKOUT (after a --keep run) it runs the stages a scaling fix changed (the train
loader built afresh for 3 epochs; the evaluate analysis) under another checkout of cxr and this
one, on the same data, and prints them side by side:

    python bench/scale.py --compare /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CODE = os.environ.get("CXR_SCALE_CODE")  # --compare: a stage process importing another checkout of cxr
sys.path.insert(0, CODE or str(ROOT))

NIH_CSV = ROOT.parent / "shared/data/nih/Data_Entry_2017_v2020.csv.gz"
if not NIH_CSV.is_file():
    NIH_CSV = Path("/work/shared/data/nih/Data_Entry_2017_v2020.csv.gz")
RES = 64
SECTION = "## scale"


# ----------------------------------------------------------------------------- data preparation
def prepare(work: Path, n: int, pool: int) -> dict:
    """metadata.csv (first n NIH rows) and images/ (n hard links onto `pool` phantoms)."""
    from shards.synth import LabelSampler, _write_one, metadata_csv, plan_cases

    work.mkdir(parents=True, exist_ok=True)
    csv = work / "metadata.csv"
    if NIH_CSV.is_file():
        with gzip.open(NIH_CSV, "rt") as fh:
            lines = [next(fh) for _ in range(n + 1)]
        csv.write_text("".join(lines))
        names = [line.split(",", 1)[0] for line in lines[1:]]
        source = f"first {n} rows of {NIH_CSV.name}"
    else:
        cases = plan_cases(n, 0, LabelSampler(None))
        csv.write_text(metadata_csv(cases, RES))
        names = [c.image for c in cases]
        source = "shards synth metadata"
    phantoms = work.parent / f"pool{pool}"
    if not phantoms.is_dir():
        tmp = work.parent / f"pool{pool}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for case in plan_cases(pool, 0, LabelSampler(None)):
            _write_one((case, 0, RES, str(tmp), None))
        tmp.rename(phantoms)
    pool_files = sorted(phantoms.glob("*.png"))
    images = work / "images"
    images.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        target = images / name
        if not target.exists():
            os.link(pool_files[i % len(pool_files)], target)
    return {"metadata": source, "pool_bytes": sum(p.stat().st_size for p in pool_files)}


# ----------------------------------------------------------------------------- stages (child side)
def _peak_mb() -> tuple[float, float]:
    """(this process's peak RSS, its largest child's) in MB (Linux ru_maxrss is kB)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids


def _cli(argv: list[str]) -> None:
    from shards.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"shards {argv[0]} exited {code}")


def _index_bytes(index) -> int:
    """Bytes held by one rank's SplitIndex: key strings and list, sample arrays, shard paths."""
    keys = index.keys
    key_bytes = keys.nbytes if isinstance(keys, np.ndarray) else sys.getsizeof(keys) + sum(map(sys.getsizeof, keys))
    return int(
        key_bytes + index.shard.nbytes + index.ranges.nbytes + sum(sys.getsizeof(str(p)) for p in index.shard_paths)
    )


def stage(name: str, work: Path, world: int, boot: int) -> dict:
    splits, shards = work / "splits.parquet", work / "shards"
    out: dict = {}
    t0 = time.perf_counter()
    if name == "split":
        _cli(["split", "--metadata", work / "metadata.csv", "--scheme", "stratified",
              "--fractions", "0.7,0.1,0.2", "--out", splits])  # fmt: skip
    elif name == "pack":
        shutil.rmtree(shards, ignore_errors=True)
        _cli(["pack", "--splits", splits, "--images", work / "images", "--out", shards,
              "--workers", "2", "--shard-size-mb", "16"])  # fmt: skip
    elif name == "verify":
        _cli(["verify", shards, "--workers", "2"])
    elif name in ("index-dali", "index-wds"):
        from cxr.data import DataConfig, build_loader

        cfg = DataConfig(shards=str(shards), backend=name.split("-")[1], resolution=RES, batch_size=32, num_threads=1)
        loader = build_loader(cfg, "train", rank=0, world_size=world, epoch=0)
        out["index_s"] = time.perf_counter() - t0
        out["index_rss_mb"] = _peak_mb()[0]
        out["index_struct_mb"] = _index_bytes(loader.index) / 1e6
        out["index_pickle_mb"] = len(pickle.dumps(loader.index)) / 1e6  # what each wds worker is sent per epoch
        t1 = time.perf_counter()
        next(iter(loader))
        out["first_batch_s"] = time.perf_counter() - t1
    elif name == "epoch":
        import torch

        from cxr.data import DataConfig, build_loader, to_device

        torch.set_num_threads(1)
        cfg = DataConfig(shards=str(shards), backend="dali", resolution=RES, batch_size=32, num_threads=1)
        loader = build_loader(cfg, "train", rank=0, world_size=world, epoch=0)
        model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(1, 14))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        loss_fn, images = torch.nn.BCEWithLogitsLoss(), 0
        for batch in loader:
            loss = loss_fn(model(to_device(batch, "cpu")), batch["labels"].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            images += len(batch["key"])
        out["epoch_images"] = images
    elif name == "epochs":  # the train loader as training builds it: afresh for each of 3 epochs
        from cxr.data import DataConfig, build_loader

        cfg = DataConfig(shards=str(shards), backend="wds", resolution=RES, batch_size=32, num_threads=1)
        for epoch in range(3):
            t1 = time.perf_counter()
            build_loader(cfg, "train", rank=0, world_size=world, epoch=epoch)
            out[f"epoch{epoch}_build_s"] = time.perf_counter() - t1
    elif name == "evaluate":
        import pandas as pd

        from cxr.evaluation.analysis import analyse
        from cxr.evaluation.scores import ScoreSet
        from cxrbase.labels import LABELS
        from shards.metadata import read_metadata

        meta = read_metadata(work / "metadata.csv")
        y = meta[list(LABELS)].to_numpy(np.float64)
        rng = np.random.default_rng(0)
        logit = np.log(y.mean(0).clip(1e-3) / (1 - y.mean(0).clip(1e-3))) + 1.2 * y + rng.normal(size=y.shape)
        scores = (1 / (1 + np.exp(-logit))).astype(np.float32).astype(np.float64)
        frame = pd.DataFrame({"patient": meta["patient"].to_numpy(), "sex": meta["sex"], "age": meta["age"]})
        sset = ScoreSet(keys=meta["image"].to_numpy(), y_true=y, scores={"ensemble": scores}, meta=frame)
        t0 = time.perf_counter()  # the analysis alone, not reading the CSV
        analyse(sset, None, tuning_split=None, n_boot=boot, subgroups=[])
    else:
        raise SystemExit(f"unknown stage {name!r}")
    out["wall_s"] = time.perf_counter() - t0
    out["rss_mb"], out["child_rss_mb"] = _peak_mb()
    return out


# ----------------------------------------------------------------------------- parent
STAGES = ["split", "pack", "verify", "index-dali", "index-wds", "epoch", "evaluate"]


def run_stage(name: str, work: Path, args, code: Path = ROOT) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "CXR_SCALE_CODE": str(code), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--stage", name, "--work", str(work), "--world", str(args.world),
           "--boot", str(args.boot)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.stage_timeout)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"stage {name} at {work.name} failed ({proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def sizes_on_disk(work: Path) -> dict:
    shards = work / "shards"
    return {
        "splits_kb": (work / "splits.parquet").stat().st_size / 1e3,
        "manifest_kb": (shards / "manifest.json").stat().st_size / 1e3,
        "idx_mb": sum(p.stat().st_size for p in shards.glob("*.idx")) / 1e6,
        "tar_mb": sum(p.stat().st_size for p in shards.glob("*.tar")) / 1e6,
        "shards": len(list(shards.glob("*.tar"))),
    }


def slope(n1: int, v1: float, n2: int, v2: float) -> float:
    return math.log(max(v2, 1e-9) / max(v1, 1e-9)) / math.log(n2 / n1)


def extrapolate(n1: int, v1: float, n2: int, v2: float, n: int = 1_000_000) -> float:
    return v2 * (n / n2) ** slope(n1, v1, n2, v2)


def linear_extrapolate(n1: int, v1: float, n2: int, v2: float, n: int = 1_000_000) -> float:
    """Memory: baseline + per-image slope (a fixed interpreter baseline makes log-log misleading)."""
    return v2 + (v2 - v1) / (n2 - n1) * (n - n2)


def report(results: dict[int, dict], args, notes: dict) -> str:
    (n1, a), (n2, b) = sorted(results.items())
    load = os.getloadavg()
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC — `python bench/scale.py "
        f"--sizes {args.sizes} --world {args.world} --boot {args.boot}`",
        "",
        f"{os.cpu_count()} CPUs shared (load average {load[0]:.1f} at the end); metadata: {notes['metadata']} "
        f"(and the first {n1}); images: {args.pool} distinct {RES} px phantoms "
        f"({notes['pool_bytes'] / args.pool / 1e3:.1f} kB each) hard-linked under every image name; "
        f"split 70/10/20 stratified; pack --workers 2 --shard-size-mb 16; loader = rank 0 of {args.world}; "
        f"epoch = rank 0's share through the DALI loader with a trivial model (pool + linear); "
        f"evaluate = cxr.evaluation.report.analyse on N predictions, {args.boot} patient resamples, no subgroups. "
        "Each stage is a fresh process: wall = the stage's own work (imports excluded), peak RSS = the "
        "process (largest child in brackets). 1M = extrapolated: time by the log-log slope b of the two "
        "points, memory linearly (baseline + per-image slope).",
        "",
        f"| stage | wall s @{n1 // 1000}k | wall s @{n2 // 1000}k | b | wall s @1M (extrap.) "
        f"| peak RSS MB @{n1 // 1000}k | peak RSS MB @{n2 // 1000}k | peak RSS MB @1M (extrap.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in STAGES:
        x, y = a[name], b[name]
        rows = [(name, "wall_s", "rss_mb")]
        if name.startswith("index"):
            rows = [
                (f"{name}: index build", "index_s", "index_rss_mb"),
                (f"{name}: first batch", "first_batch_s", None),
            ]
        for label, tkey, mkey in rows:
            bb = slope(n1, x[tkey], n2, y[tkey])
            flag = " **superlinear**" if bb > 1.15 else ""
            mem = "| | |"
            if mkey:

                def kid(r: dict, mkey: str = mkey) -> str:
                    return f" ({r['child_rss_mb']:.0f})" if r["child_rss_mb"] > 1 and mkey == "rss_mb" else ""

                m1m = linear_extrapolate(n1, x[mkey], n2, y[mkey])
                mem = f"| {x[mkey]:.0f}{kid(x)} | {y[mkey]:.0f}{kid(y)} | {m1m:.0f} |"
            lines.append(
                f"| {label} | {x[tkey]:.2f} | {y[tkey]:.2f} | {bb:.2f}{flag} | "
                f"{extrapolate(n1, x[tkey], n2, y[tkey]):.1f} {mem}"
            )
    lines += [
        "",
        f"| size on disk / in memory | @{n1 // 1000}k | @{n2 // 1000}k | @1M (extrap., linear) |",
        "|---|---|---|---|",
    ]
    for key, label in [
        ("manifest_kb", "manifest.json kB"),
        ("idx_mb", "DALI indexes (.idx) MB"),
        ("tar_mb", "shards (.tar) MB"),
        ("shards", "shard files"),
        ("splits_kb", "splits.parquet kB"),
    ]:
        x, y = a["disk"][key], b["disk"][key]
        lines.append(f"| {label} | {x:.1f} | {y:.1f} | {linear_extrapolate(n1, x, n2, y):.1f} |")
    for backend in ("dali", "wds"):
        x, y = a[f"index-{backend}"]["index_struct_mb"], b[f"index-{backend}"]["index_struct_mb"]
        lines.append(
            f"| per-rank train SplitIndex ({backend}) MB | {x:.1f} | {y:.1f} | {linear_extrapolate(n1, x, n2, y):.1f} |"
        )
    x, y = a["index-wds"]["index_pickle_mb"], b["index-wds"]["index_pickle_mb"]
    lines.append(
        f"| train SplitIndex pickled to each wds worker per epoch MB | {x:.1f} | {y:.1f} | "
        f"{linear_extrapolate(n1, x, n2, y):.1f} |"
    )
    lines.append(
        f"| epoch images (rank 0 of {args.world}) | {a['epoch']['epoch_images']} | {b['epoch']['epoch_images']} | |"
    )
    return "\n".join(lines) + "\n"


def compare(other: Path, work: Path, args) -> str:
    """The stages a fix changed, with another checkout and with this one, on the same data."""
    if not (work / "shards" / "manifest.json").is_file():
        raise SystemExit(f"{work}: no shards — run with --keep first")
    rows = [
        "| stage @{:,} images | {} | this checkout | ratio |".format(
            len(open(work / "metadata.csv").readlines()) - 1, other
        ),
        "|---|---|---|---|",
    ]
    for name, keys in [
        ("epochs", ["epoch0_build_s", "epoch1_build_s", "epoch2_build_s"]),
        ("evaluate", ["wall_s", "rss_mb"]),
    ]:
        before, after = run_stage(name, work, args, other), run_stage(name, work, args, ROOT)
        for key in keys:
            rows.append(
                f"| {name}: {key} | {before[key]:.2f} | {after[key]:.2f} | {before[key] / max(after[key], 1e-3):.1f}× |"
            )
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,112120", help="two image counts (default 10000,112120)")
    p.add_argument("--world", type=int, default=8, help="ranks the loader and epoch stages plan for (default 8)")
    p.add_argument("--boot", type=int, default=200, help="bootstrap resamples in the evaluate stage (default 200)")
    p.add_argument("--pool", type=int, default=256, help="distinct phantom images (default 256)")
    p.add_argument("--workdir", default="/dev/shm/cxr-bench-scale", help="scratch folder (removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--stage-timeout", type=int, default=900)
    p.add_argument("--append", help="append the section to this markdown file (e.g. bench/RESULTS.md)")
    p.add_argument(
        "--compare",
        metavar="CHECKOUT",
        help="instead: run the loader-per-epoch and evaluate stages on the data of a --keep run "
        "(--workdir/nN, N the larger size) with this checkout of cxr and with this one, side by side",
    )
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, Path(args.work), args.world, args.boot)))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if len(sizes) != 2:
        raise SystemExit("--sizes: give two image counts, e.g. 10000,112120")
    if args.compare:
        print(compare(Path(args.compare), Path(args.workdir) / f"n{sizes[1]}", args))
        return
    base = Path(args.workdir)
    results: dict[int, dict] = {}
    try:
        for n in sizes:
            work = base / f"n{n}"
            t0 = time.perf_counter()
            notes = prepare(work, n, args.pool)
            print(f"n={n}: data prepared in {time.perf_counter() - t0:.1f} s", flush=True)
            results[n] = {}
            for name in STAGES:
                results[n][name] = r = run_stage(name, work, args)
                print(f"n={n} {name}: {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)
            results[n]["disk"] = sizes_on_disk(work)
            shutil.rmtree(work / "images", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    text = report(results, args, notes)
    print(text)
    if args.append:
        path = Path(args.append)
        body = path.read_text() if path.is_file() else ""
        if SECTION not in body:
            body = body.rstrip("\n") + f"\n\n{SECTION}\n"
        path.write_text(body.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
