"""``densenet121`` — CheXNet: DenseNet-121, global average pool, one linear layer to the logits.

The backbone is timm's DenseNet-121 (same state-dict names as torchvision's, old
torchvision ``norm.1`` names are mapped too). Its final feature map is the output
of ``features.norm5`` (BN + ReLU), 1024 channels at 1/32 of the input size.
Grad checkpointing (:class:`DenseNetTrunk`) recomputes in backward every dense
layer whole, every transition and the stem, storing only their inputs — the
feature maps DenseNet keeps anyway. timm's "memory-efficient" mode (only the
concat + BN + ReLU + 1×1 bottleneck recomputed) measured 0.71× peak memory at
1024², short of the 0.5× goal; whole-layer checkpointing measured 0.49× (batch 1)
/ 0.42× (batch 2) at 1.20× / 1.40× CPU time per step (bench/memory.py,
bench/RESULTS.md). BatchNorm running statistics are updated once per step, as
without checkpointing.
"""

from __future__ import annotations

import torch
from timm.models.densenet import DenseBlock
from torch import nn

from .backbones import BuildArgs, GlobalAvgPool, make_stem, timm_backbone
from .checkpointing import BackboneTrunk, checkpointed
from .classifier import CxrClassifier
from .heads import Head

NATIVE_SIZE = 224
DESCRIPTION = "CheXNet: DenseNet-121 + global average pool + linear (CAM-ready)"


class DenseNetTrunk(BackboneTrunk):
    """timm DenseNet ``features``: backbone input → final map [B,1024,H/32,W/32], optionally checkpointed."""

    def checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        pending: list[nn.Module] = []  # consecutive non-block modules (stem, transitions) form one segment
        for module in self.backbone.features.children():
            if isinstance(module, DenseBlock):
                x = _run_segment(pending, x)
                x = _checkpointed_block(module, x)
                pending = []
            else:
                pending.append(module)
        # The last segment (norm5) stays plain: cheap, and it is the CAM layer.
        for module in pending:
            x = module(x)
        return x


def _run_segment(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    if not modules:
        return x
    return checkpointed(nn.Sequential(*modules), x, modules=tuple(modules))


def _checkpointed_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A dense block with each layer recomputed in backward; stores only the 32-channel layer outputs."""
    features = [x]
    for layer in block.values():
        features.append(checkpointed(lambda *f, layer=layer: layer(list(f)), *features, modules=(layer,)))
    return torch.cat(features, dim=1)


def densenet121_backbone(args: BuildArgs) -> nn.Module:
    """timm DenseNet-121, headless, 1-channel (or 3 behind the conv stem), local weights if given."""
    return timm_backbone("densenet121", args)


def densenet_stages(backbone: nn.Module) -> tuple[nn.Module, ...]:
    """Grad-CAM candidates before ``norm5``, shallow → deep: each dense block's output and its
    transition's 1×1 conv (same size, before the transition's pool)."""
    features = backbone.features
    return tuple(
        m for i in (1, 2, 3) for m in (getattr(features, f"denseblock{i}"), getattr(features, f"transition{i}").conv)
    ) + (features.denseblock4,)


def build(args: BuildArgs, *, stem_size: int = NATIVE_SIZE) -> CxrClassifier:
    """CheXNet DenseNet-121 → GAP → (meta fusion) → dropout → linear."""
    backbone = densenet121_backbone(args)
    head = Head(
        backbone.num_features, args.num_labels, metadata=args.metadata, meta_dim=args.meta_dim, dropout=args.dropout
    )
    trunk = DenseNetTrunk(backbone, args.grad_checkpointing)
    return CxrClassifier(
        name="densenet121",
        stem=make_stem(args, stem_size),
        trunk=trunk,
        cam_layer=backbone.features.norm5,
        pool=GlobalAvgPool(),
        head=head,
        pooled_linear=True,
        channels_last=args.channels_last,
        cam_layers=densenet_stages(backbone),
    )
