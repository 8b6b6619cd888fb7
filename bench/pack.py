"""Packing throughput per codec vs `cat` of the same files, measured side by side.

The real NIH sample PNGs (130, 6 of them RGBA) are copied under new names to
--copies × 130 files, read once to warm the page cache, then:
  cat     `cat FILES > /dev/null` in a subprocess (best of 3)
  png     passthrough pack of all files, and of the grey-only files
  jpeg    re-encode (quality 95)
  ljpeg   lossless JPEG re-encode (libjpeg-turbo via imagecodecs, predictor 1)
  j2k     lossless JPEG 2000 re-encode (on --j2k-images files: it is slow)
Shards go to --out (default: a tmpfs under /dev/shm when present, so disk write
bandwidth and fsync latency are not what is measured). A second table gives the
encoder alone per codec in images per CPU-second of this process (one thread), which
a loaded shared machine disturbs far less than wall time. Prints images/s, MB/s
(of input PNG bytes), the ratio to cat, and stored bytes per image; with
--append, adds the results and the command to bench/RESULTS.md (section "pack").

    python bench/pack.py --copies 3 --append
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from cxrbase.labels import LABELS
from shards.pack import pack

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("CXR_NIH", ROOT.parent / "shared" / "data" / "nih")) / "sample"


def replicate(work: Path, copies: int) -> tuple[pd.DataFrame, list[Path]]:
    """Copy the sample PNGs under new ids; return (splits table, files)."""
    csv = pd.read_csv(SAMPLE / "labels.csv")
    folder = work / "images"
    folder.mkdir()
    rows, files = [], []
    for copy in range(copies):
        for i, row in csv.iterrows():
            key = f"{90000000 + i:08d}_{copy:03d}"
            target = folder / f"{key}.png"
            shutil.copyfile(SAMPLE / row["Image Index"], target)
            files.append(target)
            findings = row["Finding Labels"].split("|")
            rows.append(
                {
                    "image": target.name,
                    "patient": 90000000 + i,
                    "split": "train",
                    **{name: int(name in findings) for name in LABELS},
                    "age": row["Patient Age"],
                    "sex": row["Patient Gender"],
                    "view": row["View Position"],
                    "mode": row["png_mode"],
                }
            )
    return pd.DataFrame(rows), files


def time_cat(files: list[Path]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pack's worker pool is joined before it returns)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_pack(table: pd.DataFrame, folder: Path, out: Path, codec: str, workers: int) -> tuple[float, int, float]:
    """Wall time of one fresh pack, the bytes of its shards, and its CPU seconds (all processes)."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    manifest = pack(table.drop(columns="mode"), [folder], out, codec=codec, workers=workers, allow_missing=True)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return seconds, sum(s["bytes"] for s in manifest["shards"]), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3, help="copies of the 130 sample PNGs (default 3)")
    parser.add_argument("--j2k-images", type=int, default=40, help="images for the slow j2k run (default 40)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pack workers (default CPU count)")
    parser.add_argument(
        "--out",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where shards are written (default /dev/shm)",
    )
    parser.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp,
        tempfile.TemporaryDirectory(prefix="bench-pack-out-", dir=args.out) as out_root,
    ):
        table, files = replicate(Path(tmp), args.copies)
        folder, out = Path(tmp) / "images", Path(out_root) / "shards"
        grey = table["mode"] == "L"
        runs = {  # name → (rows, codec)
            "png passthrough (all, incl. RGBA→L)": (table, "png"),
            "png passthrough (grey files only)": (table[grey], "png"),
            "jpeg q95 re-encode": (table, "jpeg"),
            "ljpeg lossless re-encode": (table, "ljpeg"),
            "j2k lossless re-encode": (table.iloc[: args.j2k_images], "j2k"),
        }
        rows = []
        time_cat(files)  # warm the page cache
        for name, (part, codec) in runs.items():
            part_files = [folder / image for image in part["image"]]
            cat_s = time_cat(part_files)
            pack_s, stored, cpu_s = time_pack(part, folder, out, codec, args.workers)
            mb = sum(f.stat().st_size for f in part_files) / 1e6
            rows.append(
                (
                    name,
                    len(part),
                    mb / cat_s,
                    len(part) / pack_s,
                    mb / pack_s,
                    cat_s / pack_s,
                    stored / len(part) / 1e3,
                    len(part) / cpu_s,
                )
            )
        cpu_rows = encode_cpu_rates(files[: len(table) // args.copies], args.j2k_images)
    report(rows, args, cpu_rows)


def encode_cpu_rates(files: list[Path], j2k_images: int) -> list[tuple[str, int, float, float]]:
    """(codec, images, images per CPU-second of the encoder alone, kB/image) on the decoded grey images."""
    from shards.image_codec import check_png, encode, grey_policy

    images = [grey_policy(data, check_png(data))[0] for data in (f.read_bytes() for f in files)]
    rows = []
    for codec in ("png", "ljpeg", "j2k", "jpeg"):
        part = images[:j2k_images] if codec == "j2k" else images
        start = time.process_time()
        sizes = [len(encode(im, codec)) for im in part]
        rows.append((codec, len(part), len(part) / (time.process_time() - start), sum(sizes) / len(part) / 1e3))
    return rows


def report(rows: list[tuple], args: argparse.Namespace, cpu_rows: list[tuple] = ()) -> None:
    header = (
        "| run | images | cat MB/s | pack images/s | pack MB/s | pack / cat | stored kB/image | "
        "pack images per CPU-second |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {n} | {k} | {c:.0f} | {ips:.1f} | {mbs:.0f} | {r:.3f} | {kb:.0f} | {cps:.1f} |"
        for n, k, c, ips, mbs, r, kb, cps in rows
    ]
    if cpu_rows:
        lines += [
            "",
            "encoder alone, one thread (png: zlib level 6 re-encode — pack passes grey PNGs through and re-encodes only "
            "converted RGBA files, at level 1; jpeg q95):",
            "",
            "| codec | images | encode images per CPU-second | kB/image |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c} | {k} | {r:.1f} | {kb:.0f} |" for c, k, r, kb in cpu_rows]
    text = "\n".join(lines)
    print(text)
    if args.append:
        command = "python bench/pack.py " + " ".join(sys.argv[1:])
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        entry = (
            f"\n### {time.strftime('%Y-%m-%d %H:%M')} — `{command}`\n\n"
            f"{os.cpu_count()} CPUs (load average {load}, shared), workers {args.workers}, "
            f"shards written to {args.out or 'a temp dir'}; "
            "MB/s of input PNG bytes; pack / cat = cat time ÷ pack time on the same files; CPU-seconds "
            "count all processes (pool start-up included).\n\n"
            f"{text}\n\n"
        )
        append_section(ROOT / "bench" / "RESULTS.md", "## pack", entry)


def append_section(path: Path, heading: str, entry: str) -> None:
    """Append ``entry`` at the end of the ``heading`` section (created if absent); other sections untouched."""
    from cxrbase.atomic import atomic_write_text

    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if heading not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    start = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(start) if line.rstrip("\n") == heading)
    end = next((i for i in range(at + 1, len(start)) if start[i].startswith("## ")), len(start))
    start[end:end] = [entry if entry.endswith("\n") else entry + "\n"]
    atomic_write_text(path, "".join(start))


if __name__ == "__main__":
    main()
