"""Loader throughput vs the decode ceiling, measured side by side in one run.

Packs the real NIH sample PNGs (1024², replicated under new keys to a few hundred
samples) with the real `shards split` / `shards pack` (+ `--resize 224`), then times:
  - ceilings: a DALI decode-only pipeline over the same bytes held in memory, and PIL
    decode in a thread pool — both with --threads workers;
  - both back ends at 1024 (decode + normalize, no resize), at 224 and 512 (resize +
    normalize, with and without augmentation) from the 1024 masters;
  - both back ends at 224 from the derived res224 shards.
Every number is the best of --repeats passes over the train split (the machine is
shared: the best pass is the least disturbed one). Goals: loader ≥ 0.9× the decode
ceiling at 1024; derived res224 ≥ 5× faster than resizing masters to 224.

    python bench/loader.py --append bench/RESULTS.md

`--codecs` instead compares the shard codecs (png, ljpeg, j2k, jpeg q95) on the
first --images sample PNGs: each is encoded as `pack` would (shards.image_codec),
then decoded on one CPU thread by DALI (`fn.decoders.image`, device cpu, GRAY) and
by PIL / imagecodecs; bytes per image and decoded-equals-source are reported. It
writes its own section ("## codec decode") with --append.

    python bench/loader.py --codecs --images 40 --append bench/RESULTS.md

`--masters` instead measures the loader from full-resolution masters against its peers, all
cases interleaved per repeat: PNG decode ceilings at 1024 (DALI, imagecodecs and PIL in
--threads threads), the DALI loader at 1024, DALI and wds at 224 resized from the masters
(eval mode), and MONAI (LoadImage + Resize in a DataLoader with --threads workers) and
torchxrayvision (skimage imread + its normalize + XRayResizer, same DataLoader) over the same
PNG files, where installed. Goals: DALI from masters at 224 ≥ 1.2× MONAI; the DALI loader at
1024 ≥ 0.9× the best PNG decode ceiling. Section "## loader from masters".

    python bench/loader.py --masters --append bench/RESULTS.md

`--parallel-source` instead compares, on the same packed shards, the DALI loader with its
external source in the training process (data.source_workers=0) and in DALI's parallel
mode with 1 and 2 spawned workers, in training (augment on) at 1024 (source: read + crc32
only) and at 256 resized from the 1024 masters (source: + PIL decode and resize), each
case interleaved per repeat so that load on the shared machine hits all alike. It writes
its own section ("## DALI parallel external source") with --append.

    python bench/loader.py --parallel-source --append bench/RESULTS.md

`--s3` instead serves the same shards from a local S3 server (moto on 127.0.0.1) and compares,
at 224 from the derived res224 shards: the DALI back end on local files and through its warm
node-local cache (data.shards a URL, shards/cache.py), and on local files again as a control, in
--rounds rounds with the order rotated per round, reporting the medians of the per-round ratios to
local files of wall-clock rates and of the process's CPU time per image (robust to the load of a
shared machine, which best-of-N is not: one lucky pass decides it); the wds back end on local files
and streaming from the bucket (best of --repeats, interleaved); then the cache's cold fetch of the
train masters against s3fs alone copying the same objects. Goal: the warm cache within 5 % of local
files.
Section "## loader from S3".

    python bench/loader.py --s3 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrbase.atomic import atomic_write_text  # noqa: E402
from shards.cli import main as shards_main  # noqa: E402

NOTE = (
    "Start-up = pipeline build, worker start and prefetch fill, paid once per epoch (negligible in a "
    "78k-image epoch, dominant in these 468-image passes at 224). Above the decode ceiling, the DALI loader "
    "at 1024 pays a float32 normalize pass and the copy into torch (4 MB per image); the wds fallback also "
    "pays Python per sample and the worker→main transfer. Runs on this shared 2-core machine vary by ~±5 %."
)
SAMPLE = ROOT.parent / "shared" / "data" / "nih" / "sample"


def build_shards(sample: Path, work: Path, replicate: int) -> Path:
    """Replicated sample → Data_Entry CSV + lists → official split → packed shards (+ res224)."""
    labels = pd.read_csv(sample / "labels.csv")
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(replicate):
        for _, row in labels.iterrows():
            name = f"{r + 1}{row['Image Index'][1:]}"  # NIH ids start with 000…: a new leading digit per copy
            target = images / name
            if not target.exists():
                os.symlink(sample / row["Image Index"], target)
            rows.append({**row.to_dict(), "Image Index": name, "Patient ID": int(row["Patient ID"]) + (r + 1) * 10**7})
    table = pd.DataFrame(rows).drop(columns=["official_split", "png_mode", "sha256"])
    table.to_csv(work / "Data_Entry_2017.csv", index=False)
    (work / "train_val_list.txt").write_text("\n".join(table["Image Index"]) + "\n")
    (work / "test_list.txt").write_text("")
    splits, out = work / "splits.parquet", work / "shards"
    for argv in (
        ["split", "--metadata", str(work / "Data_Entry_2017.csv"), "--scheme", "official", "--out", str(splits)],
        ["pack", "--splits", str(splits), "--images", str(images), "--out", str(out), "--shard-size-mb", "64"],
        [
            "pack",
            "--splits",
            str(splits),
            "--images",
            str(images),
            "--out",
            str(out),
            "--shard-size-mb",
            "64",
            "--resize",
            "224",
        ],
    ):
        if shards_main(argv) != 0:
            raise SystemExit(f"shards {argv[0]} failed")
    return out


def best_rate(run, repeats: int) -> float:
    """Best images/s over `repeats` calls of run() → number of images."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def best_cpu_rate(run, repeats: int) -> float:
    """Best images per CPU-second of this process (all its threads) over `repeats` calls of run()."""
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        n = run()
        rates.append(n / (time.process_time() - start))
    return max(rates)


