"""``densenet121`` — CheXNet: DenseNet-121, global average pool, one linear layer to the logits.

The backbone is timm's DenseNet-121 (same state-dict names as torchvision's, old
torchvision ``norm.1`` names are mapped too). Its final feature map is the output
of ``features.norm5`` (BN + ReLU), 1024 channels at 1/32 of the input size.
Grad checkpointing is timm's memory-efficient DenseNet (the concatenation +
BN + ReLU + 1×1 conv bottleneck of every dense layer is recomputed in backward
instead of stored, which removes the quadratic memory of the concatenations).
"""
from __future__ import annotations

from torch import nn

from .backbones import BuildArgs, CnnTrunk, GlobalAvgPool, make_stem, timm_backbone
from .classifier import CxrClassifier
from .heads import Head

NATIVE_SIZE = 224
DESCRIPTION = "CheXNet: DenseNet-121 + global average pool + linear (CAM-ready)"


def densenet121_backbone(args: BuildArgs) -> nn.Module:
    """timm DenseNet-121, headless, 1-channel (or 3 behind the conv stem), local weights if given."""
    return timm_backbone("densenet121", args)


def build(args: BuildArgs, *, stem_size: int = NATIVE_SIZE) -> CxrClassifier:
    """CheXNet DenseNet-121 → GAP → (meta fusion) → dropout → linear."""
    backbone = densenet121_backbone(args)
    head = Head(backbone.num_features, args.num_labels, metadata=args.metadata, meta_dim=args.meta_dim,
                dropout=args.dropout)
    return CxrClassifier(name="densenet121", stem=make_stem(args, stem_size), trunk=CnnTrunk(backbone),
                         cam_layer=backbone.features.norm5, pool=GlobalAvgPool(), head=head,
                         pooled_linear=True, channels_last=args.channels_last)
