"""`python -m shards pack`: splits table + images → WebDataset tar shards + manifest.

Flow: read and validate the splits table; index the sources; plan the order
(folder images in table order, then archive members in archive order); a pool
reads/checks/encodes images while this process appends samples to each split's
current shard in that order and rolls over at ``--shard-size-mb``. Each finished
shard is renamed into place, gets its DALI index, and is recorded in the journal,
so a killed pack resumes where it stopped and ends with the same shards.

``--out`` may be a URL (``s3://bucket/prefix``, through shards.remote): each shard is then
written to a local staging folder, uploaded with its index (one PUT each: an object appears
whole or not at all) and deleted locally; the journal is an object beside them
(shards.pack_journal) and manifest.json is put last. The staging folder
(``$TMPDIR/cxr-pack-<hash of the URL>``) holds at most one shard per split at a time, and
its lock keeps two packs on one machine from writing one URL (nothing locks across machines:
run one pack per URL). ``--resize N`` then derives ``OUT/resN/`` the same way (shards.derive), staged
in ``STAGE/resN/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, cast

from cxrbase.atomic import atomic_write, remove_stale_temps
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS, META_FIELDS, UNKNOWN
from cxrbase.lock import FolderLock
from cxrbase.progress import progress
from shards import remote
from shards.dali_index import write_index
from shards.datasets.harmonise import label_mapping
from shards.image_codec import CODEC_EXT, GREY16, Prepared, prepare_image
from shards.manifest import FORMAT, manifest_warnings, package_version, write_manifest
from shards.pack_journal import Journal
from shards.records import (
    SPLITS,
    Record,
    meta_stats,
    read_splits,
    resolve_uncertain,
    sample_members,
    split_summary,
)
from shards.sources import Sources, iter_archive, scan_sources
from shards.tar_writer import TarStream, end_bytes, member_bytes
from shards.workers import process_pool

LOCK_NAME = ".pack.lock"


def run(args: Any) -> int:
    """CLI entry: pack, print the summary; non-zero (via CxrError) on missing/rejected images."""
    pack(
        args.splits,
        args.images,
        args.out,
        codec=args.codec,
        quality=args.quality,
        resize=args.resize,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers,
        allow_missing=args.allow_missing,
        allow_rejects=args.allow_rejects,
        grey16=args.grey16,
        uncertain=getattr(args, "uncertain", "ignore"),
    )
    return 0


def pack(
    splits: Any,
    images: Sequence[str | Path],
    out: str | Path,
    codec: str = "png",
    quality: int = 95,
    resize: int | None = None,
    shard_size_mb: float = 1000,
    workers: int | None = None,
    allow_missing: bool = False,
    allow_rejects: bool = False,
    grey16: str | None = None,
    uncertain: str = "ignore",
) -> dict[str, Any]:
    """Pack the images listed in ``splits`` (path or DataFrame) into shards under ``out``.

    Returns the manifest (docs/shards-format.md). Raises CxrError on missing images
    (unless allow_missing), duplicate ids, or — after writing the manifest — on
    rejected images (unless allow_rejects). ``resize`` also writes ``out/res{N}``.
    ``grey16``: "reject" or "minmax" for 16-bit grey PNGs (None: minmax for a PadChest table).
    ``uncertain`` resolves the table's -1 labels: ignore (masked, `.labels` 255), zeros or ones;
    missing table cells are unknown (masked) whatever the policy. Recorded in the manifest.
    """
    _check_options(codec, quality, resize, shard_size_mb, grey16)
    records, splits_file, splits_sha = read_splits(splits)
    mapping = label_mapping(splits)  # the harmonisation rows of a shards.datasets table, else None
    grey16 = grey16 or ("minmax" if mapping and "padchest" in mapping["datasets"] else "reject")
    relative = [r.image for r in records if "/" in r.image]
    sources = scan_sources(images, relative, walk=len(relative) < len(records))
    records = resolve_uncertain(records, uncertain)
    out = cast(Path, remote.location(out))  # a Path, or a UPath (same interface) for a URL
    settings = {
        "format": FORMAT,
        "splits_sha256": splits_sha,
        "codec": codec,
        "quality": quality if codec == "jpeg" else None,
        "shard_size_mb": shard_size_mb,
        "source": sources.describe(),
        **({"grey16": grey16} if grey16 != "reject" else {}),  # old journals resume unchanged
        "uncertain": uncertain,
    }
    workers = workers or os.cpu_count() or 1
    with _exclusive(out) as stage:
        journal = Journal(out, settings)
        packer = _Packer(out, stage, journal, codec, quality, int(shard_size_mb * 1e6), workers, grey16)
        stats = packer.run(records, sources, allow_missing)
        manifest = _manifest(records, journal, stats, settings, splits_file)
        if mapping:
            manifest["label_mapping"] = mapping
        if grey16 != "reject":
            manifest["grey16"] = grey16
        write_manifest(out, manifest)
        print(stats.summary(out, journal), flush=True)
        for warning in manifest_warnings(manifest, out / "manifest.json"):
            print(f"warning: {warning}", file=sys.stderr)
        if resize:
            from shards.derive import derive_resized  # noqa: PLC0415 — only with --resize

            derive_resized(out, manifest, resize, workers, stage)
    if manifest["rejected"] and not allow_rejects:
        first = "; ".join(f"{r['image']}: {r['reason']}" for r in manifest["rejected"][:3])
        raise CxrError(
            f"{out / 'manifest.json'}: {len(manifest['rejected'])} images rejected ({first}) "
            "— they are listed under 'rejected'; fix them or pass --allow-rejects"
        )
    return manifest


def _check_options(
    codec: str, quality: int, resize: int | None, shard_size_mb: float, grey16: str | None = None
) -> None:
    if grey16 not in (None, *GREY16):
        raise CxrError(f"--grey16 {grey16}: unknown — choose one of {list(GREY16)}")
    if codec not in CODEC_EXT:
        raise CxrError(f"--codec {codec}: unknown — choose one of {sorted(CODEC_EXT)}")
    if not 1 <= quality <= 100:
        raise CxrError(f"--quality {quality}: out of range — use 1..100")
    if resize is not None and resize < 8:
        raise CxrError(f"--resize {resize}: too small — use a side of at least 8 pixels")
    if shard_size_mb <= 0:
        raise CxrError(f"--shard-size-mb {shard_size_mb}: must be positive")


def staging_dir(out: Any) -> Path:
    """Where shards are written before upload: OUT itself for a local folder; for a URL a local folder
    named by the URL's hash (the same on every re-run, so its lock and clean-up apply)."""
    if not remote.is_url(out):
        return Path(out)
    tag = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return Path(os.environ.get("CXR_PACK_STAGING") or tempfile.gettempdir()) / f"cxr-pack-{tag}"


