"""helpers.phantom_shards builds each set of arguments once per test run: a later call gets a copy that
must equal what a fresh build in its own folder writes (reference: a build with the cache switched off)."""

from __future__ import annotations

import json

import helpers
import pytest

pytestmark = pytest.mark.integration  # packs shards


def _files(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_cached_copy_equals_a_fresh_build_in_its_own_folder(tmp_path, monkeypatch):
    args = dict(n=24, resolution=32, seed=7, fractions="0.5,0.25,0.25", split_seed=2)
    monkeypatch.setattr(helpers, "PHANTOM_CACHE", tmp_path / "cache")
    helpers.phantom_shards(tmp_path / "first", **args)
    copy = helpers.phantom_shards(tmp_path / "copy", **args)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one build, kept
    monkeypatch.setattr(helpers, "PHANTOM_CACHE", None)
    fresh = helpers.phantom_shards(tmp_path / "fresh", **args)

    got, want = _files(copy.root), _files(fresh.root)
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name].read_bytes(), want[name].read_bytes()
        if name.startswith("shards/") and name.endswith((".json", ".jsonl")):  # manifest and pack journal
            assert str(tmp_path / "first").encode() not in a  # they name this folder's paths, not the first's
            a = a.replace(str(copy.root).encode(), b"ROOT")
            b = b.replace(str(fresh.root).encode(), b"ROOT")
            if name == "shards/manifest.json":
                a, b = json.loads(a), json.loads(b)
                a.pop("created"), b.pop("created")
        assert a == b, name
    # another set of arguments builds again
    helpers.phantom_shards(tmp_path / "other", **{**args, "seed": 8}, upto="synth")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the cache was off for it
