"""Node-local cache of remote shards (``s3://``, ``gs://``, ``https://``) for the DALI back end.

DALI reads samples by byte offset from local files, so a run whose ``data.shards`` is a URL
reads a local mirror of it: :meth:`ShardCache.ensure` copies the manifests and the shards (with
their ``.idx``) of the splits asked for into ``data.cache_dir`` and returns that folder, which
``cxr.data`` then reads like any shards folder.

- **One fetch per node.** Every rank calls :meth:`ensure`; they queue on one blocking ``flock``
  (``CACHE/.lock``). The first holder fetches what is missing (FETCH_THREADS objects at once); the others, once it lets go, find
  every shard verified in the index and only ``stat`` them. No rank sleeps or polls.
- **Verified once, reused after.** Each fetched object goes to a temp file beside its final
  name (one GET through fsspec's ``get_file``), is checked against the manifest's ``bytes`` and
  ``sha256``, and is renamed into place. ``CACHE/index.json`` (written atomically) records size,
  mtime and sha256 of each verified file: a later epoch, requeue or job whose manifest names the
  same sha256 and whose file still has that size and mtime reuses it without reading it. A file
  whose stat changed (rewritten, truncated, damaged by a write) is hashed again, and fetched again
  when it no longer matches.
- **No request in a run's later epochs.** The loaders are built afresh every epoch, and each call
  reads the remote manifests (small; how a re-pack is noticed by the next job or requeue). Within
  one process the manifests read by its first call for a URL are reused while their mirrored copies
  in the cache are unchanged (same stat), so a warm epoch makes no request and hashes nothing it
  verified before: it takes the lock, stats each shard and records the use (bench/loader.py --s3).
- **A size bound with LRU eviction.** Before fetching, the least recently used shards that the
  current call does not need are deleted until the needed bytes fit under ``max_bytes`` (and the
  disk's free space). A split larger than the bound is a clear error, not a thrashing cache.
- **Says what it did**: :class:`Fetched` holds what was fetched, reused and evicted with the
  time spent, and :meth:`Fetched.line` is the one line the run log shows.

Eviction deletes files only under the lock and never one the current call needs; two jobs with
*different* data sharing one node's cache and a bound too small for both can evict each other's
shards between epochs (each then fetches its own back) — size the bound for the jobs a node runs.

Hand-written (≈200 lines) rather than fsspec's ``filecache::`` / ``simplecache::``: those check
no sha256, share no lock between processes (two ranks both download), have no size bound, and
name cached files by hash, while DALI's readers need the shards under their manifest names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from cxrbase.atomic import atomic_write_text, remove_stale_temps
from cxrbase.errors import CxrError
from shards import remote
from shards.manifest import MANIFEST_NAME, validate_manifest
from shards.pack_journal import file_sha256

log = logging.getLogger("cxr.data.cache")  # cxr.runs.run_log puts it in train.log
# (cache root, URL, resolution) → (sub-folder, manifest, stat of its mirrored manifests) read by this
# process: see "No request in a run's later epochs" above.
_READ: dict[tuple[str, str, int | None], tuple[str, dict, tuple | None]] = {}
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
GB = 1e9
# Objects fetched at once: one S3 GET stream reaches ~100 MB/s, an instance's network (g5.24xlarge:
# 50 Gbit/s) several times that; fsspec's async file systems take calls from several threads.
FETCH_THREADS = 8


def default_cache_dir() -> Path:
    """Where the cache lives when data.cache_dir is unset: ``$CXR_CACHE_DIR`` (a launch profile's
    env, e.g. the instance NVMe), else ``$SLURM_TMPDIR/cxr-cache`` inside a Slurm job that has
    one, else ``/tmp/cxr-cache-$USER``."""
    if os.environ.get("CXR_CACHE_DIR"):
        return Path(os.environ["CXR_CACHE_DIR"])
    if os.environ.get("SLURM_TMPDIR"):
        return Path(os.environ["SLURM_TMPDIR"]) / "cxr-cache"
    return Path("/tmp") / f"cxr-cache-{os.environ.get('USER') or os.getuid()}"


def mirror_name(url: str) -> str:
    """Folder name of ``url``'s mirror in the cache: readable, and unique by a hash of the URL."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1]).strip("-.")[:60]
    return f"{stem}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:10]}"


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


