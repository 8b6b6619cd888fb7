"""The model suite against independent references: torchvision models, numpy transcriptions of SPEC formulas."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from cxr.models import MODEL_NAMES, build_model, count_parameters
from cxr.models.__main__ import main as models_cli
from cxrbase.errors import CxrError

TRANSFORMERS = ("beit", "vit")
FEATURE_CHANNELS = {
    "densenet121": 1024,
    "densenet121_cbam": 1024,
    "resnet50": 2048,
    "beit": 768,
    "vit": 768,
    "cnn": 512,
}


@functools.cache
def cached_model(name: str, metadata: str = "none") -> torch.nn.Module:
    """One random-init model per (name, metadata), shared by the read-only tests (eval mode)."""
    torch.manual_seed(0)
    return build_model(name, metadata=metadata).eval()


def _shape_cases():
    for name in MODEL_NAMES:
        for size in (224, 512):
            for metadata in ("none", "concat"):
                yield pytest.param(name, size, metadata, id=f"{name}-{size}-{metadata}")


@pytest.mark.integration
@pytest.mark.parametrize("name,size,metadata", list(_shape_cases()))
def test_output_shape(name, size, metadata):
    model = cached_model(name, metadata)
    meta = torch.randn(2, 5) if metadata != "none" else None
    with torch.no_grad():
        logits = model(torch.randn(2, 1, size, size), meta)
    assert logits.shape == (2, 14)
    assert torch.isfinite(logits).all()
    assert model.uses_meta == (metadata != "none")


@pytest.mark.integration
def test_densenet121_at_1024():
    model = cached_model("densenet121")
    with torch.no_grad():
        fmap = model.features(torch.randn(1, 1, 1024, 1024))
        logits = model.head(model.pool(fmap))
    assert fmap.shape == (1, 1024, 32, 32)
    assert logits.shape == (1, 14)


@pytest.mark.integration
def test_resnet50_conv_stem_takes_1024_to_backbone_size():
    model = build_model("resnet50", conv_stem=True, metadata="mlp").eval()
    convs = [m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 16), (16, 3)]
    assert [c.stride[0] for c in convs] == [2, 2, 1]
    assert model.trunk.backbone.conv1.in_channels == 3  # the pretrained first conv stays 3-channel
    image = torch.randn(1, 1, 1024, 1024)
    with torch.no_grad():
        assert model.stem(image).shape == (1, 3, 224, 224)
        assert model(image, torch.randn(1, 5)).shape == (1, 14)


@pytest.mark.integration
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_features_pooled_cam_layer(name):
    """features/pooled/classifier_weight shapes, and a hook on cam_layer sees exactly features()."""
    model = cached_model(name)
    image = torch.randn(1, 1, 224, 224)
    seen = []
    handle = model.cam_layer.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        with torch.no_grad():
            fmap = model.features(image)
            pooled = model.pooled(image)
    finally:
        handle.remove()
    channels = FEATURE_CHANNELS[name]
    assert fmap.shape == (1, channels, 14, 14) if name in TRANSFORMERS else (1, channels, 7, 7)
    torch.testing.assert_close(seen[0], fmap)
    assert pooled.shape == (1, model.classifier.in_features)
    weight = model.classifier_weight
    if name in ("densenet121_cbam", "beit"):
        assert weight is None
    else:
        assert weight.shape == (14, channels)


@pytest.mark.integration
@pytest.mark.parametrize("name,metadata", [("densenet121", "none"), ("cnn", "concat"), ("vit", "none")])
def test_cam_identity(name, metadata):
    """logits = mean over space of Σ_k w_{c,k} f_k + b (+ w_meta·meta): what CAM relies on."""
    model = cached_model(name, metadata)
    image = torch.randn(2, 1, 96, 96) if name != "vit" else torch.randn(2, 1, 224, 224)
    meta = torch.randn(2, 5) if metadata != "none" else None
    with torch.no_grad():
        logits = model(image, meta).numpy().astype(np.float64)
        fmap = model.features(image).numpy().astype(np.float64)
    w = model.classifier_weight.detach().numpy().astype(np.float64)
    full_w = model.classifier.weight.detach().numpy().astype(np.float64)
    bias = model.classifier.bias.detach().numpy().astype(np.float64)
    cams = np.einsum("ck,bkhw->bchw", w, fmap)
    expected = cams.mean(axis=(2, 3)) + bias
    if meta is not None:
        expected += meta.numpy() @ full_w[:, w.shape[1] :].T
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


CHECKPOINTED = {  # a module inside a checkpointed segment: its forward runs again in backward
    "densenet121": lambda m: m.trunk.backbone.features.denseblock1.denselayer1.norm1,
    "densenet121_cbam": lambda m: m.trunk.features.backbone.features.transition2.conv,
    "resnet50": lambda m: m.trunk.backbone.layer1[0].conv1,
    "cnn": lambda m: m.trunk.blocks[0][0],
    "vit": lambda m: m.trunk.backbone.blocks[0].attn,
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_grad_checkpointing_same_loss_and_gradients(name):
    options = {"arch": "vit_tiny_patch16_224"} if name == "vit" else {}
    torch.manual_seed(1)
    plain = build_model(name, **options).train()
    ckpt = build_model(name, grad_checkpointing=True, **options).train()
    ckpt.load_state_dict(plain.state_dict())
    size = {"vit": 224, "cnn": 64, "resnet50": 64}.get(name, 32)  # DenseNet: 32² still leaves a 1×1 map
    image, target = torch.randn(2, 1, size, size), torch.randint(0, 2, (2, 14)).float()
    results = []
    for model in (plain, ckpt):
        calls = []
        handle = CHECKPOINTED[name](model).register_forward_hook(lambda *a: calls.append(1))
        torch.manual_seed(5)  # the same dropout masks (CBAM head) in both runs
        loss = F.binary_cross_entropy_with_logits(model(image), target)
        loss.backward()
        handle.remove()
        grads = {k: p.grad for k, p in model.named_parameters()}
        results.append((loss.detach(), grads, dict(model.named_buffers()), len(calls)))
    (loss_a, grads_a, bufs_a, calls_a), (loss_b, grads_b, bufs_b, calls_b) = results
    assert (calls_a, calls_b) == (1, 2), "checkpointing must recompute the segment in backward"
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-4, atol=1e-6, msg=key)
    # BatchNorm running statistics updated once, not again by the recomputation
    for key in bufs_a:
        torch.testing.assert_close(bufs_b[key], bufs_a[key], rtol=1e-5, atol=1e-6, msg=key)


def _numpy_conv2d_same(maps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """[B,2,h,w] ⊛ [1,2,k,k] with zero padding k//2 → [B,h,w] (cross-correlation, as torch)."""
    k = kernel.shape[-1]
    pad = np.pad(maps, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    h, w = maps.shape[-2:]
    out = np.zeros((maps.shape[0], h, w))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("bchw,c->bhw", pad[:, :, dy : dy + h, dx : dx + w], kernel[0, :, dy, dx])
    return out


def test_cbam_equals_spec_formula():
    """CBAM of SPEC.md transcribed in numpy with the module's own weights, on a random 1024-channel map."""
    model = cached_model("densenet121_cbam")
    cbam = model.cam_layer
    x = torch.randn(2, 1024, 6, 5).abs()
    with torch.no_grad():
        got = cbam(x).numpy()
    f = x.numpy().astype(np.float64)
    (w1, b1), (w2, b2) = [
        (l.weight.detach().numpy(), l.bias.detach().numpy()) for l in cbam.channel.mlp if isinstance(l, torch.nn.Linear)
    ]
    assert w1.shape == (512, 1024) and w2.shape == (1024, 512)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    mlp = lambda v: np.maximum(v @ w1.T + b1, 0) @ w2.T + b2  # noqa: E731
    f1 = f * sigmoid(mlp(f.mean(axis=(2, 3))) + mlp(f.max(axis=(2, 3))))[:, :, None, None]
    maps = np.stack([f1.mean(axis=1), f1.max(axis=1)], axis=1)
    kernel = cbam.spatial.conv.weight.detach().numpy()
    assert kernel.shape == (1, 2, 7, 7) and cbam.spatial.conv.bias is None
    expected = f1 * sigmoid(_numpy_conv2d_same(maps, kernel))[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_cbam_head_structure_and_l2():
    model = build_model("densenet121_cbam", metadata="concat")
    layers = list(model.head.body)
    linears = [l for l in layers if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024 + 5, 128), (128, 64)]
    assert [type(l).__name__ for l in layers] == ["Linear", "ReLU", "Dropout"] * 2
    assert [l.p for l in layers if isinstance(l, torch.nn.Dropout)] == [0.3, 0.3]
    assert (model.classifier.in_features, model.classifier.out_features) == (64, 14)
    params, lam = model.l2_params()
    assert lam == 1e-3 and [p.shape for p in params] == [(128, 1029), (64, 128)]
    expected = 1e-3 * sum(float((p.detach().numpy().astype(np.float64) ** 2).sum()) for p in params)
    assert float(model.l2_penalty().detach()) == pytest.approx(expected, rel=1e-5)
    assert cached_model("densenet121").l2_params() == ([], 0.0)


def _perturbed(state: dict) -> dict:
    """Random changes to every float tensor (variances stay positive), so loading is visible."""
    torch.manual_seed(3)
    out = {}
    for key, value in state.items():
        if key.endswith("running_var"):
            value = value * torch.empty_like(value).uniform_(0.5, 1.5)
        elif value.is_floating_point():
            value = value + 0.1 * torch.randn_like(value)
        out[key] = value
    return out


@pytest.mark.integration
def test_pretrained_torchvision_densenet_loads_with_summed_first_conv(tmp_path):
    """A torchvision DenseNet-121 state dict (old "norm.1" names, 3-channel) loads; grey image = RGB replicate."""
    source = torchvision.models.densenet121(weights=None).eval()
    state = _perturbed(source.state_dict())
    # Weights on a 2^-10 grid sum exactly in float32, so the float64 comparison below is tight.
    state["features.conv0.weight"] = torch.round(state["features.conv0.weight"] * 1024) / 1024
    source.load_state_dict(state)
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    old_names = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in saved.items()}
    path = tmp_path / "densenet121.pth"
    torch.save({"state_dict": old_names}, path)

    model = build_model("densenet121", pretrained=str(path)).eval()
    loaded = model.trunk.backbone.state_dict()
    expected_conv = saved["features.conv0.weight"].numpy().sum(axis=1, keepdims=True)
    np.testing.assert_allclose(loaded["features.conv0.weight"].numpy(), expected_conv, rtol=1e-6, atol=1e-6)
    for key, value in saved.items():
        if key != "features.conv0.weight" and not key.startswith("classifier."):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)

    # float64: random BN statistics let activations grow through 121 layers
    grey = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        rgb_features = source.double().features(grey.repeat(1, 3, 1, 1))
        reference = F.adaptive_avg_pool2d(F.relu(rgb_features), 1).flatten(1)
        torch.testing.assert_close(model.double().pooled(grey), reference, rtol=1e-9, atol=0)


