"""``pretrained=imagenet``: timm's ImageNet weights found offline in a Hugging Face cache laid out by the test.

The cache is written the way ``huggingface_hub`` writes it (blob named by its
hash, ``snapshots/REV/model.safetensors`` a relative link to it, ``refs/main``
holding REV); the weights are random, with timm's own state-dict keys.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from cxr.models import build_model
from cxrbase.errors import CxrError

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)


def _write_hub_cache(cache, repo: str, state: dict[str, torch.Tensor]) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    tmp = folder / "tmp.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(folder / "blobs" / digest)
    rev = "0123456789abcdef0123456789abcdef01234567"
    (folder / "snapshots" / rev).mkdir(parents=True)
    os.symlink(f"../../blobs/{digest}", folder / "snapshots" / rev / "model.safetensors")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)


def test_imagenet_weights_found_in_hub_cache_and_first_conv_summed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    source = timm.create_model("densenet121", pretrained=False)  # 3 channels, ImageNet head
    state = {
        k: (torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.1)
        if v.is_floating_point()
        else v
        for k, v in source.state_dict().items()
    }
    _write_hub_cache(tmp_path / "hub", "timm/densenet121.tv_in1k", state)

    loaded = build_model("densenet121", 2, pretrained="imagenet").trunk.backbone.state_dict()
    # Documented (weights.py): the grey input's conv is the RGB conv summed over its input channels.
    conv = state["features.conv0.weight"]
    assert loaded["features.conv0.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(loaded["features.conv0.weight"][:, 0], conv[:, 0] + conv[:, 1] + conv[:, 2])
    others = [k for k in loaded if k != "features.conv0.weight"]
    assert len(others) > 300
    for key in others:
        assert torch.equal(loaded[key], state[key]), key
    assert not any(k.startswith("classifier") for k in loaded)  # the ImageNet head is dropped

    # Same output for a grey image as the RGB network on the image replicated to 3 channels.
    source.load_state_dict(state)
    grey = build_model("densenet121", 2, pretrained="imagenet").eval()
    source.eval()
    image = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(
        grey.features(image), source.forward_features(image.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4
    )


def test_imagenet_weights_missing_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    expected = (
        f"{tmp_path}/empty/models--timm--resnet50.a1_in1k/snapshots/<rev>/model.safetensors: "
        "ImageNet weights of resnet50 .* run `python -m cxr.models download resnet50`"
    )
    with pytest.raises(CxrError, match=expected) as err:
        build_model("resnet50", pretrained="imagenet")
    assert "\n" not in str(err.value)
    with pytest.raises(CxrError, match=r"download beit_base_patch16_224`"):
        build_model("beit", pretrained="imagenet")


def test_download_cli_refuses_cnn_without_network():
    from cxr.models.__main__ import backbone_arch

    assert backbone_arch("densenet121_cbam") == "densenet121"
    assert backbone_arch("vit_small_patch16_224") == "vit_small_patch16_224"
    with pytest.raises(CxrError, match="cnn: trained from scratch"):
        backbone_arch("cnn")
