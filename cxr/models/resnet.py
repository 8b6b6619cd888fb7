"""``resnet50`` — ImageNet-style ResNet-50 with a new head (lr 1e-3 in the SPEC recipe).

timm's ResNet-50 (same state-dict names as torchvision's). Options of SPEC.md:
``metadata`` (none | concat | mlp, see heads.py) and ``conv_stem`` (the learned
1→32→16→3 stem of stem.py in front of the intact pretrained first conv, taking
1024² down to ``stem_size``). The final feature map is ``layer4``'s output, 2048
channels at 1/32 of the backbone input. Grad checkpointing is timm's (each of the
four stages recomputed in backward).
"""
from __future__ import annotations

from .backbones import BuildArgs, CnnTrunk, GlobalAvgPool, make_stem, timm_backbone
from .classifier import CxrClassifier
from .heads import Head

NATIVE_SIZE = 224
DESCRIPTION = "ResNet-50 + new head; options metadata none|concat|mlp, conv_stem"


def build(args: BuildArgs, *, stem_size: int = NATIVE_SIZE) -> CxrClassifier:
    """ResNet-50 → GAP → (meta fusion) → dropout → linear."""
    backbone = timm_backbone("resnet50", args)
    head = Head(backbone.num_features, args.num_labels, metadata=args.metadata, meta_dim=args.meta_dim,
                dropout=args.dropout)
    return CxrClassifier(name="resnet50", stem=make_stem(args, stem_size), trunk=CnnTrunk(backbone),
                         cam_layer=backbone.layer4, pool=GlobalAvgPool(), head=head,
                         pooled_linear=True, channels_last=args.channels_last)