@pytest.mark.integration
def test_pretrained_safetensors_resnet50_and_vit(tmp_path):
    import timm

    for name, arch, conv_key, options in (
        ("resnet50", "resnet50", "conv1.weight", {}),
        ("vit", "vit_tiny_patch16_224", "patch_embed.proj.weight", {"arch": "vit_tiny_patch16_224"}),
    ):
        source = timm.create_model(arch, pretrained=False)  # 3-channel, with its ImageNet head
        saved = _perturbed(source.state_dict())
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
        loaded = build_model(name, pretrained=path, **options).trunk.backbone.state_dict()
        np.testing.assert_allclose(
            loaded[conv_key].numpy(), saved[conv_key].numpy().sum(axis=1, keepdims=True), rtol=1e-6, atol=1e-6
        )
        for key, value in saved.items():
            if key != conv_key and not key.startswith(("fc.", "head.")):
                torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=f"{name}: {key}")


@pytest.mark.integration
def test_pretrained_conv_stem_keeps_three_channel_conv(tmp_path):
    source = torchvision.models.resnet50(weights=None)
    saved = _perturbed(source.state_dict())
    path = tmp_path / "resnet50.pt"
    torch.save(saved, path)
    model = build_model("resnet50", pretrained=path, conv_stem=True)
    torch.testing.assert_close(model.trunk.backbone.conv1.weight.detach(), saved["conv1.weight"], rtol=0, atol=0)


