"""One seed per ensemble member drives init, data order and augmentation (data.seed follows
train.seed unless set), and the shipped ensembles vary hyper-parameters, not only the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import phantom_shards

from cxr.config import config_hash, config_yaml, load_config
from cxr.data import build_loader
from cxr.data.augmentation import draw_params
from launch import members

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return phantom_shards(tmp_path_factory.mktemp("seeds"), 60, 32, fractions="0.7,0.15,0.15", split_seed=0).shards


def member_config(name: str, index: int, shards: Path, tmp_path: Path):
    ens = members.load_ensemble(name)
    argv = members.member_argv(
        ens,
        index,
        tmp_path / "runs",
        shards,
        ["data.backend=wds", "data.num_threads=0", "data.resolution=32", "data.batch_size=4"],
    )
    return load_config(ROOT / ens.config, argv[2:])


@pytest.mark.parametrize("ensemble", ["default", "tiny"])
def test_members_see_different_batches_and_augmentation(ensemble, shards, tmp_path):
    a, b = (member_config(ensemble, i, shards, tmp_path) for i in (0, 1))
    assert a.train.seed != b.train.seed
    assert (a.data.seed, b.data.seed) == (a.train.seed, b.train.seed)  # resolved, not the old fixed 0
    first = [next(iter(build_loader(c.data, "train", rank=0, world_size=1, epoch=0)))["key"] for c in (a, b)]
    assert list(first[0]) != list(first[1])
    keys = [f"{i:08d}_000" for i in range(64)]
    draws = [draw_params(keys, c.data, 0, 32) for c in (a, b)]
    flips = [d.matrix[:, 0, 0] < 0 for d in draws]  # x-scale sign (rotations are < 90°): flipped or not
    assert not np.array_equal(flips[0], flips[1])  # same hflip_p: only the seed can make them differ
    assert not np.allclose(draws[0].brightness, draws[1].brightness)


def test_default_ensemble_varies_hyper_parameters():
    ens = members.load_ensemble("default")
    for key in ("optim.lr", "loss.smoothing", "data.rotate_deg"):
        values = [m.overrides.get(key, ens.overrides.get(key)) for m in ens.members]
        assert len(set(values)) > 1, key


def test_data_seed_follows_train_seed_unless_set_and_is_saved():
    cfg = load_config(None, ["train.seed=7"])
    assert cfg.data.seed == 7
    saved = yaml.safe_load(config_yaml(cfg))
    assert saved["data"]["seed"] == 7  # the resolved value: reloading the saved config gives the same run
    fixed = load_config(None, ["train.seed=7", "data.seed=0"])
    assert fixed.data.seed == 0
    assert config_hash(cfg) != config_hash(fixed)
    # a saved config reloaded with another train.seed keeps its explicit data seed
    assert load_config(None, [f"data.seed={saved['data']['seed']}", "train.seed=8"]).data.seed == 7