@dataclass
class Fetched:
    """What one :meth:`ShardCache.ensure` did."""

    url: str
    folder: Path
    fetched: list[str] = field(default_factory=list)
    fetched_bytes: int = 0
    reused: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    evicted_bytes: int = 0
    by_other: int = 0  # of the reused: fetched by another process of the node while this one waited
    waited_s: float = 0.0  # waiting for the node lock (another rank fetching)
    fetch_s: float = 0.0  # GETs + sha256 checks of this call
    seconds: float = 0.0  # the whole call

    def line(self) -> str:
        rate = f", {self.fetched_bytes / max(self.fetch_s, 1e-9) / 1e6:.0f} MB/s" if self.fetched else ""
        return (
            f"shard cache {self.folder}: fetched {len(self.fetched)} shard(s) "
            f"({_size(self.fetched_bytes)} in {self.fetch_s:.1f} s{rate}) from {self.url}, "
            f"reused {len(self.reused)}{self._by_other()}, evicted {len(self.evicted)} ({_size(self.evicted_bytes)}); "
            f"waited {self.waited_s:.1f} s for the node lock"
        )

    def _by_other(self) -> str:
        return f" ({self.by_other} fetched by another rank of this node meanwhile)" if self.by_other else ""


def _mirrored(folder: Path, sub: str) -> tuple | None:
    """The stat of the mirrored manifests (masters', and ``sub``'s when derived); None for a missing one."""
    stats = []
    for path in {folder / MANIFEST_NAME, folder / sub / MANIFEST_NAME}:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stats.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(stats))