@pytest.mark.integration
def test_pretrained_errors(tmp_path):
    missing = tmp_path / "nope" / "densenet121.pth"
    with pytest.raises(CxrError, match="nope/densenet121.pth.*not found.*put a torchvision/timm state dict"):
        build_model("densenet121", pretrained=missing)
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(CxrError, match=r"does not fit.*missing \(e\.g\. features\..*unexpected \(e\.g\. "):
        build_model("densenet121", pretrained=wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CxrError, match="junk.pth: cannot read"):
        build_model("densenet121", pretrained=junk)
    with pytest.raises(CxrError, match="cnn is trained from scratch"):
        build_model("cnn", pretrained=wrong)


def test_build_errors_list_valid_choices():
    with pytest.raises(
        CxrError, match="unknown — choose one of densenet121, densenet121_cbam, resnet50, beit, vit, cnn"
    ):
        build_model("densenet")
    with pytest.raises(CxrError, match="metadata='both' — choose one of none, concat, mlp"):
        build_model("resnet50", metadata="both")
    with pytest.raises(CxrError, match="unknown option 'depth' — options of resnet50: stem_size"):
        build_model("resnet50", depth=18)
    with pytest.raises(CxrError, match="dropout=1.5"):
        build_model("cnn", dropout=1.5)
    with pytest.raises(CxrError, match="head_dropout=… instead"):
        build_model("densenet121_cbam", dropout=0.2)
    with pytest.raises(CxrError, match="unknown arch 'resnet18'"):
        build_model("vit", arch="resnet18")


