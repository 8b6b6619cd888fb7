"""Find the shards to read and where every sample's bytes sit inside them.

`load_shards_manifest` resolves derived shards (DIR/res{R}/) against masters;
`SplitIndex` lists one split's samples in packing order with the byte offsets of
their tar members (from the DALI `.idx` files, or a tar header scan when an index
is absent or does not match its tar); `SampleReader` reads those bytes by offset and
checks their integrity — the per-sample crc32 of format /2, or PNG chunk CRCs and
JPEG markers for /1 shards — so a corrupt sample is caught before any decoder sees it;
`decode_resize` then decodes a checked image with pack's decoder and resize filter (the reading and
checking live in cxr.data.sample_reader and are re-exported here). Both back ends
(dali_loader, wds_loader) read samples only through this module, and neither imports the other.

The formats themselves are read through their owners: manifest.json through
``shards.manifest``, the .idx files through ``shards.dali_index``, PNG checks through
``shards.image_codec``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.data.sample_reader import (  # noqa: F401  (re-exported: the loaders read samples through this module)
    IMAGE_EXT,
    META_BYTES,
    CorruptSample,
    IndexMismatch,
    OnCorrupt,
    SampleReader,
    all_corrupt_error,
    decode_resize,
    first_corrupt,
    image_problem,
    to_resolution,
)
from cxrbase.errors import CxrError
from cxrbase.labels import LABELS, NUM_LABELS, UNKNOWN
from shards import remote
from shards.dali_index import Sample, index_mismatch, read_index, scan_tar
from shards.manifest import MANIFEST_NAME, has_checksums, load_manifest
from shards.records import named_positives

log = logging.getLogger("cxr.data")


def load_shards_manifest(shards_dir: str | os.PathLike, resolution: int) -> tuple[Path, dict]:
    """Resolve the shards to read at `resolution`: DIR/res{R}/ when packed, else DIR.

    Returns (folder used, its parsed manifest.json). Logs which one was chosen. ``shards_dir`` may be
    a URL (``s3://…``, ``https://…``): the folder is then a UPath and every read goes through
    shards.remote.
    """
    root = remote.location(shards_dir)
    derived = root / f"res{resolution}" / MANIFEST_NAME
    if remote.is_file(derived):
        log.info("shards: using derived %dpx shards %s (no resize of masters)", resolution, derived.parent)
        return derived.parent, load_manifest(derived)
    path = root / MANIFEST_NAME
    if not remote.is_file(path):
        raise CxrError(
            f"{path}: shards manifest not found — pack shards first "
            f"(python -m shards pack --splits … --images … --out {root})"
        )
    manifest = load_manifest(path)
    native = manifest.get("resolution")
    if native != resolution:
        log.info(
            "shards: no %s; resizing %s shards from %s to %dpx",
            derived.parent.name,
            f"{native}px" if native else "native",
            root,
            resolution,
        )
    return root, manifest


def image_source(shards_dir: str | os.PathLike, resolution: int) -> dict:
    """What a run at ``resolution`` reads, for meta.json and train.log: derived ``resN/`` shards,
    masters at their native size, or masters resized on the fly — with the resize filter."""
    from shards.image_codec import RESIZE_FILTER

    root = remote.location(shards_dir)
    if remote.is_file(root / f"res{resolution}" / MANIFEST_NAME):
        return {"source": f"derived {root / f'res{resolution}'}", "resize_filter": f"{RESIZE_FILTER}, at pack time"}
    try:
        manifest = load_manifest(root)
    except CxrError:
        return {"source": f"unknown (no readable {root / MANIFEST_NAME})", "resize_filter": None}
    native = manifest.get("resolution")  # derived shards; masters (None) say their sizes in image_sizes
    sizes = manifest.get("image_sizes") or {}
    if native is None and sizes:
        total, at = sum(sizes.values()), sizes.get(f"{resolution}x{resolution}", 0)
        if at == total:
            native = resolution
        elif at:  # the loaders resize only the images that are not resolution² already
            return {
                "source": f"masters {root}: {at} of {total} at {resolution} px as packed, the other "
                f"{total - at} resized on the fly",
                "resize_filter": RESIZE_FILTER,
            }
    if native == resolution:
        return {"source": f"masters {root} at their native {resolution} px", "resize_filter": None}
    return {"source": f"masters {root} resized on the fly to {resolution} px", "resize_filter": RESIZE_FILTER}


def meta_stats(shards_dir: Path, manifest: dict) -> tuple[float, float]:
    """Train-split age mean/std (years) for z-scoring; derived shards fall back to the masters'."""
    stats = manifest.get("meta_stats") or {}
    if "age_mean" not in stats and remote.is_file(shards_dir.parent / MANIFEST_NAME):
        stats = load_manifest(shards_dir.parent).get("meta_stats") or {}
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
    shard: np.ndarray  # int32 [N] index into shard_paths
    ranges: np.ndarray  # int64 [N, 4, 2] (offset, size) of image, labels, meta, json
    num_labels: int = NUM_LABELS  # len(manifest["labels"]): 14 for NIH, any count for a generic table
    checksums: bool = False  # each .json holds the crc32 of the other members (format /2)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, shards_dir: Path, manifest: dict, split: str) -> SplitIndex:
        """Index every shard of `split` listed in the manifest (errors name missing files)."""
        entries = sorted((s for s in manifest["shards"] if s.get("split") == split), key=lambda s: s["name"])
        if not entries:
            known = sorted(manifest.get("splits", {}))
            raise CxrError(f"{shards_dir / 'manifest.json'}: no shards for split {split!r} — choose one of {known}")
        codec = manifest["codec"]
        if codec not in IMAGE_EXT:
            raise CxrError(
                f"{shards_dir / 'manifest.json'}: unknown codec {codec!r} — expected one of {sorted(IMAGE_EXT)}"
            )
        memo = _files_memo(shards_dir, manifest, split, entries)
        if memo in _loaded:  # the same files as last epoch: no re-parse of every .idx per epoch
            _loaded.move_to_end(memo)
            return _loaded[memo]
        image_ext = IMAGE_EXT[codec]
        paths, keys, shard_ids, ranges = [], [], [], []
        present = remote.list_sizes(shards_dir)  # one listing, not a stat (or HEAD) per shard
        for i, entry in enumerate(entries):
            tar = shards_dir / entry["name"]
            if entry["name"] not in present:
                raise CxrError(f"{tar}: shard listed in the manifest is missing — copy it back or re-pack")
            idx = shards_dir / entry.get("index", tar.with_suffix(".idx").name)
            samples = _index_shard(tar, idx if idx.name in present else None)
            if "samples" in entry and len(samples) != entry["samples"]:
                raise CxrError(f"{tar}: holds {len(samples)} samples, manifest says {entry['samples']} — re-pack it")
            rows = []  # this shard's Python tuples only: a split-wide list of them would peak at ~0.6 kB a sample
            for key, members in samples:
                try:
                    rows.append((members[image_ext], members["labels"], members["meta"], members["json"]))
                except KeyError as err:
                    raise CxrError(f"{tar}: sample {key} lacks member .{err.args[0]} — re-pack this shard") from err
                keys.append(key)
            ranges.append(np.asarray(rows, np.int64).reshape(-1, 4, 2))
            shard_ids.append(np.full(len(rows), i, np.int32))
            paths.append(tar)
        index = cls(
            shards_dir,
            codec,
            paths,
            keys,
            np.concatenate(shard_ids),
            np.concatenate(ranges),
            len(manifest.get("labels") or ()) or NUM_LABELS,
            has_checksums(manifest),
        )
        if manifest.get("labels"):
            check_label_order(index, list(manifest["labels"]), shards_dir / MANIFEST_NAME)
        for array in (index.shard, index.ranges):
            array.setflags(write=False)  # shared by every loader of these files in this process
        if memo is not None:
            _loaded[memo] = index
            while len(_loaded) > LOADED_SPLITS:
                _loaded.popitem(last=False)
        return index


# SplitIndex.load returns the index it built last for the same split and the same files (every
# .tar and .idx with the same size, mtime and inode, the same manifest entries): the loaders are
# built afresh every epoch (train and val), and parsing every .idx again cost ~58 µs a sample
# (bench/scale.py: ~4.5 s per epoch and rank at NIH size, ~50 s at 1M images) before the first
# batch. Train, val and test of one run fit.
LOADED_SPLITS = 3
_loaded: OrderedDict[tuple, SplitIndex] = OrderedDict()


def _files_memo(shards_dir: Path, manifest: dict, split: str, entries: list[dict]) -> tuple | None:
    """What identifies a split's index: the entries and the stat of every file it is read from
    (None when a shard is missing: load then names it; None at a URL, whose objects have no cheap
    stat: its index is built again from one listing and the .idx objects)."""
    if remote.is_url(shards_dir):
        return None
    stats = []
    for entry in entries:
        tar = shards_dir / entry["name"]
        idx = shards_dir / entry.get("index", tar.with_suffix(".idx").name)
        try:
            st = tar.stat()
        except OSError:
            return None
        try:
            ist = idx.stat()
            idx_stat = (ist.st_size, ist.st_mtime_ns, ist.st_ino)
        except OSError:
            idx_stat = None
        stats.append(
            (entry["name"], entry.get("samples"), entry.get("sha256"), st.st_size, st.st_mtime_ns, st.st_ino, idx_stat)
        )
    return (
        str(Path(shards_dir).resolve()),
        split,
        manifest["codec"],
        manifest.get("format"),
        tuple(manifest.get("labels") or ()),
        tuple(stats),
    )


# Samples whose .json is read by check_label_order at most (it stops sooner once every label has been
# seen positive): 2,000 small preads, a few ms per split; the NIH labels all occur in any 2,000 images
# but for Hernia (0.2 %, ~4 expected).
LABEL_CHECK_SAMPLES = 2000
_label_order_checked: set[tuple] = set()  # (manifest, its mtime and size, split names, labels) already checked


def check_label_order(index: SplitIndex, names: list[str], manifest: Path) -> None:
    """CxrError when the manifest's ``labels`` are not the order the samples were packed in.

    The loaders take the label names from manifest.json and the bits from each ``.labels``; a
    reordered or edited list would train and evaluate every head under another label's name. Each
    sample's ``.json`` names its positive labels (``findings``, written by pack from the same row):
    the names of the set ``.labels`` bits under the manifest's order must be exactly those. Samples
    are read spread over the split until every label was seen positive (or LABEL_CHECK_SAMPLES);
    a sample whose .json is unreadable, lacks ``findings`` or whose ``.labels`` differ from the
    .json's ``labels`` (damage, not a manifest edit) is left to the loaders' own checks."""
    try:
        stat = (None, None) if remote.is_url(manifest) else (manifest.stat().st_mtime_ns, manifest.stat().st_size)
        memo = (str(manifest), *stat, tuple(map(str, index.shard_paths)), tuple(names))
    except OSError:
        memo = None
    if memo is not None and memo in _label_order_checked or not len(index):
        return
    step = max(1, len(index) // LABEL_CHECK_SAMPLES)
    order = [i for start in range(step) for i in range(start, len(index), step)][:LABEL_CHECK_SAMPLES]
    seen: set[int] = set()
    read: list[tuple[bytes, list]] = []
    bad = None
    reader = SampleReader(index)
    try:
        for i in order:
            _, (lo, lsz), _, (jo, jsz) = index.ranges[i]
            shard = reader.shard(int(index.shard[i]))
            bits = shard.pread(int(lsz), int(lo))
            try:
                record = json.loads(shard.pread(int(jsz), int(jo)))
                findings, packed = record.get("findings"), record.get("labels")
            except (ValueError, AttributeError):
                continue
            if not isinstance(findings, list) or len(bits) != len(names) or packed != list(bits):
                continue  # a damaged sample (.labels not its .json's): the loaders' checks report it
            read.append((bits, findings))
            if bad is None and named_positives(names, bits) != findings:
                bad = (i, named_positives(names, bits), findings)
            seen.update(p for p, y in enumerate(bits) if y == 1)
            if bad is None and len(seen) == len(names):
                break
    finally:
        reader.close()
    if bad is not None:
        i, named, findings = bad
        packed = _packed_order(names, read)
        raise CxrError(
            f"{manifest}: its labels list is not the order the samples were packed in "
            f"({index.shard_paths[index.shard[i]].name}: sample {index.keys[i]}'s .labels name "
            f"{named} under it, its .json findings are {findings}) — the manifest was edited: "
            f"restore its labels list{f' to {packed}' if packed else ''} or re-pack the shards "
            f"(python -m shards pack)"
        )
    if memo is not None:
        _label_order_checked.add(memo)


def _packed_order(names: list[str], read: list[tuple[bytes, list]]) -> list[str] | None:
    """The packed label order when the samples read pin it down, else None: pack writes the 14 NIH
    labels in canonical order; for another table, position p's name is in the findings of every
    sample with bit p set and in none of those with it unset (one candidate left per position)."""
    if sorted(names) == sorted(LABELS):
        return list(LABELS)
    candidates = [set(names) for _ in names]
    for bits, findings in read:
        for p, y in enumerate(bits):
            if y == UNKNOWN:  # a masked label says nothing about the name at p
                continue
            candidates[p] = candidates[p] & set(findings) if y == 1 else candidates[p] - set(findings)
    for _ in names:  # a name fixed at one position is no candidate elsewhere
        fixed = {next(iter(c)) for c in candidates if len(c) == 1}
        candidates = [c if len(c) == 1 else c - fixed for c in candidates]
    if all(len(c) == 1 for c in candidates) and len({next(iter(c)) for c in candidates}) == len(names):
        return [next(iter(c)) for c in candidates]
    return None


def _index_shard(tar: Path, idx: Path | None) -> list[Sample]:
    """[(key, {ext: (offset, size)})] in tar order, from the DALI index (None: absent) or a header scan.

    An index that does not match its tar (stale, edited, another shard's) is replaced
    by the scan, with a warning naming it: only the index is wrong, not the samples.
    """
    if idx is not None:
        samples = read_index(idx)
        problem = index_mismatch(tar, samples)
        if problem is None:
            return samples
        log.warning(
            "shards: %s does not match %s (%s); rebuilding the index in memory by a tar header scan "
            "— delete it or re-run `python -m shards verify %s`",
            idx,
            tar.name,
            problem,
            tar.parent,
        )
    else:
        log.warning(
            "shards: %s has no index %s; scanning tar headers (slower start)", tar, tar.with_suffix(".idx").name
        )
    return scan_tar(tar)
