"""`python -m shards verify DIR`: re-read every shard and check it against the manifest.

Per shard (in parallel): size and sha256, the DALI index, five members per sample,
each member's crc32 equals the `.json`'s (format /2), every image decodes to one
grey channel (of the stated resolution for derived shards), `.labels`/`.meta`/`.id`
equal what the `.json` says. Across shards: no key twice, no patient in two splits,
per-split samples/patients/positives and train age statistics equal the manifest,
no shard key also listed as missing or rejected, no unlisted tar.
With ``--against SRC`` every decoded image is also compared with its source (folders or NIH
archives, as pack reads them); with ``--splits TABLE`` too, the sources are the table's paths relative
to SRC (the layouts of ``split --dataset``: JPEG, DICOM and 16-bit PNG sources, as pack made them grey).

DIR may be a URL (``s3://bucket/prefix``, ``https://host/prefix``; shards.remote): each shard is
streamed once — hashed, indexed and its samples checked in the same pass — and nothing is kept on disk.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrbase.errors import CxrError
from cxrbase.labels import LABELS
from cxrbase.progress import progress
from shards import remote
from shards.dali_index import Member, group_members, index_text, split_name
from shards.image_codec import (
    CODEC_EXT,
    PNG_SIGNATURE,
    RESAMPLE,
    BadImage,
    check_png,
    decode_grey,
    grey_policy,
    source_grey,
)
from shards.manifest import has_checksums, load_manifest
from shards.pack_journal import HashingReader
from shards.records import CRC_FIELD, checksum_problem, id_bytes, image_key, labels_bytes, meta_vector, read_splits
from shards.sources import Sources, iter_archive, scan_sources
from shards.workers import process_pool

_REPORT_LINES = 50
JPEG_TOLERANCE = 2.0  # --against: mean |Δ| in grey levels allowed for jpeg (q95 on NIH images: 0.6, at most 0.9)


@dataclass
class Report:
    """What verify found: failures as 'where: what' lines (empty = all good)."""

    failures: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def run(args: Any) -> int:
    """CLI entry: 0 when every check holds, else print the failures and return 1."""
    report = verify(
        args.dir, workers=args.workers, against=getattr(args, "against", None), splits=getattr(args, "splits", None)
    )
    for line in report.failures[:_REPORT_LINES]:
        print(f"FAIL {line}")
    if len(report.failures) > _REPORT_LINES:
        print(f"… and {len(report.failures) - _REPORT_LINES} more failures")
    status = "OK" if report.ok else f"FAILED ({len(report.failures)} problems)"
    print(
        f"verify: {report.samples} samples in {report.shards} shards checked in {report.seconds:.1f} s "
        f"({report.samples / max(report.seconds, 1e-9):.0f} samples/s): {status} — {args.dir}",
        flush=True,
    )
    return 0 if report.ok else 1


def verify(
    directory: str | Path,
    workers: int | None = None,
    against: list[str | Path] | None = None,
    splits: str | Path | None = None,
) -> Report:
    """Check every shard of ``directory`` against its manifest; return the Report.

    ``against``: folders of the sources; every image must then equal its source's
    pixels (after the grey policy, and the Lanczos resize for derived shards).
    ``splits``: the split table pack read; its image paths relative to ``against``'s folders name
    the sources (as pack finds them), else sources are found by file name.
    """
    directory = remote.location(directory)
    manifest = load_manifest(directory)
    if splits is not None and not against:
        raise CxrError(f"--splits {splits}: only used with --against — add --against ROOT (pack's --images)")
    if against and splits is None and manifest.get("label_mapping"):  # keys are digests of relative paths
        raise CxrError(
            f"{directory}: packed from a `split --dataset` table, whose sources are found by their paths — "
            "add --splits TABLE (the table given to pack --splits)"
        )
    scanned = _scan_against(against, splits) if against else None
    grey16 = manifest.get("grey16", "reject")
    # folder PNGs are compared inside each shard's check; archive members after it, as they stream
    sources = None if scanned is None else {key: str(path) for key, path in scanned.files.items()}
    in_archives = bool(scanned and scanned.archives)
    report, start = Report(shards=len(manifest["shards"])), time.perf_counter()
    samples: dict[str, list[tuple[str, dict]]] = defaultdict(list)  # key → [(shard, json)]
    with (
        process_pool(workers or os.cpu_count() or 1) as pool,
        progress(
            total=sum(s["samples"] for s in manifest["shards"]), unit="img", desc="verify", mininterval=0.5
        ) as bar,
    ):
        futures = {
            pool.submit(
                check_shard,
                str(directory),
                entry,
                manifest["codec"],
                manifest["resolution"],
                sources,
                has_checksums(manifest),
                _labels(manifest),
                in_archives,
                grey16,
            ): entry
            for entry in manifest["shards"]
        }
        for future in as_completed(futures):
            failures, records = future.result()
            report.failures += failures
            for key, record in records:
                samples[key].append((futures[future]["name"], record))
            bar.update(futures[future]["samples"])
        if in_archives and scanned is not None:
            report.failures += _compare_with_archives(directory, manifest, scanned, pool)
    report.samples = len(samples)
    report.failures += _check_totals(directory, manifest, samples)
    report.seconds = time.perf_counter() - start
    return report


def _scan_against(against: list[str | Path], splits: str | Path | None = None) -> Sources:
    for raw in against:
        if not Path(raw).exists():
            raise CxrError(
                f"{raw}: --against source does not exist — pass the folders or archives given to pack --images"
            )
    if splits is None:
        return scan_sources(against)
    records, _, _ = read_splits(splits)
    relative = [r.image for r in records if "/" in r.image]  # as pack finds them
    return scan_sources(against, relative, walk=len(relative) < len(records))


def _compare_with_archives(directory: Any, manifest: dict, scanned: Sources, pool: Any) -> list[str]:
    """Compare the images of keys not in --against's folders with their archive members: each archive
    is streamed once (as pack reads it), each wanted member compared in the pool with the shard's
    image, read at its offset in the uncompressed shard tar."""
    where: dict[str, tuple[str, int, int]] = {}  # key → (shard path, data offset, size)
    ext = "." + CODEC_EXT[manifest["codec"]]
    for entry in manifest["shards"]:
        path = directory / entry["name"]
        try:
            with remote.open_read(path) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(ext):
                        where[member.name[: -len(ext)]] = (str(path), member.offset_data, member.size)
        except (tarfile.TarError, OSError):
            continue  # the shard's own check reports it
    wanted = {key for key in where if key not in scanned.files}
    failures, found, pending = [], set(), []
    for archive in scanned.archives:
        for key, name, raw in iter_archive(archive, lambda k: k in wanted and k not in found):
            if raw is None:
                continue
            found.add(key)
            pending.append(
                pool.submit(
                    _compare_member,
                    key,
                    where[key],
                    raw,
                    manifest["codec"],
                    manifest["resolution"],
                    f"{archive}:{name}",
                )
            )
            if len(pending) >= 64:  # bounded memory: at most 64 source images in flight
                failures += pending.pop(0).result()
    for future in pending:
        failures += future.result()
    failures += [
        f"{remote.location(where[k][0]).name}: {k}: no source image of this key in --against"
        for k in sorted(wanted - found)
    ]
    return failures


def _compare_member(
    key: str, at: tuple[str, int, int], raw: bytes, codec: str, resolution: int | None, source: str
) -> list[str]:
    path, offset, size = at
    reader = remote.RangeReader(path)
    try:
        data = reader.pread(size, offset)
    finally:
        reader.close()
    name = remote.location(path).name
    return [f"{name}: {key}: {p}" for p in _differs_from_source(key, data, codec, resolution, source, raw)]


def check_shard(
    directory: str,
    entry: dict[str, Any],
    codec: str,
    resolution: int | None,
    sources: Mapping[str, str] | None = None,
    checksums: bool = False,
    labels: tuple[str, ...] = LABELS,
    more_sources: bool = False,
    grey16: str = "reject",
) -> tuple[list[str], list[tuple[str, dict]]]:
    """Check one shard; return (failures, [(key, json record)]) of its samples.

    ``sources`` (key → source PNG path): also compare each image's pixels with its source.
    ``checksums``: the shard's .json records hold per-member crc32s (format /2).
    ``more_sources``: keys not in ``sources`` are compared later (archives), not reported here.
    """
    folder = remote.location(directory)
    tar_path, name = folder / entry["name"], entry["name"]
    if not remote.is_file(tar_path):
        return [f"{name}: shard file is missing"], []
    failures = []
    with remote.open_read(tar_path) as fh:
        stream = HashingReader(fh)
        try:
            groups, index_members = _read_samples(stream)
        except (tarfile.TarError, OSError) as err:
            groups, unreadable = None, f"{name}: unreadable tar ({err})"
        size, sha = stream.drain()
    if size != entry["bytes"] or sha != entry["sha256"]:
        failures.append(f"{name}: size/sha256 differ from the manifest (corrupt or replaced shard)")
    index_path = folder / entry["index"]
    if groups is None:
        return failures + [unreadable], []
    if not remote.is_file(index_path) or remote.read_text(index_path) != index_text(index_members):
        failures.append(f"{entry['index']}: DALI index missing or not matching {name}")
    records = []
    for key, members in groups:
        problems, record = _check_sample(
            key, members, CODEC_EXT[codec], entry["split"], resolution, codec, checksums, labels
        )
        if sources is not None and not problems and (key in sources or not more_sources):
            problems = _differs_from_source(
                key, members[CODEC_EXT[codec]], codec, resolution, sources.get(key), grey16=grey16
            )
        failures += [f"{name}: {key}: {p}" for p in problems]
        if record is not None:
            records.append((key, record))
    if len(groups) != entry["samples"]:
        failures.append(f"{name}: {len(groups)} samples, manifest says {entry['samples']}")
    return failures, records


def _read_samples(stream: Any) -> tuple[list[tuple[str, dict[str, bytes]]], list[list[Member]]]:
    """([(key, {ext: data})] in tar order — a key seen again later becomes its own group —, the
    members grouped as the DALI index lists them), from one sequential pass over a tar stream."""
    groups: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:

        def take(info: tarfile.TarInfo) -> None:
            base, ext = split_name(info.name)
            if not groups or groups[-1][0] != base:
                groups.append((base, {}))
            groups[-1][1][ext] = (tar.extractfile(info) or io.BytesIO()).read() if info.isreg() else b""

        members = group_members(tar, take)
    return groups, members


def _check_sample(
    key: str,
    members: dict[str, bytes],
    image_ext: str,
    split: str,
    resolution: int | None,
    codec: str | None = None,
    checksums: bool = False,
    labels: tuple[str, ...] = LABELS,
) -> tuple[list[str], dict | None]:
    expected = {image_ext, "labels", "meta", "id", "json"}
    if set(members) != expected:
        return [f"members {sorted(members)}, expected {sorted(expected)}"], None
    problems = []
    try:
        image = decode_grey(members[image_ext], codec)
        if image.mode != "L":
            problems.append(f"image decodes to mode {image.mode}, expected L (one grey channel)")
        if resolution is not None and image.size != (resolution, resolution):
            problems.append(f"image is {image.size[0]}x{image.size[1]}, expected {resolution}x{resolution}")
    except BadImage as err:
        problems.append(str(err))
    try:
        record = json.loads(members["json"])
        if checksums:  # the loaders' check, on all four members
            crc = checksum_problem(record.get(CRC_FIELD), {e: members[e] for e in (image_ext, "labels", "meta", "id")})
            problems += [crc] if crc else []
        problems += _json_mismatches(key, record, members, split, labels)
    except (ValueError, KeyError, TypeError) as err:
        return problems + [f"unreadable .json ({err})"], None
    return problems, record


def _differs_from_source(
    key: str,
    data: bytes,
    codec: str,
    resolution: int | None,
    source: str | None,
    raw: bytes | None = None,
    grey16: str = "reject",
) -> list[str]:
    """[] when the decoded image equals its source's grey pixels (within JPEG_TOLERANCE for jpeg);
    ``raw``: the source's bytes when it is an archive member (``source`` then names it). A PNG goes
    through the grey policy (``grey16`` as the manifest records it); JPEG and DICOM through
    image_codec.source_grey, the one place pack makes them grey."""
    if source is None:
        return ["no source image of this key in --against"]
    raw = Path(source).read_bytes() if raw is None else raw
    try:
        if raw[:8] == PNG_SIGNATURE:
            expected, _ = grey_policy(raw, check_png(raw), grey16)
        else:
            expected = Image.fromarray(source_grey(raw, Path(source).name))
        image = decode_grey(data, codec)
    except BadImage as err:
        return [f"source {source}: {err}"]
    if resolution is not None:
        expected = expected.resize((resolution, resolution), RESAMPLE)  # as derive.py made it
    got, want = np.asarray(image, np.int16), np.asarray(expected, np.int16)
    if got.shape != want.shape:
        return [f"image is {got.shape[1]}x{got.shape[0]}, source {source} gives {want.shape[1]}x{want.shape[0]}"]
    diff = np.abs(got - want)
    if (diff.mean() <= JPEG_TOLERANCE) if codec == "jpeg" else not diff.any():
        return []
    return [
        f"pixels differ from {source} ({np.count_nonzero(diff)} pixels, max |diff| {diff.max()}, "
        f"mean {diff.mean():.3f})"
    ]


def _labels(manifest: dict) -> tuple[str, ...]:
    """The shards' label names: the 14 NIH ones, or a generic table's (manifest ``labels``)."""
    return tuple(manifest.get("labels") or LABELS)


def _json_mismatches(
    key: str, record: dict, members: dict[str, bytes], split: str, labels: tuple[str, ...] = LABELS
) -> list[str]:
    problems = []
    if image_key(str(record["image"])) != key and Path(record["image"]).stem != key and record["image"] != key:
        problems.append(f".json image {record['image']!r} is not this key")
    if record["split"] != split:
        problems.append(f".json split {record['split']!r} in a {split} shard")
    if members["labels"] != labels_bytes(record["labels"]) or len(record["labels"]) != len(labels):
        problems.append(".labels differ from the .json labels")
    if record["findings"] != [n for n, y in zip(labels, record["labels"]) if y == 1]:
        problems.append(".json findings differ from its labels")
    if members["meta"] != meta_vector(record["age"], record["sex"], record["view"]).tobytes():
        problems.append(".meta differs from the .json age/sex/view")
    if members["id"] != id_bytes(key):
        problems.append(".id is not the NUL-padded key")
    return problems


def _patient_leaks(records: dict[str, dict]) -> list[str]:
    """One failure per patient whose samples sit in more than one split (train/val/test leakage)."""
    by_patient: dict[Any, dict[Any, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key, record in sorted(records.items()):
        by_patient[record.get("patient")][record.get("split")].append(key)
    return [
        f"patient {patient}: images in several splits ("
        + ", ".join(f"{split} {keys[:5]}" for split, keys in sorted(splits.items()))
        + ") — patient leakage; re-split with `python -m shards split` and re-pack"
        for patient, splits in sorted(by_patient.items(), key=lambda kv: str(kv[0]))
        if len(splits) > 1
    ]


def _check_totals(directory: Any, manifest: dict, samples: dict[str, list[tuple[str, dict]]]) -> list[str]:
    failures = [f"{key}: in several shards {[s for s, _ in where]}" for key, where in samples.items() if len(where) > 1]
    records = {key: where[0][1] for key, where in samples.items()}
    failures += _patient_leaks(records)
    for split, stats in manifest["splits"].items():
        mine = [r for r in records.values() if r["split"] == split]
        positives = {n: sum(r["labels"][i] == 1 for r in mine) for i, n in enumerate(_labels(manifest))}
        if len(mine) != stats["samples"] or len({r["patient"] for r in mine}) != stats["patients"]:
            failures.append(
                f"split {split}: {len(mine)} samples / {len({r['patient'] for r in mine})} patients "
                f"in shards, manifest says {stats['samples']} / {stats['patients']}"
            )
        if positives != stats["positives"]:
            failures.append(f"split {split}: positives per label differ from the manifest")
        known = {n: sum(r["labels"][i] is not None for r in mine) for i, n in enumerate(_labels(manifest))}
        if "known" in stats and known != stats["known"]:  # older manifests: every label known
            failures.append(f"split {split}: known (unmasked) labels per label differ from the manifest")
    ages = [r["age"] for r in records.values() if r["split"] == "train" and r["age"] is not None]
    mean = manifest["meta_stats"]["age_mean"]
    if ages and (mean is None or not math.isclose(sum(ages) / len(ages), mean, abs_tol=1e-4)):
        failures.append(f"meta_stats age_mean {mean} differs from the train samples' {sum(ages) / len(ages):.4f}")
    elsewhere = set(manifest["missing"]) | {r["image"] for r in manifest["rejected"]}
    failures += [f"{key}: in a shard but also listed as missing/rejected" for key in sorted(elsewhere & set(records))]
    listed = {s["name"] for s in manifest["shards"]}
    failures += [
        f"{name}: tar file not listed in the manifest"
        for name in sorted(remote.list_sizes(directory))
        if name.endswith(".tar") and name not in listed
    ]
    return failures