def encoded_train_images(shards: Path) -> list[bytes]:
    from cxr.data.shard_index import SampleReader, SplitIndex, load_shards_manifest

    folder, manifest = load_shards_manifest(shards, 1024)
    reader = SampleReader(SplitIndex.load(folder, manifest, "train"))
    return [reader.read(i)[0] for i in range(len(reader.index))]


def dali_decode_ceiling(data: list[bytes], threads: int, batch: int):
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(d, np.uint8) for d in data]

    def run() -> int:
        chunks = iter(range(0, len(arrays), batch))

        def source():
            i = next(chunks)
            return arrays[i : i + batch]

        @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=2)
        def pipe():
            return fn.decoders.image(
                fn.external_source(source=source, batch=True, dtype=types.UINT8), device="cpu", output_type=types.GRAY
            )

        p = pipe()
        p.build()
        n = 0
        try:
            while True:
                (out,) = p.run()
                n += len(out)
        except StopIteration:
            return n

    return run


def pil_decode_ceiling(data: list[bytes], threads: int):
    from PIL import Image

    def decode(d: bytes) -> int:
        im = Image.open(io.BytesIO(d))
        im.load()
        return 1

    def run() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(decode, data))

    return run


def grey_decode_ceiling(data: list[bytes], threads: int):
    """PNG decode with the loaders' own decoder (shards.image_codec.decode_grey: imagecodecs' libpng) in threads."""
    from shards.image_codec import decode_grey

    def run() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(1 for _ in pool.map(lambda d: decode_grey(d, "png"), data))

    return run


def peer_rates(files: list[Path], peer: str, resolution: int, threads: int, batch: int):
    """A peer library's loader over the same PNG files: run() → images, in a DataLoader of `threads` workers."""
    import torch

    if peer == "monai":
        from monai.data import Dataset, PILReader
        from monai.transforms import Compose, LoadImage, Resize

        # the usual MONAI 2D recipe: PIL reader (grey, as the sample has a few RGBA files), channel
        # first, area resize (Resize's default mode)
        reader = PILReader(converter=_grey)
        transform = Compose(
            [LoadImage(image_only=True, ensure_channel_first=True, reader=reader), Resize((resolution, resolution))]
        )
        dataset = Dataset([str(f) for f in files], transform)
    else:
        dataset = _XrvFiles(files, resolution)

    def run() -> int:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, num_workers=threads, multiprocessing_context="fork" if threads else None
        )
        return sum(len(b) for b in loader)

    return run


def _grey(image):
    return image.convert("L")


