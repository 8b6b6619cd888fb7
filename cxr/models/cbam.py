"""``densenet121_cbam`` — DenseNet-121 + CBAM on the final 1024-channel map + an MLP head (SPEC.md).

CBAM on F [B,1024,h,w]:
    channel:  M_c = σ(MLP(avgpool F) + MLP(maxpool F)),  MLP shared 1024→512 (ReLU)→1024;  F' = M_c ⊙ F
    spatial:  M_s = σ(conv7×7([mean_c F', max_c F'])),   2→1 channels, no bias;            F'' = M_s ⊙ F'
Head: GAP(F'') → dense 128 (ReLU) → dropout 0.3 → dense 64 (ReLU) → dropout 0.3 → linear → logits.

The dense 128/64 kernels carry an L2 penalty of 1e-3 (Keras ``l2(1e-3)``
semantics: λ·Σw² added to the loss); :meth:`CxrClassifier.l2_params` exposes
them and says how training applies it. The head's two dropouts are fixed by
the SPEC (option ``head_dropout``, default 0.3); the common ``dropout``
argument would add a third one and is refused for this model.
Because of the MLP the head is not pooled-linear: ``classifier_weight`` is None
(use Grad-CAM on ``cam_layer``, the CBAM output F'').
"""

from __future__ import annotations

import torch
from torch import nn

from cxrbase.errors import CxrError

from .backbones import BuildArgs, GlobalAvgPool, make_stem
from .classifier import CxrClassifier
from .densenet import NATIVE_SIZE, DenseNetTrunk, densenet121_backbone, densenet_stages
from .heads import Head

DESCRIPTION = "DenseNet-121 + CBAM (channel+spatial attention) + dense 128/64 head, L2 1e-3"
CHANNEL_HIDDEN = 512
SPATIAL_KERNEL = 7
DENSE = (128, 64)
L2_LAMBDA = 1e-3


class ChannelAttention(nn.Module):
    """M_c = σ(MLP(avgpool F) + MLP(maxpool F)) with one shared MLP C→hidden (ReLU)→C; returns M_c ⊙ F."""

    def __init__(self, channels: int, hidden: int = CHANNEL_HIDDEN):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3)))
        mx = self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(avg + mx)[:, :, None, None]


class SpatialAttention(nn.Module):
    """M_s = σ(conv7×7([mean_c F, max_c F])); returns M_s ⊙ F."""

    def __init__(self, kernel: int = SPATIAL_KERNEL):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(maps))


class Cbam(nn.Module):
    """Convolutional Block Attention Module: channel then spatial attention, [B,C,h,w] → [B,C,h,w]."""

    def __init__(self, channels: int):
        super().__init__()
        self.channel = ChannelAttention(channels)
        self.spatial = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class CbamTrunk(nn.Module):
    """DenseNet-121 features followed by CBAM."""

    def __init__(self, backbone: nn.Module, grad_checkpointing: bool = False):
        super().__init__()
        self.features = DenseNetTrunk(backbone, grad_checkpointing)
        self.cbam = Cbam(backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbam(self.features(x))


def build(args: BuildArgs, *, head_dropout: float = 0.3, stem_size: int = NATIVE_SIZE) -> CxrClassifier:
    """DenseNet-121 → CBAM → GAP → (meta fusion) → dense 128 → dense 64 → linear."""
    if args.dropout:
        raise CxrError(
            f"densenet121_cbam: dropout={args.dropout} — this head has the SPEC's two dropouts "
            "(0.3 after each dense layer); set head_dropout=… instead and leave dropout=0"
        )
    if not 0.0 <= head_dropout < 1.0:
        raise CxrError(f"densenet121_cbam: head_dropout={head_dropout} — use a value in [0, 1)")
    backbone = densenet121_backbone(args)
    trunk = CbamTrunk(backbone, args.grad_checkpointing)
    head = Head(
        backbone.num_features,
        args.num_labels,
        metadata=args.metadata,
        meta_dim=args.meta_dim,
        hidden=DENSE,
        hidden_dropout=head_dropout,
    )
    return CxrClassifier(
        name="densenet121_cbam",
        stem=make_stem(args, stem_size),
        trunk=trunk,
        cam_layer=trunk.cbam,
        pool=GlobalAvgPool(),
        head=head,
        pooled_linear=False,
        cam_layers=(*densenet_stages(backbone), backbone.features.norm5),
        channels_last=args.channels_last,
        l2_lambda=L2_LAMBDA,
    )
