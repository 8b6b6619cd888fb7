"""``resnet50`` — ImageNet-style ResNet-50 with a new head (lr 1e-3 in the SPEC recipe).

timm's ResNet-50 (same state-dict names as torchvision's). Options of SPEC.md:
``metadata`` (none | concat | mlp, see heads.py) and ``conv_stem`` (the learned
1→32→16→3 stem of stem.py in front of the intact pretrained first conv, taking
1024² down to ``stem_size``). The final feature map is ``layer4``'s output, 2048
channels at 1/32 of the backbone input. Grad checkpointing (:class:`ResNetTrunk`)
recomputes the stem and every bottleneck block in backward, storing only block
inputs; BatchNorm running statistics are updated once per step.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import BuildArgs, GlobalAvgPool, make_stem, timm_backbone
from .checkpointing import BackboneTrunk, checkpointed
from .classifier import CxrClassifier
from .heads import Head

NATIVE_SIZE = 224
DESCRIPTION = "ResNet-50 + new head; options metadata none|concat|mlp, conv_stem"


class ResNetTrunk(BackboneTrunk):
    """timm ResNet ``forward_features``: input → layer4 map [B,2048,H/32,W/32], optionally checkpointed."""

    def checkpointed_forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        stem = (b.conv1, b.bn1, b.act1, b.maxpool)
        x = checkpointed(nn.Sequential(*stem), x, modules=stem)
        for stage in (b.layer1, b.layer2, b.layer3, b.layer4):
            for block in stage:
                x = checkpointed(block, x, modules=(block,))
        return x


def build(args: BuildArgs, *, stem_size: int = NATIVE_SIZE) -> CxrClassifier:
    """ResNet-50 → GAP → (meta fusion) → dropout → linear."""
    backbone = timm_backbone("resnet50", args)
    head = Head(
        backbone.num_features, args.num_labels, metadata=args.metadata, meta_dim=args.meta_dim, dropout=args.dropout
    )
    return CxrClassifier(
        name="resnet50",
        stem=make_stem(args, stem_size),
        trunk=ResNetTrunk(backbone, args.grad_checkpointing),
        cam_layer=backbone.layer4,
        pool=GlobalAvgPool(),
        head=head,
        pooled_linear=True,
        channels_last=args.channels_last,
        cam_layers=(backbone.layer1, backbone.layer2, backbone.layer3),
    )