class _XrvFiles:
    """torchxrayvision's own preprocessing of one image (its datasets' path): imread, normalize, resize."""

    def __init__(self, files: list[Path], resolution: int):
        self.files, self.res = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import skimage.io
        import torchxrayvision as xrv

        img = xrv.datasets.normalize(skimage.io.imread(self.files[i]), 255)
        if img.ndim == 3:
            img = img.mean(2)
        return xrv.datasets.XRayResizer(self.res, engine="skimage")(img[None]).astype(np.float32)


def masters_rates(shards: Path, masters_only: Path, files: list[Path], args) -> list[tuple[str, float, float | None]]:
    """Rows (name, best img/s whole pass, best steady img/s or None), every case once per repeat, interleaved."""
    import importlib.util

    data = encoded_train_images(shards)
    t, b = args.threads, args.batch_size
    cases = {
        "ceiling: DALI PNG decode, 1024": (dali_decode_ceiling(data, t, b), False),
        "ceiling: imagecodecs PNG decode (loaders' decoder), 1024": (grey_decode_ceiling(data, t), False),
        "ceiling: PIL PNG decode, 1024": (pil_decode_ceiling(data, t), False),
        "dali 1024 (decode+normalize)": (lambda: loader_rates(shards, "dali", 1024, False, t, b, 1), True),
        "dali 224 from masters": (lambda: loader_rates(masters_only, "dali", 224, False, t, b, 1), True),
        "dali 224 from masters, 1 thread": (lambda: loader_rates(masters_only, "dali", 224, False, 1, b, 1), True),
        "wds 224 from masters": (lambda: loader_rates(masters_only, "wds", 224, False, t, b, 1), True),
    }
    for peer in ("monai", "torchxrayvision"):
        if importlib.util.find_spec(peer) is not None:
            cases[f"{peer} 224 (DataLoader, {t} workers)"] = (
                peer_rates(files, peer.replace("torchxrayvision", "xrv"), 224, t, b),
                False,
            )
    loader_rates(masters_only, "wds", 224, False, t, b, 1)  # start the worker fork server once, untimed
    best = {name: (0.0, None) for name in cases}
    for _ in range(args.repeats):
        for name, (run, is_loader) in cases.items():
            if is_loader:
                tot, st = run()
            else:
                start = time.perf_counter()
                tot, st = run() / (time.perf_counter() - start), None
            old_tot, old_st = best[name]
            best[name] = (max(old_tot, tot), None if st is None else max(old_st or 0.0, st))
    return [(name, *best[name]) for name in cases]


def masters_table(rows: list[tuple[str, float, float | None]], n: int, args) -> str:
    total = {name: tot for name, tot, _ in rows}
    ceiling = max(v for name, v in total.items() if name.startswith("ceiling"))
    monai = next((v for name, v in total.items() if name.startswith("monai")), None)
    lines = [
        (
            f"{n} train images (1024² NIH PNG masters), eval mode, {args.threads} threads / workers, batch "
            f"{args.batch_size}, best of {args.repeats} interleaved passes"
        ),
        "",
        "| case | img/s whole pass | img/s steady | whole pass / MONAI | whole pass / best 1024 decode ceiling |",
        "|---|---|---|---|---|",
    ]
    for name, tot, st in rows:
        ratio = f"{tot / monai:.2f}x" if monai else "-"
        lines.append(f"| {name} | {tot:.1f} | {'' if st is None else f'{st:.1f}'} | {ratio} | {tot / ceiling:.2f}x |")
    dali224, dali1024 = total["dali 224 from masters"], total["dali 1024 (decode+normalize)"]
    lines.append("")
    if monai:
        lines.append(f"Goals: DALI 224 from masters / MONAI = {dali224 / monai:.2f}x (goal ≥ 1.2)")
    lines.append(
        f"DALI 1024 loader / best PNG decode ceiling = {dali1024 / ceiling:.2f}x (goal ≥ 0.9); "
        f"DALI 224 from masters / best ceiling = {dali224 / ceiling:.2f}x"
    )
    return "\n".join(lines)


