"""`pack --resize N`: derived N×N shards in OUT/resN/, made from the grey master shards.

Each master shard maps to one derived shard of the same name and samples (so
derived shards are smaller than --shard-size-mb). Images are decoded from the
master, resized with Lanczos (antialiased) and re-encoded in the master's codec;
the other members are copied, except that the .json's crc32 of the image is updated
(format /2). A journal per folder makes this resumable too.

When OUT is a URL (``s3://bucket/prefix``, shards.remote) each master is streamed from its object,
the derived shard and its index are written to the pack's local staging folder (``STAGE/resN/``),
uploaded one PUT per object (whole or not at all) and deleted locally, then journaled as an object
under ``OUT/resN/.pack-journal/`` (shards.pack_journal); the manifest is put last — the same
guarantees, and the same resume, as the masters of a URL pack.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from concurrent.futures import as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxrbase.atomic import atomic_write, remove_stale_temps
from cxrbase.errors import CxrError
from cxrbase.progress import progress
from shards import remote
from shards.dali_index import split_name, write_index
from shards.image_codec import CODEC_EXT, resize_encoded
from shards.manifest import write_manifest
from shards.pack_journal import Journal
from shards.records import CRC_FIELD, json_bytes, member_crcs
from shards.workers import process_pool


def derive_shard(
    master_tar: str, out_dir: str, size: int, codec: str, quality: int, upload_to: str | None = None
) -> dict[str, Any]:
    """Write ``out_dir/<same name>`` from one master shard (a file or a URL's object, streamed once);
    with ``upload_to`` (a URL folder) then put the shard and its index there and delete them locally.
    Return its journal entry."""
    import tarfile  # noqa: PLC0415

    from shards.tar_writer import TarStream  # noqa: PLC0415

    name = remote.location(master_tar).name
    image_ext, keys, image_crc = CODEC_EXT[codec], [], None
    with (
        atomic_write(Path(out_dir) / name) as fh,
        remote.open_read(master_tar) as src,
        tarfile.open(fileobj=src, mode="r|") as tar,
    ):
        stream = TarStream(fh)
        for info in tar:
            data = (tar.extractfile(info) or io.BytesIO()).read()  # a regular member: never None
            base, ext = split_name(info.name)
            if ext == image_ext:
                data = resize_encoded(data, size, codec, quality)
                keys.append(base)
                image_crc = member_crcs({ext: data})[ext]
            elif ext == "json":
                # the master's bytes were just checked against the journal's sha256 by pack
                data = _with_image_crc(data, image_ext, image_crc, f"{master_tar}: {base}")
                image_crc = None
            stream.add(info.name, data)
        sha = stream.finish()
    index = name[:-4] + ".idx"
    write_index(Path(out_dir) / index, stream.members)
    if upload_to is not None:  # the tar first: an index never names a shard that is not up
        for member in (name, index):
            remote.put_file(Path(out_dir) / member, remote.location(upload_to) / member)
            (Path(out_dir) / member).unlink()
    return {
        "name": name,
        "split": name.rsplit("-", 1)[0],
        "index": index,
        "samples": len(keys),
        "bytes": stream.offset,
        "sha256": sha,
        "keys": keys,
        "converted": [],
        "sizes": {f"{size}x{size}": len(keys)},
    }


def _with_image_crc(data: bytes, image_ext: str, crc: int | None, where: str) -> bytes:
    """The .json with its image crc32 replaced by the derived image's (unchanged for /1 shards)."""
    record = json.loads(data)
    if CRC_FIELD not in record:
        return data  # a cxr-shards/1 master: no checksums to carry over
    if crc is None:
        raise CxrError(f"{where}: .json before its image member — re-pack the master shards")
    record[CRC_FIELD] = {**record[CRC_FIELD], image_ext: crc}
    return json_bytes(record)


def derive_resized(
    out: Any, master: dict[str, Any], size: int, workers: int, stage: Path | None = None
) -> dict[str, Any]:
    """Write OUT/res{size}/ (shards, indexes, manifest) from the master shards; return its manifest.

    ``out`` is a folder or a URL; for a URL ``stage`` (the pack's locked staging folder,
    shards.pack.staging_dir) holds each derived shard until it is uploaded."""
    out = remote.location(out)
    res_dir = out / f"res{size}"
    url = remote.is_url(out)
    if url and stage is None:
        raise ValueError(f"{out}: derived shards for a URL need the pack's staging folder (stage=)")
    local_dir = Path(stage) / f"res{size}" if url and stage is not None else Path(res_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(local_dir)
    codec, quality = master["codec"], master["quality"] or 95
    journal = Journal(res_dir, {"resolution": size, "codec": codec, "quality": quality}, prefix=False)
    sources = {s["name"]: s["sha256"] for s in master["shards"]}
    journal.entries = [e for e in journal.entries if sources.get(e["name"]) == e.get("source_sha256")]
    todo = [s for s in master["shards"] if s["name"] not in {e["name"] for e in journal.entries}]
    start = time.perf_counter()
    with (
        process_pool(workers) as pool,
        progress(total=sum(s["samples"] for s in todo), unit="img", desc=f"res{size}", mininterval=0.5) as bar,
    ):
        upload_to = str(res_dir) if url else None
        futures = {
            pool.submit(derive_shard, str(out / s["name"]), str(local_dir), size, codec, quality, upload_to): s
            for s in todo
        }
        for future in as_completed(futures):
            entry = future.result()
            entry["source_sha256"] = futures[future]["sha256"]
            journal.add(entry)
            bar.update(entry["samples"])
    manifest = _derived_manifest(master, journal, size)
    write_manifest(res_dir, manifest)
    seconds = time.perf_counter() - start
    images = sum(s["samples"] for s in todo)
    print(
        f"res{size}: {images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s), "
        f"{len(master['shards']) - len(todo)} shards already derived; {len(manifest['shards'])} shards, "
        f"{sum(s['bytes'] for s in manifest['shards']) / 1e9:.2f} GB → {res_dir}",
        flush=True,
    )
    return manifest


def _derived_manifest(master: dict[str, Any], journal: Journal, size: int) -> dict[str, Any]:
    by_name = {e["name"]: e for e in journal.entries}
    shards = [
        {**s, "bytes": by_name[s["name"]]["bytes"], "sha256": by_name[s["name"]]["sha256"]} for s in master["shards"]
    ]
    sizes: Counter[str] = Counter()
    for entry in journal.entries:
        sizes.update(entry["sizes"])
    return {
        **master,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "resolution": size,
        "derived": True,
        "shards": shards,
        "image_sizes": dict(sizes),
    }
