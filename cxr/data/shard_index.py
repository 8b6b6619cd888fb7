"""Find the shards to read and where every sample's bytes sit inside them.

`load_shards_manifest` resolves derived shards (DIR/res{R}/) against masters;
`SplitIndex` lists one split's samples in packing order with the byte offsets of
their tar members (from the DALI `.idx` files, or a tar header scan when an index
is absent or does not match its tar); `SampleReader` reads those bytes by offset and
checks their integrity — the per-sample crc32 of format /2, or PNG chunk CRCs and
JPEG markers for /1 shards — so a corrupt sample is caught before any decoder sees it.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.errors import CxrError
from shards.labels import META_FIELDS, NUM_LABELS
from shards.manifest import has_checksums
from shards.records import CRC_FIELD, checksum_problem

log = logging.getLogger("cxr.data")

FORMATS = ("cxr-shards/1", "cxr-shards/2")  # /2: per-sample crc32 in each .json
IMAGE_EXT = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "j2k": "jp2", "jp2": "jp2", "ljpeg": "ljpeg"}
META_BYTES = 4 * len(META_FIELDS)
ID_BYTES = 32
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def load_shards_manifest(shards_dir: str | os.PathLike, resolution: int) -> tuple[Path, dict]:
    """Resolve the shards to read at `resolution`: DIR/res{R}/ when packed, else DIR.

    Returns (folder used, its parsed manifest.json). Logs which one was chosen.
    """
    root = Path(shards_dir)
    derived = root / f"res{resolution}" / "manifest.json"
    if derived.is_file():
        log.info("shards: using derived %dpx shards %s (no resize of masters)", resolution, derived.parent)
        return derived.parent, _read_manifest(derived)
    path = root / "manifest.json"
    if not path.is_file():
        raise CxrError(f"{path}: shards manifest not found — pack shards first "
                       f"(python -m shards pack --splits … --images … --out {root})")
    manifest = _read_manifest(path)
    native = manifest.get("resolution")
    if native != resolution:
        log.info("shards: no %s; resizing %s shards from %s to %dpx", derived.parent.name,
                 f"{native}px" if native else "native", root, resolution)
    return root, manifest


def image_source(shards_dir: str | os.PathLike, resolution: int) -> dict:
    """What a run at ``resolution`` reads, for meta.json and train.log: derived ``resN/`` shards,
    masters at their native size, or masters resized on the fly — with the resize filter."""
    from shards.image_codec import RESIZE_FILTER

    root = Path(shards_dir)
    if (root / f"res{resolution}" / "manifest.json").is_file():
        return {"source": f"derived {root / f'res{resolution}'}", "resize_filter": f"{RESIZE_FILTER}, at pack time"}
    try:
        native = json.loads((root / "manifest.json").read_text()).get("resolution")
    except (OSError, ValueError):
        return {"source": f"unknown (no readable {root / 'manifest.json'})", "resize_filter": None}
    if native == resolution:
        return {"source": f"masters {root} at their native {resolution} px", "resize_filter": None}
    return {"source": f"masters {root} resized on the fly to {resolution} px", "resize_filter": RESIZE_FILTER}


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CxrError(f"{path}: unreadable manifest ({err}) — re-run python -m shards pack") from err
    if manifest.get("format") not in FORMATS:
        raise CxrError(f"{path}: format {manifest.get('format')!r} is not one of {FORMATS} — re-pack with this version")
    for field in ("shards", "codec", "splits"):
        if field not in manifest:
            raise CxrError(f"{path}: manifest lacks {field!r} — re-run python -m shards pack")
    return manifest


def meta_stats(shards_dir: Path, manifest: dict) -> tuple[float, float]:
    """Train-split age mean/std (years) for z-scoring; derived shards fall back to the masters'."""
    stats = manifest.get("meta_stats") or {}
    if "age_mean" not in stats and (shards_dir.parent / "manifest.json").is_file():
        stats = _read_manifest(shards_dir.parent / "manifest.json").get("meta_stats") or {}
    if "age_mean" in stats and stats["age_mean"] is None:
        return 0.0, 1.0  # no known age in the train split (a generic table): every age z-scores to 0
    if "age_mean" not in stats or not stats.get("age_std"):
        raise CxrError(f"{shards_dir / 'manifest.json'}: no meta_stats.age_mean/age_std — re-run python -m shards pack")
    return float(stats["age_mean"]), float(stats["age_std"])