def loader_rates(
    shards: Path, backend: str, resolution: int, augment: bool, threads: int, batch: int, repeats: int, **extra
) -> tuple[float, float]:
    """Best (images/s over the whole pass, images/s after the first batch) of `repeats` passes.

    The first number includes the per-epoch start-up (pipeline build, worker start and
    prefetch fill); the second is the steady state a long epoch runs at.
    """
    from cxr.data import DataConfig, build_loader

    cfg = DataConfig(
        shards=str(shards),
        backend=backend,
        resolution=resolution,
        batch_size=batch,
        num_threads=threads,
        augment=augment,
        **extra,
    )
    totals, steady = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        n = first_n = 0
        # train=augment: augmentation exists only in training; without it, eval mode reads every sample
        for b in build_loader(cfg, "train", epoch=0, train=augment):
            if n == 0:
                first, first_n = time.perf_counter(), len(b["key"])
            n += len(b["key"])
        end = time.perf_counter()
        totals.append(n / (end - start))
        steady.append((n - first_n) / (end - first))
    return max(totals), max(steady)


def measure(shards: Path, masters_only: Path, args) -> list[tuple[str, float, float | None]]:
    """Rows (name, images/s whole pass, images/s after the first batch or None for ceilings)."""
    data = encoded_train_images(shards)
    r, t, b = args.repeats, args.threads, args.batch_size
    loader_rates(shards, "wds", 224, False, t, b, 1)  # start the worker fork server once, untimed
    rows = [
        ("ceiling: DALI decode only, 1024", best_rate(dali_decode_ceiling(data, t, b), r), None),
        ("ceiling: PIL decode, thread pool, 1024", best_rate(pil_decode_ceiling(data, t), r), None),
    ]
    for backend in ("dali", "wds"):
        rows.append((f"{backend} 1024 (decode+normalize)", *loader_rates(shards, backend, 1024, False, t, b, r)))
        for res in (224, 512):
            for aug in (False, True):
                rows.append(
                    (
                        f"{backend} {res} from masters, augment {'on' if aug else 'off'}",
                        *loader_rates(masters_only, backend, res, aug, t, b, r),
                    )
                )
        rows.append(
            (f"{backend} 224 from derived res224, augment off", *loader_rates(shards, backend, 224, False, t, b, r))
        )
    return rows


def summarize(rows: list[tuple[str, float, float | None]], n: int, args) -> str:
    total = {name: value for name, value, _ in rows}
    steady = {name: value for name, _, value in rows}
    ceiling = max(total["ceiling: DALI decode only, 1024"], total["ceiling: PIL decode, thread pool, 1024"])
    lines = [
        f"{n} train images (1024² PNG), {args.threads} threads/workers, batch {args.batch_size}, best of "
        f"{args.repeats}; img/s over the whole pass (incl. start-up) | after the first batch"
    ]
    lines += [f"{name:<44} {tot:8.1f}" + (f" | {st:8.1f}" if st else "") for name, tot, st in rows]
    for backend, own in (
        ("dali", "ceiling: DALI decode only, 1024"),
        ("wds", "ceiling: PIL decode, thread pool, 1024"),
    ):
        name = f"{backend} 1024 (decode+normalize)"
        derived, masters = f"{backend} 224 from derived res224, augment off", f"{backend} 224 from masters, augment off"
        lines.append(
            f"{backend}: 1024 loader / own decode ceiling = {total[name] / total[own]:.2f}x whole pass, "
            f"{steady[name] / total[own]:.2f}x steady; / best ceiling = {total[name] / ceiling:.2f}x | "
            f"{steady[name] / ceiling:.2f}x (goal >= 0.9); derived res224 / resize masters = "
            f"{total[derived] / total[masters]:.1f}x | {steady[derived] / steady[masters]:.1f}x (goal >= 5)"
        )
    return "\n".join(lines)


def replace_section(path: Path, title: str, section: str) -> None:
    """Replace RESULTS.md's "## {title}" section with ``section`` (or append it), other sections untouched."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(f"\n## {title}\n")
    if start >= 0:
        end = old.find("\n## ", start + 1)
        new = old[: start + 1] + section + (old[end + 1 :] if end >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, new)


def append_results(path: Path, text: str, command: str) -> None:
    """Replace this benchmark's own section of RESULTS.md (or append it), leaving other sections alone."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    section = (
        f"## loader\n\n`{command}` ({platform.machine()}, {os.cpu_count()} cores, load average {load} — "
        f"shared machine, {date.today()})\n\n```\n{text}\n```\n\n{NOTE}\n"
    )
    replace_section(path, "loader", section)


