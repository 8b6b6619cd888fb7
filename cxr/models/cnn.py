"""``cnn`` — the from-scratch baseline: five conv blocks 32→512, adaptive average pool, dropout, linear.

Each block is conv3×3 → BatchNorm → ReLU → max pool 2×2, with widths
32, 64, 128, 256, 512, so the final map is 512 channels at 1/32 of the input
(32×32 at 1024²). ``dropout`` (the common argument; set it in the config, e.g.
0.5) acts on the pooled features; metadata fusion is optional as for every
model. No pretrained weights exist for it; grad checkpointing recomputes each
block in backward (BatchNorm statistics updated once).
"""

from __future__ import annotations

import torch
from torch import nn

from cxrbase.errors import CxrError

from .backbones import BuildArgs, GlobalAvgPool, make_stem
from .checkpointing import checkpointed, checkpointing_active
from .classifier import CxrClassifier
from .heads import Head

WIDTHS = (32, 64, 128, 256, 512)
DESCRIPTION = "from-scratch baseline: 5 conv-BN-ReLU-maxpool blocks 32→512, GAP, dropout, linear"


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3×3 (no bias: BN follows) → BN → ReLU → max pool 2×2; halves H and W."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class ConvBlocks(nn.Module):
    """[B,in,H,W] → [B,512,H/32,W/32] through the five blocks, optionally checkpointed."""

    def __init__(self, in_chans: int, grad_checkpointing: bool = False, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        widths = (in_chans, *widths)
        self.blocks = nn.ModuleList(conv_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = checkpointing_active(self, self.grad_checkpointing)
        for block in self.blocks:
            x = checkpointed(block, x, modules=(block,)) if active else block(x)
        return x


def build(args: BuildArgs, *, stem_size: int = 224, width: int = 32) -> CxrClassifier:
    """Five conv blocks → GAP → (meta fusion) → dropout → linear.

    ``width``: channels of the first block (32: the baseline's 32→512); the others double.
    Small widths (e.g. 8) make the fast phantom sweeps of the tests and demos.
    """
    if width < 1:
        raise CxrError(f"model.width={width}: must be ≥ 1 (default 32)")
    widths = tuple(width * 2**i for i in range(len(WIDTHS)))
    if args.pretrained is not None:
        raise CxrError(
            f"{args.pretrained}: cnn is trained from scratch and has no pretrained weights — "
            "pass pretrained=None (resume a cxr checkpoint through training instead)"
        )
    trunk = ConvBlocks(args.in_chans, args.grad_checkpointing, widths)
    head = Head(widths[-1], args.num_labels, metadata=args.metadata, meta_dim=args.meta_dim, dropout=args.dropout)
    # Grad-CAM candidates: each block's ReLU (before its pool) and the block's pooled output
    stages = tuple(m for block in trunk.blocks for m in (block[2], block))
    return CxrClassifier(
        name="cnn",
        stem=make_stem(args, stem_size),
        trunk=trunk,
        cam_layer=trunk.blocks[-1],
        pool=GlobalAvgPool(),
        head=head,
        pooled_linear=True,
        channels_last=args.channels_last,
        cam_layers=stages,
    )
