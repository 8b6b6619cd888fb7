"""The loaders hand uint8 pixels over and one function, cxr.data.to_device, makes the model's input on the
device (issue 22 item 9): for both back ends, with and without augmentation, the handed-over image is
uint8 and what training, validation and cxr.runs.open.on_device feed the model equals an independent
numpy reference of the pixel path — bitwise the float batch the wds collate step produced before.

References, written here from the formula in cxr/data/augmentation.py's docstring, not from the code:
pixels from PIL on the shards' PNG bytes (no augmentation); the per-sample brightness / contrast from
their documented draw (PCG64 seeded by (seed, epoch, blake2b(key)), uniforms 5 and 6); the float steps
in float32 in the order the collate step ran them:
    no augmentation: (x − float32(mean·255)) / float32(std·255)
    augmentation:    clip(b · (0.5 + c · (x · float32(1/255) − 0.5)), 0, 1), then (· − mean) / std.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import phantom_shards, shards_config
from PIL import Image

from cxr.data import DataConfig, build_loader, to_device
from cxr.runs.open import on_device

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]  # conftest.py

RES = 32
SEED = 7
F32 = np.float32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return phantom_shards(tmp_path_factory.mktemp("u8"), 48, RES, 3).shards


@pytest.fixture(scope="module")
def png_pixels(shards) -> dict[str, np.ndarray]:
    """key → uint8 [R, R]: every shard member decoded by PIL."""
    out = {}
    for tar_path in shards.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L")
                    out[member.name[: -len(".png")]] = np.asarray(image, np.uint8)
    return out


def intensity(key: str, cfg: DataConfig, epoch: int) -> tuple[np.float32, np.float32]:
    """(brightness, contrast) of a sample as augmentation.py documents the draw."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    u = np.random.default_rng([cfg.seed, epoch, digest]).random(7)
    return F32(1 + (2 * u[5] - 1) * cfg.brightness), F32(1 + (2 * u[6] - 1) * cfg.contrast)


def reference(pixels: np.ndarray, cfg: DataConfig, bright=None, contrast=None) -> np.ndarray:
    """The normalised float32 image, in the float32 ops (and order) of the former wds collate step."""
    x = pixels.astype(F32)
    if bright is None:
        return (x - F32(cfg.mean * 255)) / F32(cfg.std * 255)
    y = (((x * F32(1 / 255) - F32(0.5)) * F32(contrast) + F32(0.5)) * F32(bright)).clip(F32(0), F32(1))
    return (y - F32(cfg.mean)) / F32(cfg.std)


def config(shards: Path, backend: str, augment: bool, **kw) -> DataConfig:
    kw.setdefault("pin_memory", False)
    return DataConfig(
        shards=str(shards),
        backend=backend,
        device="cpu",
        resolution=RES,
        batch_size=8,
        num_threads=0 if backend == "wds" else 1,
        augment=augment,
        seed=SEED,
        **kw,
    )


def check_batch(batch: dict, cfg: DataConfig, epoch: int, augment: bool, png: dict, got: torch.Tensor) -> None:
    """batch as handed over, and `got` (the model's input made from it) against the references."""
    image = batch["image"]
    assert image.dtype == torch.uint8 and image.shape == (len(batch["key"]), 1, RES, RES)
    assert got.dtype == torch.float32 and got.shape == image.shape
    for j, key in enumerate(batch["key"]):
        pixels = image[j, 0].numpy()
        if augment:
            b, c = intensity(key, cfg, epoch)
            assert (batch["brightness"][j].item(), batch["contrast"][j].item()) == (b, c), key
            want = reference(pixels, cfg, b, c)
        else:
            assert "brightness" not in batch
            np.testing.assert_array_equal(pixels, png[key], err_msg=key)  # the decoded bytes themselves
            want = reference(pixels, cfg)
        # bitwise: the same float32 words, not merely close
        np.testing.assert_array_equal(got[j, 0].numpy().view(np.int32), want.view(np.int32), err_msg=key)


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_loader_hands_uint8_and_to_device_gives_the_old_float_batch(shards, png_pixels, backend, augment):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = config(shards, backend, augment)
    epoch, seen = 2, 0
    for batch in build_loader(cfg, "train", epoch=epoch, train=True):
        image, meta = on_device(batch, torch.device("cpu"))  # evaluate's and every tool's feeder
        check_batch(batch, cfg, epoch, augment, png_pixels, image)
        assert torch.equal(image, to_device(batch, "cpu")) and torch.equal(meta, batch["meta"])
        seen += len(batch["key"])
    assert seen > 0
    # evaluation batches are never augmented, whatever data.augment says
    for batch in build_loader(cfg, "val", train=False):
        check_batch(batch, cfg, 0, False, png_pixels, to_device(batch, "cpu"))


def test_dali_cpu_pins_the_uint8_batch(shards, monkeypatch):
    """data.device=cpu with pinning: the page-locked copy is the uint8 batch (1 byte per pixel), not float32."""
    pytest.importorskip("nvidia.dali")
    pinned = []

    def pin_memory(self, *args, **kwargs):  # no CUDA here: record what would be page-locked
        pinned.append((self.dtype, self.numel() * self.element_size(), self.numel()))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    cfg = config(shards, "dali", True, pin_memory=True)
    batches = list(build_loader(cfg, "train", epoch=0))
    assert len(pinned) == len(batches) > 0
    for dtype, nbytes, numel in pinned:
        assert dtype == torch.uint8 and nbytes == numel  # 4× fewer bytes than the float32 batch


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_training_and_validation_feed_the_model_through_to_device(shards, png_pixels, tmp_path, monkeypatch, backend):
    """`cxr.train.train` on the shards with augmentation: what the model receives in each training step and in
    validation equals the reference made from the batch the loader handed over."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    import cxr.training.trainer as trainer_module
    from cxr.train import train

    handed: list[tuple[str, int, dict]] = []

    def loader_fn(cfg, split, *args, **kwargs):
        loader = build_loader(cfg, split, *args, **kwargs)

        class Recorded:
            def __len__(self):
                return len(loader)

            def __getattr__(self, name):
                return getattr(loader, name)

            def __iter__(self):
                for batch in loader:
                    handed.append((split, loader.epoch if loader.train else 0, batch))
                    yield batch

        return Recorded()

    seen: list[tuple[bool, torch.Tensor]] = []
    build = trainer_module.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].clone())))
        return model

    monkeypatch.setattr(trainer_module, "build_model", build_model)
    cfg = shards_config(
        tmp_path / "run",
        shards,
        RES,
        f"data.backend={backend}",
        f"data.num_threads={0 if backend == 'wds' else 1}",
        "data.device=cpu",
        "data.augment=true",
        "data.batch_size=8",
        f"data.seed={SEED}",
        "train.epochs=1",
    )
    assert train(cfg, loader_fn) == 0
    train_batches = [(e, b) for split, e, b in handed if split == "train"]
    val_batches = [b for split, _, b in handed if split == "val"]
    train_inputs = [x for training, x in seen if training]
    val_inputs = [x for training, x in seen if not training]
    assert len(train_inputs) == len(train_batches) > 0 and len(val_inputs) == len(val_batches) > 0
    for (epoch, batch), x in zip(train_batches, train_inputs):
        check_batch(batch, cfg.data, epoch, True, png_pixels, x)
    for batch, x in zip(val_batches, val_inputs):
        check_batch(batch, cfg.data, 0, False, png_pixels, x)