SOURCE_WORKERS = (0, 1, 2)
PARALLEL_NOTE = (
    "source_workers=0: DALI's external source runs in the training process (the serial source); 1/2: "
    "DALI's parallel external source with that many spawned worker processes, which is built per epoch "
    "(its workers hold the epoch's batch list), so its whole-pass rate includes starting the workers. "
    "DALI's decode/warp thread pool has --threads threads in every case. Steady = images/s after the "
    "first batch."
)


def parallel_source_rates(shards: Path, masters_only: Path, args) -> list[tuple[int, int, float, float]]:
    """Rows (resolution, source_workers, best whole-pass img/s, best steady img/s); cases interleaved per repeat."""
    cases = [(res, w) for res in (1024, 256) for w in SOURCE_WORKERS]
    best = {case: (0.0, 0.0) for case in cases}
    for _ in range(args.repeats):
        for res, w in cases:
            folder = shards if res == 1024 else masters_only  # 256: resized from the masters in the source
            tot, st = loader_rates(folder, "dali", res, True, args.threads, args.batch_size, 1, source_workers=w)
            best[res, w] = (max(best[res, w][0], tot), max(best[res, w][1], st))
    return [(res, w, *best[res, w]) for res, w in cases]


def parallel_source_table(rows: list[tuple[int, int, float, float]], n: int, args) -> str:
    lines = [
        f"{n} train images (1024² PNG masters), DALI back end, training (augment on), {args.threads} DALI "
        f"threads, batch {args.batch_size}, best of {args.repeats} interleaved passes",
        "",
        "| resolution | source | source_workers | img/s whole pass | img/s steady | steady / serial |",
        "|---|---|---|---|---|---|",
    ]
    serial = {res: st for res, w, _, st in rows if w == 0}
    for res, w, tot, st in rows:
        source = "read + crc32" if res == 1024 else "read + crc32 + PIL decode + resize"
        lines.append(f"| {res} | {source} | {w} | {tot:.1f} | {st:.1f} | {st / serial[res]:.2f}x |")
    return "\n".join(lines)