@dataclass
class SplitIndex:
    """One split's samples in packing order: keys and member byte ranges per sample."""

    shards_dir: Path
    codec: str
    shard_paths: list[Path]
    keys: list[str]
    shard: np.ndarray    # int32 [N] index into shard_paths
    ranges: np.ndarray   # int64 [N, 4, 2] (offset, size) of image, labels, meta, json
    num_labels: int = NUM_LABELS  # len(manifest["labels"]): 14 for NIH, any count for a generic table
    checksums: bool = False  # each .json holds the crc32 of the other members (format /2)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, shards_dir: Path, manifest: dict, split: str) -> "SplitIndex":
        """Index every shard of `split` listed in the manifest (errors name missing files)."""
        entries = sorted((s for s in manifest["shards"] if s.get("split") == split), key=lambda s: s["name"])
        if not entries:
            known = sorted(manifest.get("splits", {}))
            raise CxrError(f"{shards_dir / 'manifest.json'}: no shards for split {split!r} — choose one of {known}")
        codec = manifest["codec"]
        if codec not in IMAGE_EXT:
            raise CxrError(f"{shards_dir / 'manifest.json'}: unknown codec {codec!r} — expected one of {sorted(IMAGE_EXT)}")
        image_ext = IMAGE_EXT[codec]
        paths, keys, shard_ids, ranges = [], [], [], []
        for i, entry in enumerate(entries):
            tar = shards_dir / entry["name"]
            if not tar.is_file():
                raise CxrError(f"{tar}: shard listed in the manifest is missing — copy it back or re-pack")
            samples = _index_shard(tar, shards_dir / entry.get("index", tar.with_suffix(".idx").name))
            if "samples" in entry and len(samples) != entry["samples"]:
                raise CxrError(f"{tar}: holds {len(samples)} samples, manifest says {entry['samples']} — re-pack it")
            for key, members in samples:
                try:
                    ranges.append([members[image_ext], members["labels"], members["meta"], members["json"]])
                except KeyError as err:
                    raise CxrError(f"{tar}: sample {key} lacks member .{err.args[0]} — re-pack this shard") from err
                keys.append(key)
                shard_ids.append(i)
            paths.append(tar)
        return cls(shards_dir, codec, paths, keys, np.asarray(shard_ids, np.int32),
                   np.asarray(ranges, np.int64).reshape(-1, 4, 2),
                   len(manifest.get("labels") or ()) or NUM_LABELS, has_checksums(manifest))