@pytest.mark.integration
def test_metadata_is_used_or_ignored():
    with_meta = cached_model("cnn", "mlp")
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a = with_meta(image, torch.zeros(2, 5))
        b = with_meta(image, torch.ones(2, 5))
        assert not torch.allclose(a, b)
        plain = cached_model("cnn")
        torch.testing.assert_close(plain(image, torch.ones(2, 5)), plain(image))
    with pytest.raises(CxrError, match="meta=None"):
        with_meta(image)
    with pytest.raises(CxrError, match=r"meta has shape \(2, 3\), expected \(2, 5\)"):
        with_meta(image, torch.zeros(2, 3))
    with pytest.raises(CxrError, match=r"expected \[B,1,H,W\]"):
        with_meta(torch.randn(2, 3, 64, 64), torch.zeros(2, 5))


@pytest.mark.integration
def test_channels_last_same_output():
    plain = cached_model("cnn")
    fast = build_model("cnn", channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.trunk.blocks[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(image), plain(image), rtol=1e-4, atol=1e-5)


def test_parameter_counts_match_torchvision_and_hand_count():
    rgb_extra = 2 * 64 * 7 * 7  # torchvision's first conv (7×7, 64 filters) has two more input channels
    assert (
        count_parameters(cached_model("densenet121"))
        == count_parameters(torchvision.models.densenet121(weights=None, num_classes=14)) - rgb_extra
    )
    assert (
        count_parameters(cached_model("resnet50"))
        == count_parameters(torchvision.models.resnet50(weights=None, num_classes=14)) - rgb_extra
    )
    widths = [1, 32, 64, 128, 256, 512]
    convs = sum(9 * a * b + 2 * b for a, b in zip(widths[:-1], widths[1:]))  # conv (no bias) + BN affine
    assert count_parameters(cached_model("cnn")) == convs + 512 * 14 + 14


@pytest.mark.integration
def test_list_cli(capsys):
    assert models_cli(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(MODEL_NAMES)
    assert "6.96 M" in lines[0] and "CheXNet" in lines[0]