def write_section(path: Path, title: str, command: str, body: str) -> None:
    """Replace (or append) the "## {title}" section of RESULTS.md: the command, the machine, the load, ``body``."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    section = (
        f"## {title}\n\n`{command}` ({platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load} — shared machine, {date.today()})\n\n{body}\n"
    )
    replace_section(path, title, section)


def append_parallel_section(path: Path, text: str, command: str) -> None:
    """Replace (or append) the "## DALI parallel external source" section of RESULTS.md."""
    write_section(path, "DALI parallel external source", command, f"{text}\n\n{PARALLEL_NOTE}")


CODECS = ("png", "ljpeg", "j2k", "jpeg")


def encode_sample(sample: Path, n: int) -> dict[str, list[bytes]]:
    """codec → member bytes of the first n sample PNGs, encoded as pack does; + "source" grey pixels."""
    from PIL import Image

    from shards.image_codec import prepare_image

    names = list(pd.read_csv(sample / "labels.csv")["Image Index"])[:n]
    out: dict[str, list] = {"source": [np.asarray(Image.open(sample / name).convert("L")) for name in names]}
    for codec in CODECS:
        out[codec] = [prepare_image(name[:-4], sample / name, codec).data for name in names]
    return out


def decoder_rates(encoded: dict[str, list], repeats: int) -> list[tuple]:
    """Rows (codec, kB/image, DALI cpu, PIL, imagecodecs or None, exact); rates in images per CPU-second, one thread.

    imagecodecs: for ljpeg the loaders' decoder (shards.image_codec.decode_ljpeg: marker
    check + jpeg8_decode), and lj92 (imagecodecs.ljpeg_decode) beside it.
    """
    import imagecodecs
    from PIL import Image

    from shards.image_codec import decode_ljpeg

    def pil(data: list[bytes]):
        def run() -> int:
            for d in data:
                Image.open(io.BytesIO(d)).load()
            return len(data)

        return run

    rows = []
    for codec in CODECS:
        data = encoded[codec]
        dali = best_cpu_rate(dali_decode_ceiling(data, 1, 8), repeats)
        pil_rate = best_cpu_rate(pil(data), repeats)
        ic = None
        if codec == "ljpeg":
            ic = (
                best_cpu_rate(lambda: len([decode_ljpeg(d) for d in data]), repeats),
                best_cpu_rate(lambda: len([imagecodecs.ljpeg_decode(d) for d in data]), repeats),
            )
        exact = all(
            np.array_equal(np.asarray(Image.open(io.BytesIO(d))), src) for d, src in zip(data, encoded["source"])
        )
        rows.append((codec, np.mean([len(d) for d in data]) / 1e3, dali, pil_rate, ic, exact))
    return rows


def codec_table(rows: list[tuple], n: int, repeats: int) -> str:
    lines = [
        f"{n} real NIH 1024² images, one decoder thread, best of {repeats}; images per CPU-second of the process "
        "(DALI's includes its pipeline build per pass)",
        "",
        "| codec | kB/image | DALI cpu decode | PIL decode | imagecodecs decode (loaders' jpeg8 / lj92) | "
        "PIL decode == source |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {kb:.0f} | {d:.0f} | {p:.0f} | {'' if i is None else f'{i[0]:.0f} / {i[1]:.0f}'} | {e} |"
        for c, kb, d, p, i, e in rows
    ]
    return "\n".join(lines)


def append_codec_section(path: Path, text: str, command: str) -> None:
    """Replace (or append) the "## codec decode" section of RESULTS.md."""
    write_section(path, "codec decode", command, text)


S3_NOTE = (
    "The bucket is a moto S3 server on 127.0.0.1 in this process (tests/s3_server.py), so 'network' "
    "here is loopback plus moto's Python request handling on the same 2 cores as the loaders. Warm "
    "cache: data.shards is the URL and data.cache_dir already holds the verified shards; as in a run's "
    "later epochs, each pass after the process's first makes no request (shards/cache.py reuses the "
    "manifests it read) — it takes the node lock, stats each shard and rewrites index.json — then DALI "
    "reads local files. Streaming: data.backend=wds "
    "reads each sample with a ranged GET. Cold fetch: shards.cache into an empty cache dir (one GET per "
    "shard and per .idx, 8 at once, then sha256 of each) against s3fs alone copying the same objects "
    "(fs.get, the `aws s3 cp --recursive` equivalent: concurrent GETs, no checks)."
)


def dali_pass(case: dict, threads: int, batch: int) -> tuple[float, float, float]:
    """One eval pass at 224: (img/s whole pass, img/s after the first batch, process CPU ms per image).

    DALI's threads run in this process, so its CPU time counts the loader's whole work; other jobs on a
    shared machine stretch wall time far more than they change it."""
    import resource

    from cxr.data import DataConfig, build_loader

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    extra = {k: v for k, v in case.items() if k not in ("shards", "backend")}
    cfg = DataConfig(
        shards=str(case["shards"]), backend="dali", resolution=224, batch_size=batch, num_threads=threads, **extra
    )
    start, cpu0, n, first_n = time.perf_counter(), cpu(), 0, 0
    for got in build_loader(cfg, "train", epoch=0, train=False):
        if n == 0:
            first, first_n = time.perf_counter(), len(got["key"])
        n += len(got["key"])
    end = time.perf_counter()
    return n / (end - start), (n - first_n) / (end - first), (cpu() - cpu0) / n * 1e3


def s3_rates(shards: Path, work: Path, args) -> tuple[dict, list[tuple[str, float, float]], list]:
    """DALI local files vs the warm cache vs local files again, in rounds (order rotated): {name: [(whole-pass
    img/s, steady img/s, CPU ms/img) per round]}; wds rows (name, best whole-pass img/s, best steady img/s) interleaved
    per repeat; cold-fetch rows (name, MB/s, seconds): the cache vs s3fs alone."""
    import shutil

    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import running_s3_server

    from shards.cache import ShardCache
    from shards.remote import location

    r, t, b = args.repeats, args.threads, args.batch_size
    with running_s3_server() as server:
        client = server.client()
        client.create_bucket(Bucket="bench-shards")
        for path in sorted(shards.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                client.upload_file(str(path), "bench-shards", f"nih/{path.relative_to(shards)}")
        url = "s3://bench-shards/nih"
        warm = work / "warm-cache"
        ShardCache(warm).ensure(url, ["train"], 224)  # fill it once, untimed
        loader_rates(shards, "wds", 224, False, t, b, 1)  # start the worker fork server once, untimed
        dali = {
            "dali 224 res224, local files": dict(shards=shards, backend="dali"),
            "dali 224 res224, warm cache (URL)": dict(shards=url, backend="dali", cache_dir=str(warm)),
            "dali 224 res224, local files again (control)": dict(shards=shards, backend="dali"),
        }

        def one_pass(case: dict) -> tuple[float, float]:
            extra = {k: v for k, v in case.items() if k not in ("shards", "backend")}
            return loader_rates(case["shards"], case["backend"], 224, False, t, b, 1, **extra)

        for case in dali.values():  # one untimed pass each: pipeline first use, split index and checks memoized
            dali_pass(case, t, b)
        paired: dict[str, list[tuple[float, float, float]]] = {name: [] for name in dali}
        names = list(dali)
        for i in range(args.rounds):  # A B C, B C A, C A B, …: a slow stretch of the shared machine hits all alike
            for name in names[i % 3 :] + names[: i % 3]:
                paired[name].append(dali_pass(dali[name], t, b))

        streams = {
            "wds 224 res224, local files": dict(shards=shards, backend="wds"),
            "wds 224 res224, streaming from S3 (URL)": dict(shards=url, backend="wds"),
        }
        best = {name: (0.0, 0.0) for name in streams}
        for _ in range(r):
            for name, case in streams.items():
                tot, st = one_pass(case)
                best[name] = (max(best[name][0], tot), max(best[name][1], st))
        rows = [(name, *best[name]) for name in streams]

        # cold fetch of the train masters (the larger objects): the cache vs s3fs alone, interleaved
        manifest = __import__("json").loads((shards / "manifest.json").read_text())
        train = [e for e in manifest["shards"] if e["split"] == "train"]
        total = sum(e["bytes"] for e in train) + sum((shards / e["index"]).stat().st_size for e in train)
        loc = location(url)
        objects = [str(loc / name).split("://", 1)[1] for e in train for name in (e["name"], e["index"])]
        fetch: dict[str, float] = {"shards.cache, cold (GET + sha256 + rename)": 1e9, "s3fs alone (fs.get)": 1e9}
        for _ in range(r):
            for name in fetch:
                target = work / "cold"
                shutil.rmtree(target, ignore_errors=True)
                start = time.perf_counter()
                if name.startswith("shards.cache"):
                    ShardCache(target).ensure(url, ["train"])
                else:
                    target.mkdir()
                    loc.fs.get(objects, [str(target / o.rsplit("/", 1)[1]) for o in objects])
                fetch[name] = min(fetch[name], time.perf_counter() - start)
        cold = [(name, total / sec / 1e6, sec) for name, sec in fetch.items()]
    return paired, rows, cold + [("bytes", total / 1e6, 0.0)]


def s3_table(paired, rows, cold, n: int, args) -> str:
    from statistics import median

    local, warm, control = paired

    def ratios(case: str, k: int) -> list[float]:
        return [c[k] / lo[k] for lo, c in zip(paired[local], paired[case])]

    def said(xs: list[float]) -> str:
        return f"{median(xs):.3f}x ({min(xs):.2f}–{max(xs):.2f})"

    lines = [
        f"{n} train images, derived res224 shards, eval mode (no augment), {args.threads} threads/workers, "
        f"batch {args.batch_size}",
        "",
        f"DALI: local files, the warm cache and local files again (a control: the noise between two identical "
        f"cases) in {args.rounds} rounds, the order rotated per round (A B C, B C A, …), after one untimed pass "
        "each; CPU = this process's user + system time per image (DALI's threads included)",
        "",
        "| case | img/s whole pass, median (min–max) | img/s steady, median (min–max) | CPU ms/img, median |",
        "|---|---|---|---|",
    ]
    for name, passes in paired.items():
        tot, st, cpu = [p[0] for p in passes], [p[1] for p in passes], [p[2] for p in passes]
        lines.append(
            f"| {name} | {median(tot):.1f} ({min(tot):.0f}–{max(tot):.0f}) | "
            f"{median(st):.1f} ({min(st):.0f}–{max(st):.0f}) | {median(cpu):.3f} |"
        )
    lines += [
        "",
        "Median (min–max) of the per-round ratios to local files of the same round (img/s: > 1 is faster; "
        "CPU: < 1 is cheaper):",
        "",
        "| case / local files | whole pass img/s | steady img/s | CPU per image |",
        "|---|---|---|---|",
    ]
    for case in (warm, control):
        lines.append(f"| {case} | {said(ratios(case, 0))} | {said(ratios(case, 1))} | {said(ratios(case, 2))} |")
    lines += [
        "",
        f"warm cache / local files: **{median(ratios(warm, 0)):.3f}x whole pass, {median(ratios(warm, 1)):.3f}x "
        f"steady, {median(ratios(warm, 2)):.3f}x CPU per image** (goal: within 5 %); the control's spread is "
        "the noise of this machine at the time",
        "",
        f"wds, best of {args.repeats} interleaved passes:",
        "",
        "| case | img/s whole pass | img/s steady | whole pass / local files |",
        "|---|---|---|---|",
    ]
    total = {name: tot for name, tot, _ in rows}
    for name, tot, st in rows:
        lines.append(f"| {name} | {tot:.1f} | {st:.1f} | {tot / total[rows[0][0]]:.2f}x |")
    mb = dict((name, rate) for name, rate, _ in cold)
    lines += [
        "",
        f"cold fetch of the train masters ({mb.pop('bytes'):.1f} MB: shards + .idx), best of {args.repeats}:",
        "",
        "| copy | MB/s | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {rate:.1f} | {sec:.2f} |" for name, rate, sec in cold if name != "bytes"]
    names = [name for name, _, _ in cold if name != "bytes"]
    lines.append(f"\ncold fetch / s3fs alone = {mb[names[0]] / mb[names[1]]:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="folder of NIH PNGs with labels.csv")
    parser.add_argument("--replicate", type=int, default=4, help="copies of the sample (default 4 → 520 images)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers / PIL threads")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement, best kept (default 3)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the shards (default: a temp dir)")
    parser.add_argument("--append", type=Path, default=None, help="write the results into this RESULTS.md")
    parser.add_argument(
        "--codecs",
        action="store_true",
        help="only compare decode speed and size of png / ljpeg / j2k / jpeg (see above)",
    )
    parser.add_argument(
        "--masters",
        action="store_true",
        help="only compare the loader from 1024 masters with the decode ceilings and MONAI / "
        "torchxrayvision (see above)",
    )
    parser.add_argument(
        "--parallel-source",
        action="store_true",
        help="only compare the DALI external source serial vs parallel with 1/2 workers (see above)",
    )
    parser.add_argument(
        "--s3",
        action="store_true",
        help="only compare local files with a local S3 server: DALI through the warm node cache, wds "
        "streaming, and the cache's cold fetch against s3fs alone (see above)",
    )
    parser.add_argument("--images", type=int, default=40, help="--codecs: sample images to encode (default 40)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="--s3: rounds of DALI passes on local files, through the warm cache and on local files again "
        "(default 10); the medians of the per-round ratios are reported",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    if args.codecs:
        text = codec_table(
            decoder_rates(encode_sample(args.sample, args.images), args.repeats), args.images, args.repeats
        )
        print(text)
        if args.append:
            append_codec_section(args.append, text, command)
        return
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        work = args.work or Path(tmp)
        shards = build_shards(args.sample, work, args.replicate)
        masters_only = work / "masters-only"  # same shards without res*/ so 224 must resize the masters
        masters_only.mkdir(exist_ok=True)
        for f in shards.iterdir():
            if f.is_file() and not (masters_only / f.name).exists():
                os.symlink(f, masters_only / f.name)
        n = len(encoded_train_images(shards))
        if args.masters:
            from cxr.data.shard_index import SplitIndex, load_shards_manifest

            folder, manifest = load_shards_manifest(shards, 1024)
            files = [work / "images" / f"{key}.png" for key in SplitIndex.load(folder, manifest, "train").keys]
            text = masters_table(masters_rates(shards, masters_only, files, args), n, args)
            print(text)
            if args.append:
                write_section(args.append, "loader from masters", command, text)
            return
        if args.s3:
            text = s3_table(*s3_rates(shards, work, args), n, args)
            print(text)
            if args.append:
                write_section(args.append, "loader from S3", command, f"{text}\n\n{S3_NOTE}")
            return
        if args.parallel_source:
            text = parallel_source_table(parallel_source_rates(shards, masters_only, args), n, args)
            print(text)
            if args.append:
                append_parallel_section(args.append, text, command)
            return
        rows = measure(shards, masters_only, args)
    text = summarize(rows, n, args)
    print(text)
    if args.append:
        append_results(args.append, text, "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))


if __name__ == "__main__":
    main()
