"""The build arguments every family shares, and timm backbones built from them (never a download)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .stem import ConvStem
from .weights import IMAGENET, imagenet_weights_path, load_backbone_weights


@dataclass(frozen=True)
class BuildArgs:
    """The options common to all models (validated by ``build_model``)."""

    num_labels: int = 14
    pretrained: str | Path | None = None
    metadata: str = "none"
    meta_dim: int = 5
    conv_stem: bool = False
    grad_checkpointing: bool = False
    channels_last: bool = False
    dropout: float = 0.0

    @property
    def in_chans(self) -> int:
        """Backbone input channels: 3 behind the learned stem (pretrained first conv intact), else 1."""
        return 3 if self.conv_stem else 1


def make_stem(args: BuildArgs, stem_size: int) -> nn.Module:
    """The learned conv stem when ``conv_stem``, else the identity (the backbone takes 1 channel)."""
    return ConvStem(stem_size) if args.conv_stem else nn.Identity()


def timm_backbone(
    arch: str,
    args: BuildArgs,
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
    **kwargs,
) -> nn.Module:
    """A headless timm ``arch`` (random init, ``args.in_chans`` inputs), then local weights if ``args.pretrained``
    (a path, or ``imagenet``: the cached timm weights of ``arch``, see weights.py).

    Returns the timm model with ``num_classes=0``; ``forward_features`` gives the
    backbone output. Checkpointing is left to the family (CNN trunks do their own,
    BatchNorm-safe; transformers call timm's ``set_grad_checkpointing``).
    """
    import timm  # here, not at the top: cnn and ood_ae runs never load it (cxr/models/__init__.py)

    model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=args.in_chans, **kwargs)
    if args.pretrained is not None:
        cfg = model.pretrained_cfg
        heads = cfg.get("classifier") or ()
        path = imagenet_weights_path(arch) if args.pretrained == IMAGENET else args.pretrained
        load_backbone_weights(
            model,
            path,
            first_conv=cfg["first_conv"],
            head_prefixes=(heads,) if isinstance(heads, str) else tuple(heads),
            convert=convert,
        )
    return model


class GlobalAvgPool(nn.Module):
    """[B,C,h,w] → [B,C], the mean over space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
