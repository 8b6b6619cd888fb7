"""A ViT built from a shipped config follows data.resolution: position embeddings resampled once at
build (compared with timm's own resample_abs_pos_embed of the pretrained ones), no interpolate in the
forward (the bicubic whose CUDA backward is not deterministic), and config.yaml carries img_size so
evaluation rebuilds the same model. BEiT keeps its 224 window (input resized inside the model) unless
model.img_size says otherwise."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from cxr.config import config_to_dict, load_config
from cxr.models import build_model

SHIPPED = "cxr/configs/beit.yaml"


def _no_interpolate(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"interpolate called in the forward ({kwargs.get('mode')})")

    monkeypatch.setattr(F, "interpolate", refuse)


@pytest.mark.slow
def test_vit_from_the_shipped_config_at_512_resamples_pretrained_pos_embed_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # an ImageNet-shaped 224 checkpoint
    weights = tmp_path / "vit_tiny_224.pth"
    torch.save(source.state_dict(), weights)
    cfg = load_config(
        SHIPPED,
        ["model.name=vit", "model.arch=vit_tiny_patch16_224", f"model.pretrained={weights}", "data.resolution=512"],
    )
    assert cfg.model.options["img_size"] == 512
    model = build_model(**cfg.model.kwargs()).train()
    pos = model.trunk.backbone.pos_embed
    assert pos.shape == (1, 1 + (512 // 16) ** 2, 192)
    want = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[32, 32], num_prefix_tokens=1)
    torch.testing.assert_close(pos.detach(), want, rtol=0, atol=0)

    _no_interpolate(monkeypatch)
    x = torch.randn(1, 1, 512, 512)
    model(x).sum().backward()
    assert pos.grad is not None and pos.grad.shape == pos.shape


@pytest.mark.slow
def test_beit_keeps_its_window_at_512_unless_img_size_is_set(monkeypatch):
    cfg = load_config(SHIPPED, ["data.resolution=512"])
    assert "img_size" not in cfg.model.options
    backbone = build_model(**cfg.model.kwargs()).trunk.backbone
    assert tuple(backbone.patch_embed.grid_size) == (14, 14)  # 512² input resized to 224² inside: same tokens
    cfg = load_config(SHIPPED, ["data.resolution=512", "model.img_size=512"])
    model = build_model(**cfg.model.kwargs()).eval()
    backbone = model.trunk.backbone
    assert tuple(backbone.patch_embed.grid_size) == (32, 32)
    table = backbone.blocks[0].attn.relative_position_bias_table
    assert table.shape[0] == (2 * 32 - 1) ** 2 + 3  # timm's table for a 32×32 window (+3 cls entries)
    _no_interpolate(monkeypatch)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 512, 512)).shape == (1, 14)


@pytest.mark.parametrize(
    "overrides, img_size",
    [
        ([], None),  # 224: the builder's default, nothing written (hash of 224 runs unchanged)
        (["data.resolution=1024"], None),  # BEiT: resized to its window inside the model
        (["model.name=vit", "data.resolution=1024"], 1024),
        (["model.name=vit", "data.resolution=1024", "model.img_size=224"], 224),  # explicit wins
        (["data.resolution=1024", "model.img_size=512"], 512),
        (["model.name=vit", "data.resolution=1024", "model.conv_stem=true", "model.stem_size=384"], 384),
        (["data.resolution=1024", "model.conv_stem=true"], None),  # BEiT's stem output is its img_size
        (["model.name=vit", "data.resolution=1000"], None),  # not a multiple of 16: reported at the first batch
        (["model.name=densenet121", "data.resolution=512"], None),
    ],
)
def test_img_size_follows_the_size_the_transformer_sees(overrides, img_size):
    cfg = load_config(SHIPPED, overrides)
    assert cfg.model.options.get("img_size") == img_size
    assert config_to_dict(cfg)["model"].get("img_size") == img_size


def test_weights_of_a_vit_built_before_img_size_followed_the_resolution_load_and_compute_the_same(tmp_path):
    """An older run's ViT at 64 px (224 grid, resampled in every forward) evaluates as it did: its
    weights load into the model built for 64 now and give its outputs (the reference: the old model)."""
    from safetensors.torch import save_file

    from cxr.runs.checkpoint import load_weights

    torch.manual_seed(0)
    kwargs = dict(name="vit", num_labels=14, arch="vit_tiny_patch16_224", pretrained=None)
    old = build_model(**kwargs).eval()  # img_size 224: pos_embed of 197 tokens, resampled per forward
    (tmp_path / "best").mkdir()
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, str(tmp_path / "best" / "model.safetensors"))
    new = build_model(**kwargs, img_size=64).eval()
    assert new.trunk.backbone.pos_embed.shape[1] == 1 + 4 * 4 != old.trunk.backbone.pos_embed.shape[1]
    load_weights(new, tmp_path / "best")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)