@contextlib.contextmanager
def _exclusive(out: Any) -> Iterator[Path]:
    """Hold STAGE/.pack.lock (cxrbase.lock, which names its holder) so two packs never write one
    folder (or, on one machine, one URL); then clear stale temp files. Yields the staging folder."""
    stage = staging_dir(out)
    if remote.is_url(out):
        stage.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(
        stage,
        stage / LOCK_NAME,
        busy="another pack ({who}) is writing to this folder — wait for it or use another --out",
        unwritable=None,
    )
    with lock:
        if lock.stale:
            print(f"warning: {lock.stale}", file=sys.stderr)
        remove_stale_temps(stage)  # a killed run's temp files; safe under the lock
        yield stage


@dataclass
class _RunStats:
    images: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rejected: list[dict[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self, out: Path, journal: Journal) -> str:
        total_bytes = sum(e["bytes"] for e in journal.entries)
        converted = sum(len(e["converted"]) for e in journal.entries)
        rate = max(self.seconds, 1e-9)
        return (
            f"pack: {self.images} images in {self.seconds:.1f} s ({self.images / rate:.0f} images/s, "
            f"{self.bytes_in / rate / 1e6:.0f} MB/s read), {self.skipped} already packed; "
            f"{len(journal.entries)} shards, {total_bytes / 1e9:.2f} GB; rejected {len(self.rejected)}, "
            f"missing {len(self.missing)}, converted {converted} → {out}"
        )


class _SplitWriter:
    """Appends one split's samples to its current shard; rolls over at the size limit."""

    def __init__(self, out: Any, stage: Path, split: str, journal: Journal, limit: int):
        self.out, self.stage, self.split, self.journal, self.limit = out, stage, split, journal, limit
        self.index = journal.shard_count(split)
        self._stack: contextlib.ExitStack | None = None
        self._reset()

    def _reset(self) -> None:
        self.stream: TarStream | None = None
        self.keys: list[str] = []
        self.converted: list[dict[str, str]] = []
        self.sizes: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def add(self, prepared: Prepared, members: list[tuple[str, bytes]]) -> int:
        """Write one sample; return the bytes it took."""
        size = sum(member_bytes(len(data)) for _, data in members)
        if self.stream is not None and self.stream.offset + size + end_bytes() > self.limit:
            self._finish()
        if self.stream is None:
            self._stack = contextlib.ExitStack()
            self.stream = TarStream(self._stack.enter_context(atomic_write(self.stage / f"{self.name}.tar")))
        try:
            self.stream.add_sample(members)
        except OSError as err:  # ENOSPC from writev names no file: name the shard for the CLI
            if err.filename is None:
                err.filename = str(self.stage / f"{self.name}.tar")
            raise
        self.keys.append(prepared.key)
        self.sizes[f"{prepared.width}x{prepared.height}"] += 1
        if prepared.from_mode:
            self.converted.append({"image": prepared.key, "from_mode": prepared.from_mode})
        return size

    def _finish(self) -> None:
        assert self.stream is not None and self._stack is not None  # a shard is open
        sha = self.stream.finish()
        self._stack.close()  # fsync + rename to the final name
        write_index(self.stage / f"{self.name}.idx", self.stream.members)
        if self.stage != self.out:  # a URL: upload (one PUT per object), then free the staging space
            for name in (f"{self.name}.tar", f"{self.name}.idx"):
                remote.put_file(self.stage / name, self.out / name)
                (self.stage / name).unlink()
        self.journal.add(
            {
                "name": f"{self.name}.tar",
                "split": self.split,
                "index": f"{self.name}.idx",
                "samples": len(self.keys),
                "bytes": self.stream.offset,
                "sha256": sha,
                "keys": self.keys,
                "converted": self.converted,
                "sizes": dict(self.sizes),
            }
        )
        self.index += 1
        self._stack = None
        self._reset()

    def close(self) -> None:
        if self.stream is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (its temp file is removed; nothing gets a final name)."""
        if self.stream is not None:
            self.stream.close()
        if self._stack is not None:
            err = RuntimeError("pack aborted")
            self._stack.__exit__(type(err), err, None)
            self._stack = None


class _Packer:
    def __init__(
        self,
        out: Any,
        stage: Path,
        journal: Journal,
        codec: str,
        quality: int,
        limit: int,
        workers: int,
        grey16: str = "reject",
    ):
        self.out, self.stage, self.journal, self.codec, self.quality = out, stage, journal, codec, quality
        self.limit, self.workers, self.grey16 = limit, workers, grey16

    def run(self, records: list[Record], sources: Sources, allow_missing: bool) -> _RunStats:
        stats = _RunStats()
        done = self.journal.done_keys()
        stats.skipped = len(done)
        if not allow_missing:  # every missing image is known before any image is read or written
            present = set(sources.files) | (list_archives(sources) if sources.archives else set())
            _check_missing([r.key for r in records if r.key not in present], allow_missing, sources)
        by_key = {r.key: r for r in records}
        writers = {split: _SplitWriter(self.out, self.stage, split, self.journal, self.limit) for split in SPLITS}
        found: dict[str, str] = {}
        tasks = _plan(records, sources, done, found)
        work = partial(prepare_image, codec=self.codec, quality=self.quality, grey16=self.grey16)
        start = time.perf_counter()
        try:
            with (
                _executor(self.codec, self.workers) as pool,
                progress(total=len(by_key.keys() - done), unit="img", desc="pack", mininterval=0.5) as bar,
            ):
                for prepared in _ordered(pool, work, tasks, ahead=4 * self.workers + 4):
                    bar.update(1)
                    stats.images += 1
                    stats.bytes_in += prepared.bytes_in
                    if prepared.reason is not None:
                        stats.rejected.append({"image": prepared.key, "reason": prepared.reason})
                        continue
                    assert prepared.ext is not None and prepared.data is not None  # not rejected
                    members = sample_members(by_key[prepared.key], prepared.ext, prepared.data)
                    stats.bytes_out += writers[by_key[prepared.key].split].add(prepared, members)
            stats.images -= len(stats.rejected)
            stats.missing = [r.key for r in records if r.key not in found]
            _check_missing(stats.missing, allow_missing, sources)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        stats.seconds = time.perf_counter() - start
        return stats


def list_archives(sources: Sources) -> set[str]:
    """Keys of the PNG members of the archives: one decompression pass without reading any image
    (~10-20 s per 4 GB NIH archive), so that a partial download, or an id in two places, fails in
    seconds rather than after every present image was packed."""
    seen: dict[str, str] = {}
    with progress(total=len(sources.archives), unit="archive", desc="pack: listing archives") as bar:
        for archive in sources.archives:
            for key, name, _ in iter_archive(archive, lambda key: False):
                previous = seen.get(key) or (str(sources.files[key]) if key in sources.files else None)
                if previous:
                    raise CxrError(
                        f"{archive}:{name}: duplicate image id {key!r}, also at {previous} "
                        "— pass each image once (remove the extra copy or source)"
                    )
                seen[key] = f"{archive}:{name}"
            bar.update(1)
    return set(seen)


def _check_missing(missing: list[str], allow_missing: bool, sources: Sources) -> None:
    if missing and not allow_missing:
        where = " ".join(sources.describe())
        raise CxrError(
            f"{where}: {len(missing)} images listed in the splits table are absent "
            f"(first: {', '.join(missing[:5])}) — for a partial download, split only what you have: "
            f"`cxr-shards split --metadata CSV --scheme SCHEME --restrict-to {where} --out NEW.parquet`, "
            "then pack with --splits NEW.parquet; or add the images, or pass --allow-missing to "
            "record them in the manifest (the splits then lose those images' labels)"
        )


def _plan(
    records: list[Record], sources: Sources, done: set[str], found: dict[str, str]
) -> Iterator[tuple[str, Path | bytes]]:
    """(key, path or bytes) in packing order; fills ``found`` (key → where) as it goes.

    Folder images come first in splits-table order, then archive members in archive
    order. CxrError when one id appears in two places.
    """
    for rec in records:
        path = sources.files.get(rec.key)
        if path is not None:
            found[rec.key] = str(path)
            if rec.key not in done:
                yield rec.key, path
    wanted = {r.key for r in records}
    seen: dict[str, str] = {}
    for archive in sources.archives:

        def want(key: str) -> bool:
            return key in wanted and key not in done and key not in sources.files and key not in seen

        for key, name, data in iter_archive(archive, want):
            where = f"{archive}:{name}"
            previous = seen.get(key) or (str(sources.files[key]) if key in sources.files else None)
            if previous:
                raise CxrError(
                    f"{where}: duplicate image id {key!r}, also at {previous} "
                    "— pass each image once (remove the extra copy or source)"
                )
            seen[key] = where
            if key in wanted:
                found[key] = where
            if data is not None:
                yield key, data


def _executor(codec: str, workers: int) -> Executor:
    if codec == "png":
        # passthrough is file reads + zlib.crc32, both release the GIL: threads share the
        # bytes with the writer, where processes would copy every image through a pipe
        return ThreadPoolExecutor(workers)
    # re-encoding is CPU-bound Python/PIL work; spawn avoids forking tqdm's monitor thread
    return process_pool(workers)


def _ordered(pool: Executor, fn: Callable[..., Prepared], tasks: Iterable[tuple], ahead: int) -> Iterator[Prepared]:
    """pool.map with at most ``ahead`` tasks in flight (bounded memory), results in task order."""
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(fn, *task))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _manifest(
    records: list[Record], journal: Journal, stats: _RunStats, settings: dict[str, Any], splits_file: str | None
) -> dict[str, Any]:
    entries = sorted(journal.entries, key=lambda e: (SPLITS.index(e["split"]), e["name"]))
    packed = journal.done_keys()
    packed_records = [r for r in records if r.key in packed]
    sizes: Counter[str] = Counter()
    for entry in entries:
        sizes.update(entry["sizes"])
    return {
        "format": FORMAT,
        "package_version": package_version(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "codec": settings["codec"],
        "quality": settings["quality"],
        "resolution": None,
        "derived": False,
        "source": settings["source"],
        "splits_file": splits_file,
        "splits_sha256": settings["splits_sha256"],
        "labels": list(records[0].names if records else LABELS),
        "uncertain": settings["uncertain"],
        "unknown_labels": sum(y == UNKNOWN for r in packed_records for y in r.labels),
        "meta_fields": list(META_FIELDS),
        "meta_stats": meta_stats(packed_records),
        "splits": split_summary(packed_records, Counter(e["split"] for e in entries)),
        "shards": [{k: e[k] for k in ("name", "split", "samples", "bytes", "sha256", "index")} for e in entries],
        "image_sizes": dict(sorted(sizes.items())),
        "missing": sorted(stats.missing),
        "rejected": sorted(stats.rejected, key=lambda r: r["image"]),
        "converted": sorted((c for e in entries for c in e["converted"]), key=lambda c: c["image"]),
    }