def _index_shard(tar: Path, idx: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] in tar order, from the DALI index or a header scan.

    An index that does not match its tar (stale, edited, another shard's) is replaced
    by the scan, with a warning naming it: only the index is wrong, not the samples.
    """
    if idx.is_file():
        samples = _parse_idx(idx)
        problem = index_mismatch(tar, samples)
        if problem is None:
            return samples
        log.warning("shards: %s does not match %s (%s); rebuilding the index in memory by a tar header scan "
                    "— delete it or re-run `python -m shards verify %s`", idx, tar.name, problem, tar.parent)
    else:
        log.warning("shards: %s has no index %s; scanning tar headers (slower start)", tar, idx.name)
    samples: list[tuple[str, dict]] = []
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _, ext = Path(member.name).name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
    except tarfile.TarError as err:
        raise CxrError(f"{tar}: not a readable tar ({err}) — re-pack this shard") from err
    return samples


def index_mismatch(tar: Path, samples: list[tuple[str, dict[str, tuple[int, int]]]]) -> str | None:
    """Cheap check of an index against its tar: every member of the first and last sample must
    sit right after a tar header with its name and size, and the last one be followed by the
    end-of-archive blocks. None when it matches, else what differs.

    Two samples' headers (a few preads per shard) catch an index shifted, truncated or
    belonging to another shard; a damaged middle is caught when that sample is read.
    Members past the end of a truncated tar are not index faults: reading them reports
    the samples as truncated.
    """
    if not samples:
        return "the index lists no samples"
    file_size = tar.stat().st_size
    with open(tar, "rb") as fh:
        fd = fh.fileno()
        for key, members in {0: samples[0], len(samples) - 1: samples[-1]}.values():
            for ext, (offset, size) in members.items():
                problem = header_mismatch(fd, f"{key}.{ext}", offset, size)
                if problem:
                    return problem
        end = max(o + -(-s // 512) * 512 for o, s in samples[-1][1].values())
        if end + 1024 <= file_size and os.pread(fd, 1024, end) != bytes(1024):
            return f"more data after the last indexed sample (offset {end})"
    return None


def header_mismatch(fd: int, name: str, offset: int, size: int) -> str | None:
    """What is wrong when the 512 bytes before ``offset`` are not the tar header of ``name``
    with ``size``; None when they are, or when the file ends before them (truncated tar)."""
    header = os.pread(fd, 512, offset - 512) if offset >= 512 else b"x"
    if len(header) < 512 and offset >= 512:
        return None  # the tar is truncated: its samples are reported as such when read
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
        found_size = int(header[124:136].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        stored = found_size = -1
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # the header checksum (chksum field as spaces)
        return f"{name} at offset {offset}: no tar header before it (data instead)"
    found = Path(header[:100].rstrip(b"\0").decode("latin-1")).name
    if found != name or found_size != size:
        return f"{name} ({size} B) at offset {offset}: the tar has {found!r} ({found_size} B) there"
    return None


def _parse_idx(idx: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1."):
        raise CxrError(f"{idx}: not a DALI webdataset index — delete it (it is rebuilt by a scan) or re-pack")
    samples = []
    for line in lines[1:]:
        tok = line.split()
        if not tok:
            continue
        if len(tok) % 4:
            raise CxrError(f"{idx}: expected 'ext offset size name' groups (index v1.2) — delete the .idx or re-pack")
        members = {tok[j]: (int(tok[j + 1]), int(tok[j + 2])) for j in range(0, len(tok), 4)}
        samples.append((Path(tok[3]).name.partition(".")[0], members))
    if len(samples) != int(head[1]):
        raise CxrError(f"{idx}: header says {head[1]} samples, found {len(samples)} — re-pack this shard")
    return samples


class CorruptSample(Exception):
    """A sample whose bytes fail their integrity check or decode (shard, key, reason)."""

    def __init__(self, shard: Path, key: str, reason: str):
        super().__init__(f"{shard}: sample {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason

    def __reduce__(self):  # crosses DataLoader worker processes
        return CorruptSample, (self.shard, self.key, self.reason)

    def as_error(self) -> CxrError:
        return CxrError(f"{self.shard}: sample {self.key} is corrupt ({self.reason}) — "
                        "re-pack this shard (python -m shards verify finds all bad samples)")


class IndexMismatch(CorruptSample):
    """The index points a sample at the wrong bytes: the shard itself may be intact."""

    def __reduce__(self):
        return IndexMismatch, (self.shard, self.key, self.reason)

    def as_error(self) -> CxrError:
        return CxrError(f"{self.shard.with_suffix('.idx')}: index does not match {self.shard.name} at sample "
                        f"{self.key} ({self.reason}); the samples may be intact — delete the .idx (the loader "
                        "then scans the tar) or re-run `python -m shards verify`")


class SampleReader:
    """Reads a sample's raw members by offset; one open file per shard per process."""

    def __init__(self, index: SplitIndex):
        self.index = index
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def read(self, i: int, check_image: bool = True) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(encoded image, labels uint8 [num_labels], meta float32 [5]) of sample i; CorruptSample if bad.

        Format /2 shards: the image, labels and meta bytes must equal the crc32 their .json
        recorded at pack time (any codec, any flipped byte). /1 shards: check_image=False
        skips the PNG CRC / JPEG marker pass (for a decoder that verifies it itself).
        """
        (io, isz), (lo, lsz), (mo, msz), (jo, jsz) = self.index.ranges[i]
        fd = self._fd(int(self.index.shard[i]))
        image, labels, meta = os.pread(fd, int(isz), int(io)), os.pread(fd, int(lsz), int(lo)), os.pread(fd, int(msz), int(mo))
        if len(image) != isz:
            problem = "image truncated"
        elif self.index.checksums:
            record = os.pread(fd, int(jsz), int(jo))
            problem = ".json truncated" if len(record) != jsz else \
                _checksum_problem(record, image, labels, meta, self.index.codec)
        else:
            problem = image_problem(image, self.index.codec) if check_image else None
        if problem is None and (len(labels) != self.index.num_labels or max(labels, default=0) > 1):
            problem = f".labels is not {self.index.num_labels} bytes of 0/1"
        if problem is None and len(meta) != META_BYTES:
            problem = f".meta is not {META_BYTES} bytes"
        if problem:
            self._check_index(fd, i)
            raise CorruptSample(self.index.shard_paths[self.index.shard[i]], self.index.keys[i], problem)
        return image, np.frombuffer(labels, np.uint8), np.frombuffer(meta, "<f4")

    def _check_index(self, fd: int, i: int) -> None:
        """A sample that fails its checks because the index points elsewhere is an index fault."""
        key, tar = self.index.keys[i], self.index.shard_paths[self.index.shard[i]]
        for ext, (offset, size) in zip((IMAGE_EXT[self.index.codec], "labels", "meta", "json"), self.index.ranges[i]):
            problem = header_mismatch(fd, f"{key}.{ext}", int(offset), int(size))
            if problem:
                raise IndexMismatch(tar, key, problem)

    def __getstate__(self) -> dict:  # sent to worker processes: descriptors do not travel
        return {"index": self.index, "_fds": {}, "_pid": None}

    def read_fields(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels uint8 [14], meta float32 [5]) of sample i, without touching the image."""
        _, (lo, lsz), (mo, msz), _ = self.index.ranges[i]
        fd = self._fd(int(self.index.shard[i]))
        return (np.frombuffer(os.pread(fd, int(lsz), int(lo)), np.uint8),
                np.frombuffer(os.pread(fd, int(msz), int(mo)), "<f4"))

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked worker: descriptors' file offsets are shared, reopen
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.index.shard_paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def first_corrupt(index: SplitIndex, rank: int = 0, world_size: int = 1) -> CorruptSample | None:
    """Read this rank's share of samples (every world_size-th from rank) with the loaders' own
    integrity checks; return the first bad one, or None.

    Training runs it on the val split before epoch 1, so a corrupt val sample fails the job
    before an epoch is spent. Cost: one read of the bytes (crc32 for format /2, PNG CRCs
    for /1), no decode — on the NIH val split about 3.5 GB in all, shared by the ranks.
    """
    reader = SampleReader(index)
    try:
        for i in range(rank, len(index), world_size):
            try:
                reader.read(i)
            except CorruptSample as bad:
                return bad
        return None
    finally:
        reader.close()


def _checksum_problem(record: bytes, image: bytes, labels: bytes, meta: bytes, codec: str) -> str | None:
    try:
        expected = json.loads(record).get(CRC_FIELD)
    except (ValueError, AttributeError):
        return ".json unreadable (damaged)"
    return checksum_problem(expected, {IMAGE_EXT[codec]: image, "labels": labels, "meta": meta})


def image_problem(data: bytes, codec: str) -> str | None:
    """Cheap integrity check before decode: PNG chunk CRCs; (lossless) JPEG / JPEG 2000 start and end markers.

    Returns None when the bytes look intact, else the reason. A flipped byte in a PNG
    always fails a CRC; for JPEG only truncation and header damage are caught here (the
    decoder catches the rest when it can).
    """
    if codec == "png":
        return _png_problem(data)
    if codec == "ljpeg":
        from shards.image_codec import ljpeg_problem

        return ljpeg_problem(data)
    if codec in ("jpeg", "jpg"):
        ok = data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"
        return None if ok else "JPEG start/end marker missing"
    ok = (data[:4] == b"\x00\x00\x00\x0c" or data[:2] == b"\xff\x4f") and data[-2:] == b"\xff\xd9"
    return None if ok else "JPEG 2000 signature or end-of-codestream missing"


def _png_problem(data: bytes) -> str | None:
    if data[:8] != _PNG_SIG:
        return "PNG signature missing"
    pos, n, view = 8, len(data), memoryview(data)
    while pos + 12 <= n:
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 8 + length
        if end + 4 > n:
            return "PNG chunk runs past the end (truncated)"
        ctype = data[pos + 4:pos + 8]
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[pos + 4:end]) != crc:
            return f"PNG {ctype.decode('latin-1')} chunk CRC mismatch"
        if ctype == b"IEND":
            return None
        pos = end + 4
    return "PNG IEND missing (truncated)"
