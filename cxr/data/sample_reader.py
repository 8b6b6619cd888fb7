"""Read one sample's bytes by offset and check them before any decoder sees them.

`SampleReader` reads a sample's tar members at the offsets a cxr.data.shard_index.SplitIndex
lists and checks their integrity — the per-sample crc32 of format /2, or PNG chunk CRCs and
JPEG markers for /1 shards; a failure is a `CorruptSample` (shard, key, reason) that the
loaders skip or raise through their ``on_corrupt``. `decode_resize` then decodes a checked
image with pack's decoder and resize filter. PNG checks are read through ``shards.image_codec``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxrbase.errors import CxrError
from cxrbase.labels import META_FIELDS, UNKNOWN
from shards import remote
from shards.dali_index import header_mismatch
from shards.image_codec import CODEC_EXT, ljpeg_problem, png_problem
from shards.records import CRC_FIELD, checksum_problem

Index = Any  # a cxr.data.shard_index.SplitIndex (that module imports this one)


# codec → image member extension (pack's CODEC_EXT), plus the extensions as aliases of their codec
IMAGE_EXT = {**CODEC_EXT, "jpg": "jpg", "jp2": "jp2"}
META_BYTES = 4 * len(META_FIELDS)


class CorruptSample(Exception):
    """A sample whose bytes fail their integrity check or decode (shard, key, reason)."""

    def __init__(self, shard: Path, key: str, reason: str):
        super().__init__(f"{shard}: sample {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason

    def __reduce__(self):  # crosses DataLoader worker processes
        return CorruptSample, (self.shard, self.key, self.reason)

    def as_error(self) -> CxrError:
        return CxrError(
            f"{self.shard}: sample {self.key} is corrupt ({self.reason}) — "
            "re-pack this shard (python -m shards verify finds all bad samples)"
        )


OnCorrupt = Callable[[CorruptSample], None]  # records a skip, or raises CxrError


def all_corrupt_error(shards: list, keys: list[str]) -> CxrError:
    """Dropping a whole batch would desynchronise the ranks' batch counts (DDP hangs): stop instead."""
    return CxrError(
        f"{', '.join(sorted(set(map(str, shards))))}: every sample of a batch is corrupt ({keys}) — "
        "re-pack these shards (python -m shards verify lists all bad samples)"
    )


def decode_resize(image: bytes, res: int, index: Index, i: int) -> np.ndarray:
    """Encoded image → grey uint8 [res, res] (resized, when not already res×res, with the filter of
    `pack --resize`: shards.image_codec.resize_grey)."""
    from shards.image_codec import decode_grey

    try:
        im = decode_grey(image, index.codec)  # pack's decoder: imagecodecs for png / ljpeg, PIL for the rest
    except Exception as err:  # any decoder failure (BadImage included) marks the sample corrupt
        raise CorruptSample(
            index.shard_paths[index.shard[i]], index.keys[i], f"{index.codec} does not decode ({err})"
        ) from err
    if im.mode != "L":
        im = im.convert("L")  # RGBA/RGB radiographs have R=G=B (SPEC); I;16 would lose bits here
    return to_resolution(im, res)


def to_resolution(image, res: int) -> np.ndarray:
    """A grey master (PIL "L" image or uint8 [H, W]) → uint8 [res, res], resized when not already
    res×res with the filter of `pack --resize` (shards.image_codec.resize_grey). The loaders' step
    after decoding, and cxr-predict's on files, so both hand a model the same pixels."""
    from PIL import Image

    from shards.image_codec import resize_grey

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8), "L")
    if im.size != (res, res):
        im = resize_grey(im, res)
    return np.array(im)  # writable copy for torch.from_numpy


class IndexMismatch(CorruptSample):
    """The index points a sample at the wrong bytes: the shard itself may be intact."""

    def __reduce__(self):
        return IndexMismatch, (self.shard, self.key, self.reason)

    def as_error(self) -> CxrError:
        return CxrError(
            f"{self.shard.with_suffix('.idx')}: index does not match {self.shard.name} at sample "
            f"{self.key} ({self.reason}); the samples may be intact — delete the .idx (the loader "
            "then scans the tar) or re-run `python -m shards verify`"
        )


