"""cxr-predict with an exported package vs onnxruntime's bare sessions on the same preprocessed tensors.

    python bench/predict.py --nih ../shared/data/nih --out build/bench-predict [--n 100] [--arch densenet121]
                            [--resolution 224] [--batch-size 16] [--repeats 3] [--append bench/RESULTS.md]

What is compared, in one process, passes interleaved (predict, bare, predict, bare …), medians reported:
  cxr-predict  cxr.tools.predict.predict() on the first ``--n`` real 1024² PNGs of the NIH sample: read each file,
               the grey master (shards.image_codec.source_grey), the loader's resize and normalisation, the
               package's model.onnx and ood.onnx, calibration, predictions.csv + skipped.csv written;
  bare         the same two onnxruntime sessions' ``run`` on tensors made beforehand from the same images,
               in the same batches: the model alone.
overhead = cxr-predict time / bare time − 1 (the issue's goal: under 30 %). Opening the package (session
creation) happens once per command and is reported apart; so is a whole `cxr-predict` process (imports included).

The package: one member of ``--arch`` with its initial weights (speed does not depend on the weights) written as
a run dir, the OOD gate trained for a few steps on the sample's train split (``shards split/pack``,
``cxr.train --config cxr/configs/ood_ae.yaml``, ``cxr.tools.ood threshold``), exported by ``cxr.tools.export``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def build_package(nih: Path, work: Path, arch: str, resolution: int) -> Path:
    """A member run dir (initial weights), a gate, and their package (cxr.tools.export) under ``work``."""
    import torch
    import yaml
    from ood_gate import make_gate
    from safetensors.torch import save_file

    from cxr.models import build_model
    from cxr.tools.export import main as export_main
    from cxrbase.labels import LABELS
    from shards.cli import main as shards_main

    pkg = work / f"pkg-{arch}-{resolution}"
    if (pkg / "manifest.json").is_file():
        return pkg
    splits = work / "gate" / "splits.parquet"
    splits.parent.mkdir(parents=True, exist_ok=True)
    args = ["split", "--metadata", str(nih / "Data_Entry_2017_v2020.csv.gz"), "--scheme", "random"]
    args += ["--fractions", "0.6,0.2,0.2", "--restrict-to", str(nih / "sample"), "--out", str(splits)]
    assert shards_main(args) == 0
    shards, gate = make_gate(splits, nih, 95, ["train.epochs=1", "train.max_steps=4"])
    run = work / f"member-{arch}-{resolution}"
    best = run / "checkpoints" / "best"
    best.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model(arch, len(LABELS))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(best / "model.safetensors"))
    meta = {"epoch": 0, "global_step": 0, "labels": list(LABELS), "resolution": resolution, "model": arch}
    (best / "meta.json").write_text(json.dumps({**meta, "val": {"loss": 0.5}}))
    config = {
        "data": {"shards": str(shards), "backend": "wds", "resolution": resolution, "augment": False},
        "model": {"name": arch, "num_labels": len(LABELS)},
        "train": {"epochs": 1, "seed": 0},
        "checkpoint": {"run_dir": str(run)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert export_main(["--run", str(run), "--ood", str(gate), "--out", str(pkg)]) == 0
    return pkg


def bare_runner(pkg: Path, files: list[Path], batch: int):
    """(tensors made outside the timing, a function running both sessions over them in ``batch``es)."""
    import onnxruntime as ort

    from cxr.tools.predict import model_input, read_grey

    pre = json.loads((pkg / "preprocess.json").read_text())
    m, o = pre["model"], pre["ood"]
    masters = [read_grey(f) for f in files]
    x = model_input(masters, int(m["resolution"]), float(m["mean"]), float(m["std"]))
    g = model_input(masters, int(o["resolution"]), float(o["mean"]), float(o["std"]))
    model = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    gate = ort.InferenceSession(str(pkg / "ood.onnx"), providers=["CPUExecutionProvider"])

    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(0, len(files), batch):
            model.run(["probs"], {"image": x[s : s + batch]})
            gate.run(["score"], {"image": g[s : s + batch]})
        return time.perf_counter() - t0, time.process_time() - c0

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nih", type=Path, default=ROOT.parent / "shared" / "data" / "nih")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench-predict")
    p.add_argument("--n", type=int, default=100, help="images (the sample's first N PNGs, sorted; default 100)")
    p.add_argument("--arch", default="densenet121", help="member architecture (default densenet121)")
    p.add_argument("--resolution", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each (default 3)")
    p.add_argument("--append", type=Path, help="append the markdown table to this file")
    args = p.parse_args(argv)

    from cxr.tools.predict import collect_inputs, open_package, predict

    args.out.mkdir(parents=True, exist_ok=True)
    pkg = build_package(args.nih, args.out, args.arch, args.resolution)
    files = sorted((args.nih / "sample").glob("*.png"))[: args.n]
    if len(files) < args.n:
        raise SystemExit(f"{args.nih / 'sample'}: {len(files)} PNGs, fewer than --n {args.n}")
    t0 = time.perf_counter()
    scorer = open_package(pkg)
    open_s = time.perf_counter() - t0
    bare = bare_runner(pkg, files, args.batch_size)
    inputs = collect_inputs(files)
    predict(scorer, collect_inputs(files[: args.batch_size]), args.out / "warm", args.batch_size, progress=False)
    bare()  # warm-up of the bare sessions
    ours, theirs = [], []  # (wall s, CPU s of this process, all threads) per pass
    for r in range(args.repeats):
        for which in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):  # ABBA: load drift hits both
            if which == "bare":
                theirs.append(bare())
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            done = predict(scorer, inputs, args.out / "predictions", args.batch_size, progress=False)
            ours.append((time.perf_counter() - t0, time.process_time() - c0))
            assert done["scored"] == args.n, done
    # the whole command once: process start, imports, opening the package, the images, the files
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "cxr.tools.predict", "--no-progress", "--model", str(pkg), *map(str, files)]
    subprocess.run(
        [*cmd, "--out", str(args.out / "cli")],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    cli_s = time.perf_counter() - t0
    (a, ca), (b, cb) = np.median(ours, axis=0), np.median(theirs, axis=0)
    overhead, cpu_overhead = a / b - 1, ca / cb - 1
    rows = [
        f"| what | wall s per pass (median of {args.repeats}) | img/s | CPU s per pass |",
        "|---|---|---|---|",
        f"| bare onnxruntime (model.onnx + ood.onnx on ready tensors) | {b:.2f} | {args.n / b:.1f} | {cb:.1f} |",
        f"| cxr-predict's predict() (read, grey, resize, normalise, both sessions, CSVs) | {a:.2f} | "
        f"{args.n / a:.1f} | {ca:.1f} |",
        f"| **overhead** (goal < 30 %) | **{100 * overhead:+.1f} %** | | **{100 * cpu_overhead:+.1f} %** |",
        f"| opening the package (once per command) | {open_s:.2f} | | |",
        f"| a whole `cxr-predict` process on the {args.n} files | {cli_s:.2f} | {args.n / cli_s:.1f} | |",
    ]
    head = (
        f"{args.n} NIH sample PNGs (1024²), {args.arch} at {args.resolution} px + the 64 px gate, batch "
        f"{args.batch_size}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {os.getloadavg()[0]:.1f}; wall s per pass: predict {', '.join(f'{t:.2f}' for t, _ in ours)}, "
        f"bare {', '.join(f'{t:.2f}' for t, _ in theirs)}"
    )
    text = head + "\n\n" + "\n".join(rows) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write("\n" + text)
    return 0 if min(overhead, cpu_overhead) < 0.30 else 1


if __name__ == "__main__":
    sys.exit(main())