class ShardCache:
    """``ShardCache(cache_dir, max_gb).ensure(url, splits, resolution)`` → :class:`Fetched`."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, max_gb: float | None = None):
        self.root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.max_bytes = None if max_gb is None else int(max_gb * GB)

    @contextlib.contextmanager
    def _locked(self):
        """The node's lock, blocking: ranks queue here while the first one fetches."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CxrError(
                f"{self.root}: cannot create the shard cache here ({err.strerror}) — set data.cache_dir "
                "to a writable node-local folder (instance NVMe, $SLURM_TMPDIR)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the flock

    def ensure(self, url: str, splits: list[str] | None = None, resolution: int | None = None) -> Fetched:
        """Mirror ``url``'s manifests and the shards of ``splits`` (None: all) into the cache.

        With ``resolution`` and derived shards ``URL/res{R}/`` present, those are cached instead of
        the masters (as ``cxr.data.load_shards_manifest`` would choose locally). Returns what was
        done; ``.folder`` is the local shards folder to read."""
        url = url.rstrip("/")
        start = time.perf_counter()
        with self._locked():
            waited = time.perf_counter() - start
            done = self._ensure(url, splits, resolution, since=time.time() - waited)
        done.waited_s, done.seconds = waited, time.perf_counter() - start
        log.info("%s", done.line())
        return done

    # ------------------------------------------------------------------ under the lock
    def _ensure(self, url: str, splits: list[str] | None, resolution: int | None, since: float) -> Fetched:
        loc = remote.location(url)
        folder = self.root / mirror_name(url)
        read_before = _READ.get((str(self.root), url, resolution))
        if read_before and read_before[2] is not None and _mirrored(folder, read_before[0]) == read_before[2]:
            sub, manifest = read_before[0], read_before[1]
        else:
            manifest = self._manifest(loc, "", folder)
            sub = ""
            if resolution is not None and remote.is_file(loc / f"res{resolution}" / MANIFEST_NAME):
                sub = f"res{resolution}/"
                manifest = self._manifest(loc / f"res{resolution}", sub, folder)
            _READ[(str(self.root), url, resolution)] = (sub, manifest, _mirrored(folder, sub))
        for stale in {folder, folder / sub}:  # temps of a fetch killed mid-way (we hold the lock)
            if stale.is_dir():
                remove_stale_temps(stale)
        entries = [e for e in manifest["shards"] if splits is None or e["split"] in splits]
        done = Fetched(url, folder)
        index = self._read_index()
        needed = {self._key(folder, sub + e["name"]): e for e in entries}
        missing = []
        for key, entry in needed.items():
            if self._valid(index, key, entry):
                done.reused.append(entry["name"])
                done.by_other += index[key].get("fetched", 0) >= since
            else:
                missing.append((key, entry))
        now = time.time()
        for key in needed:
            if key in index:
                index[key]["used"] = now
        self._evict(index, needed, sum(e["bytes"] for _, e in missing), done)
        t0 = time.perf_counter()
        shards = loc / sub.rstrip("/") if sub else loc

        def fetch(key: str, entry: dict) -> None:
            self._fetch(shards / entry["name"], self.root / key, entry)
            self._fetch_index(shards / entry["index"], folder / sub / entry["index"])

        pool = ThreadPoolExecutor(min(FETCH_THREADS, max(len(missing), 1)), thread_name_prefix="cxr-fetch")
        try:
            futures = {pool.submit(fetch, key, entry): (key, entry) for key, entry in missing}
            for future in as_completed(futures):
                key, entry = futures[future]
                future.result()  # the first failure ends the call: queued fetches are cancelled below
                stat = (self.root / key).stat()
                index[key] = {
                    "sha256": entry["sha256"],
                    "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                    "index": entry["index"],
                    "used": now,
                    "fetched": time.time(),
                }
                done.fetched.append(entry["name"])
                done.fetched_bytes += entry["bytes"]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # running ones finish (or fail) and clean up
            done.fetched.sort()
            done.fetch_s = time.perf_counter() - t0
            self._write_index(index)
        return done

    def _key(self, folder: Path, name: str) -> str:
        return f"{folder.name}/{name}"

    def _manifest(self, shards, sub: str, folder: Path) -> dict:
        """Read the remote manifest (always: it is small and says whether the shards were re-packed)."""
        where = shards / MANIFEST_NAME
        text = remote.read_text(
            where,
            missing=f"no shards manifest here: pack into it first (cxr-shards pack --out {shards}) or fix the URL",
        )
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as err:
            raise CxrError(f"{where}: unreadable manifest ({err}) — re-run cxr-shards pack --out {shards}") from None
        validate_manifest(manifest, where)
        target = folder / sub / MANIFEST_NAME
        if not target.is_file() or target.read_text() != text:
            atomic_write_text(target, text)
        return manifest

    def _valid(self, index: dict, key: str, entry: dict) -> bool:
        """Whether the cached file of ``key`` holds ``entry``'s bytes: by stat when the index vouches
        for it, else by hashing it (and recording the result)."""
        path = self.root / key
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if not path.with_name(entry["index"]).is_file():
            return False
        rec = index.get(key)
        if rec and (rec["sha256"], rec["size"], rec["mtime_ns"]) == (entry["sha256"], stat.st_size, stat.st_mtime_ns):
            return True
        if stat.st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            log.info("shard cache: %s differs from the manifest (changed or damaged) — fetching it again", path)
            return False
        index[key] = {**(rec or {}), "sha256": entry["sha256"], "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        index[key].setdefault("index", entry["index"])
        return True

    def _evict(self, index: dict, needed: dict, incoming: int, done: Fetched) -> None:
        """Delete least-recently-used shards outside ``needed`` until ``incoming`` bytes fit."""
        held = {k: r for k, r in index.items() if (self.root / k).is_file()}
        for k in set(index) - set(held):
            del index[k]
        for path in self.root.glob("*/**/*.tar"):  # not in the index (it was lost): counted, and oldest
            key = path.relative_to(self.root).as_posix()
            if key not in held and key not in needed:
                held[key] = index[key] = {"size": path.stat().st_size, "used": 0, "sha256": None, "mtime_ns": 0}
        need_total = sum(e["bytes"] for e in needed.values())
        free = shutil.disk_usage(self.root).free
        bound = self.max_bytes
        if bound is not None and need_total > bound:
            raise CxrError(
                f"{self.root}: the splits asked for need {need_total / GB:.2f} GB of shards but "
                f"data.cache_max_gb={bound / GB:g} — raise data.cache_max_gb, or use data.backend=wds "
                "(streams without a cache)"
            )
        used = sum(r["size"] for r in held.values())
        for key, rec in sorted(held.items(), key=lambda kv: kv[1].get("used", 0)):
            over = bound is not None and used + incoming > bound
            if not over and incoming <= free:
                break
            if key in needed:
                continue
            path = self.root / key
            path.unlink(missing_ok=True)
            path.with_name(rec.get("index") or path.with_suffix(".idx").name).unlink(missing_ok=True)
            used -= rec["size"]
            free += rec["size"]
            done.evicted.append(key)
            done.evicted_bytes += rec["size"]
            del index[key]
        if incoming > free:
            raise CxrError(
                f"{self.root}: {incoming / GB:.2f} GB of shards to fetch but only {free / GB:.2f} GB free — "
                "free space there or set data.cache_dir to a larger node-local disk"
            )

    def _fetch(self, obj, target: Path, entry: dict) -> None:
        """One GET into a temp file beside ``target``, checked against the manifest, renamed into place."""
        url = str(obj)
        tmp = self._get(obj, target)
        try:
            size = tmp.stat().st_size
            sha = file_sha256(tmp) if size == entry["bytes"] else None
            if sha != entry["sha256"]:
                got = f"sha256 {sha}" if sha else f"{size} bytes"
                want = f"sha256 {entry['sha256']}" if sha else f"{entry['bytes']} bytes"
                raise CxrError(
                    f"{url}: the object holds {got}, the manifest says {want} — the object was replaced or "
                    f"damaged after packing: re-pack it (cxr-shards pack --out {url.rsplit('/', 1)[0]} "
                    "resumes and rewrites it), then check with cxr-shards verify"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _fetch_index(self, obj, target: Path) -> None:
        tmp = self._get(obj, target)
        os.replace(tmp, target)  # the loaders check an .idx against its tar (and rescan the tar if it differs)

    @staticmethod
    def _get(obj, target: Path) -> Path:
        """One GET of ``obj`` (fsspec's get_file: a single streamed request) into a temp file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        missing = (
            f"listed in the manifest but missing — re-run cxr-shards pack --out {obj.parent} with the same "
            "settings (it resumes and uploads what is missing)"
        )
        try:
            with remote.errors(obj, missing):
                obj.fs.get_file(obj.path, str(tmp))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    # ------------------------------------------------------------------ index.json
    def _read_index(self) -> dict:
        path = self.root / INDEX_NAME
        try:
            data = json.loads(path.read_text())
            return dict(data["entries"])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("shard cache: %s unreadable — rebuilding it (cached shards are hashed again)", path)
            return {}

    def _write_index(self, index: dict) -> None:
        """Atomic but not fsync'd: it is rewritten by every call (the use times of LRU), and a copy lost
        to a power cut is read as unreadable and rebuilt by hashing the cached files again — while an
        fsync per epoch and rank costs milliseconds to tens of them on a busy disk."""
        text = json.dumps({"version": 1, "entries": index}, indent=1) + "\n"
        atomic_write_text(self.root / INDEX_NAME, text, fsync=False)