class SampleReader:
    """Reads a sample's raw members by offset; one reader per shard per process (shards.remote.RangeReader:
    a descriptor for a local file, ranged GETs for a URL). The four members of a sample lie together in
    the tar, so one read (one GET) fetches them all."""

    def __init__(self, index: Index):
        self.index = index
        self._readers: dict[int, remote.RangeReader] = {}
        self._pid = os.getpid()

    def read(self, i: int, check_image: bool = True) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(encoded image, labels uint8 [num_labels], meta float32 [5]) of sample i; CorruptSample if bad.

        Format /2 shards: the image, labels and meta bytes must equal the crc32 their .json
        recorded at pack time (any codec, any flipped byte). /1 shards: check_image=False
        skips the PNG CRC / JPEG marker pass (for a decoder that verifies it itself).
        """
        ranges = self.index.ranges[i]
        shard = self.shard(int(self.index.shard[i]))
        start = int(ranges[:, 0].min())
        span = shard.pread(int((ranges[:, 0] + ranges[:, 1]).max()) - start, start)
        (io, isz), (lo, lsz), (mo, msz), (jo, jsz) = (
            (int(o) - start, int(n)) for o, n in ranges
        )  # offsets within the span
        image, labels, meta = span[io : io + isz], span[lo : lo + lsz], span[mo : mo + msz]
        problem = _short_read({IMAGE_EXT[self.index.codec]: (image, isz), "labels": (labels, lsz), "meta": (meta, msz)})
        if problem is None and self.index.checksums:
            record = span[jo : jo + jsz]
            problem = _short_read({"json": (record, jsz)}) or _checksum_problem(
                record, image, labels, meta, self.index.codec
            )
        elif problem is None and check_image:
            problem = image_problem(image, self.index.codec)
        if problem is None and (len(labels) != self.index.num_labels or any(y > 1 and y != UNKNOWN for y in labels)):
            problem = f".labels is not {self.index.num_labels} bytes of 0/1/{UNKNOWN} (unknown)"
        if problem is None and len(meta) != META_BYTES:
            problem = f".meta is not {META_BYTES} bytes"
        if problem:
            self._check_index(shard, i)
            raise CorruptSample(self.index.shard_paths[self.index.shard[i]], self.index.keys[i], problem)
        return image, np.frombuffer(labels, np.uint8), np.frombuffer(meta, "<f4")

    def _check_index(self, fd: remote.RangeReader, i: int) -> None:
        """A sample that fails its checks because the index points elsewhere is an index fault."""
        key, tar = self.index.keys[i], self.index.shard_paths[self.index.shard[i]]
        for ext, (offset, size) in zip((IMAGE_EXT[self.index.codec], "labels", "meta", "json"), self.index.ranges[i]):
            problem = header_mismatch(fd, f"{key}.{ext}", int(offset), int(size))
            if problem:
                raise IndexMismatch(tar, key, problem)

    def __getstate__(self) -> dict:  # sent to worker processes: descriptors do not travel
        return {"index": self.index, "_readers": {}, "_pid": None}

    def shard(self, shard: int) -> remote.RangeReader:
        if self._pid != os.getpid():  # forked worker: descriptors' file offsets are shared, reopen
            self._readers, self._pid = {}, os.getpid()
        if shard not in self._readers:
            self._readers[shard] = remote.RangeReader(self.index.shard_paths[shard])
        return self._readers[shard]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}


def first_corrupt(index: Index, rank: int = 0, world_size: int = 1) -> CorruptSample | None:
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


def _short_read(members: dict[str, tuple[bytes, int]]) -> str | None:
    """'.EXT truncated (N of M bytes …)' for the first member read short: the shard ends before
    the bytes its index promises (cut or replaced since the index was read)."""
    for ext, (data, size) in members.items():
        if len(data) != size:
            return f".{ext} truncated ({len(data)} of {size} bytes: the shard is shorter than its index says)"
    return None


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
        return png_problem(data)
    if codec == "ljpeg":
        return ljpeg_problem(data)
    if codec in ("jpeg", "jpg"):
        ok = data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"
        return None if ok else "JPEG start/end marker missing"
    ok = (data[:4] == b"\x00\x00\x00\x0c" or data[:2] == b"\xff\x4f") and data[-2:] == b"\xff\xd9"
    return None if ok else "JPEG 2000 signature or end-of-codestream missing"
