"""manifest.json of a shards folder: write, load and validate it — its one owner.

The fields are specified in docs/shards-format.md (format ``cxr-shards/2``; ``/1``
shards, without per-sample checksums, are still read and verified). pack and derive
write it with :func:`write_manifest`; verify, the loaders (``cxr.data.shard_index``) and
the evaluator read it with :func:`load_manifest`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrbase.atomic import atomic_write_text
from cxrbase.errors import CxrError

FORMAT = "cxr-shards/2"  # what pack writes: /2 added the per-sample crc32 in each .json
READ_FORMATS = ("cxr-shards/1", FORMAT)
MANIFEST_NAME = "manifest.json"
CODECS = ("png", "jpeg", "j2k", "ljpeg")
_REQUIRED = {
    "format": str,
    "package_version": str,
    "created": str,
    "codec": str,
    "derived": bool,
    "source": list,
    "labels": list,
    "meta_fields": list,
    "meta_stats": dict,
    "splits": dict,
    "shards": list,
    "missing": list,
    "rejected": list,
    "converted": list,
}
_SHARD_FIELDS = ("name", "split", "samples", "bytes", "sha256", "index")


def package_version() -> str:
    """The installed cxr version (from the distribution metadata, so a cwd folder named
    ``shards/`` that shadows this package cannot break it); "unknown" when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr")
    except PackageNotFoundError:
        return "unknown"


def manifest_path(directory: str | Path) -> Path:
    """``DIR/manifest.json`` (a path that already names a .json file is kept)."""
    path = Path(directory)
    return path if path.suffix == ".json" else path / MANIFEST_NAME


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate and write ``DIR/manifest.json`` atomically; return its path."""
    path = manifest_path(directory)
    validate_manifest(manifest, path)
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    return path


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``DIR/manifest.json``; CxrError naming the path if absent or invalid."""
    path = manifest_path(directory)
    if not path.is_file():
        raise CxrError(f"{path}: no shards manifest here — run `python -m shards pack --out {path.parent}` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CxrError(f"{path}: unreadable manifest ({err}) — re-run `python -m shards pack`") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: Any, path: str | Path = MANIFEST_NAME) -> None:
    """Check fields, types and internal consistency (per-split counts add up to the shard list)."""

    def bad(what: str) -> CxrError:
        return CxrError(f"{path}: invalid shards manifest: {what} — re-run `python -m shards pack`")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("format") not in READ_FORMATS:
        raise bad(f"format is {manifest.get('format')!r}, expected one of {READ_FORMATS}")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise bad(f"field {key!r} missing or not a {kind.__name__}")
    if manifest["codec"] not in CODECS:
        raise bad(f"codec {manifest['codec']!r} not one of {CODECS}")
    names = manifest["labels"]
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise bad("labels must be a non-empty list of distinct names (the 14 NIH labels or a generic table's)")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or any(f not in entry for f in _SHARD_FIELDS):
            raise bad(f"shard entry {entry!r} lacks one of {_SHARD_FIELDS}")
        for field in ("name", "index"):
            if not is_plain_name(entry[field]):
                raise CxrError(
                    f"{path}: shard {field} {entry[field]!r} is not a file name in this folder — the "
                    "loaders and verify open only files beside manifest.json; restore the manifest "
                    "or re-run `python -m shards pack`"
                )
    for split, stats in manifest["splits"].items():
        mine = [s for s in manifest["shards"] if s["split"] == split]
        if stats.get("samples") != sum(s["samples"] for s in mine) or stats.get("shards") != len(mine):
            raise bad(f"split {split!r}: samples/shards counts disagree with the shard list")


def is_plain_name(name: Any) -> bool:
    """A file name inside the shards folder: no folder part (``/``, ``\\``), not ``.``/``..``, not
    hidden, printable. Shard and index names are read from the manifest and joined to the folder;
    a name like ``../../etc/passwd`` would make the readers open files outside it."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
    )


def has_checksums(manifest: dict[str, Any]) -> bool:
    """Whether every sample's .json carries crc32 checksums of its members (format /2 on)."""
    return manifest.get("format") != "cxr-shards/1"


MIN_VAL_IMAGES = 20  # below this a validation split's AUROC and tuned thresholds rest on too few images


def label_gaps(
    samples: int, positives: dict[str, int], known: dict[str, int] | None = None
) -> tuple[list[str], list[str]]:
    """(labels with no positive image, labels with no negative image) among ``samples`` images;
    ``known``: per label the images whose label is not unknown (default: all ``samples``)."""
    known = known or {}
    none = [name for name, n in positives.items() if int(n) == 0]
    every = [name for name, n in positives.items() if samples and int(n) >= int(known.get(name, samples))]
    return none, every


def _names(labels: list[str], total: int) -> str:
    return "every label" if len(labels) == total else ", ".join(labels)


def split_warnings(
    samples_by_split: dict[str, int],
    positives_by_split: dict[str, dict[str, int]],
    where: str,
    val: str = "val",
    known_by_split: dict[str, dict[str, int]] | None = None,
) -> list[str]:
    """Warnings about data too small or skewed for what it feeds, each ``"{where}: …"``:
    a train label without positives (its head only ever learns "absent"), and a validation
    split (``val``) smaller than MIN_VAL_IMAGES or with labels lacking a class (their AUROC is
    undefined, so best-checkpoint selection and tuned thresholds rest on the rest)."""
    out = []
    train = positives_by_split.get("train")
    if train and samples_by_split.get("train"):
        none, _ = label_gaps(samples_by_split["train"], train)
        if none:
            out.append(
                f"{where}: split 'train' has no positive image of {_names(none, len(train))} "
                f"({len(none)} of {len(train)} labels) — those heads only learn 'absent' and their "
                "AUROC means nothing; add images with these findings or leave the labels out"
            )
    pos, n = positives_by_split.get(val), samples_by_split.get(val)
    if pos is not None and n:
        none, every = label_gaps(n, pos, (known_by_split or {}).get(val))
        lacking = [name for name in pos if name in none or name in every]
        if n < MIN_VAL_IMAGES or lacking:
            what = [f"only {n} image(s)"] if n < MIN_VAL_IMAGES else []
            gaps = [
                f"no {kind} image of {_names(names, len(pos))}"
                for kind, names in (("positive", none), ("negative", every))
                if names
            ]
            if lacking:
                what.append(f"{'; '.join(gaps)} (AUROC undefined for {len(lacking)} of {len(pos)} labels)")
            out.append(
                f"{where}: split '{val}' has {'; '.join(what)} — best-checkpoint selection and tuned "
                f"thresholds rest on it; re-split with a larger {val} fraction (≥ {MIN_VAL_IMAGES} images "
                "with every label present)"
            )
    return out


def manifest_warnings(manifest: dict[str, Any], path: str | Path) -> list[str]:
    """:func:`split_warnings` from a manifest's per-split counts."""
    splits = manifest.get("splits") or {}
    return split_warnings(
        {s: int(v.get("samples") or 0) for s, v in splits.items()},
        {s: dict(v.get("positives") or {}) for s, v in splits.items() if v.get("positives")},
        str(path),
        known_by_split={s: dict(v["known"]) for s, v in splits.items() if v.get("known")},
    )
