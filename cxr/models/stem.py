"""Input stems: what turns the grey image [B,1,H,W] into the backbone's input.

- ``ConvStem`` (option ``conv_stem=True``): a learned 1→32→16→3 stem, strides
  2, 2, 1 (so 1024² → 256²), then a bilinear resize to the backbone's input size
  (``stem_size``, 224 by default) — the full-resolution image is seen by learned
  filters before it is reduced, and the pretrained 3-channel first conv stays intact.
- ``Resize``: a fixed-size bilinear (antialiased) resize, used by BEiT whose
  relative position bias tables are tied to one input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEM_CHANNELS = (1, 32, 16, 3)
STEM_STRIDES = (2, 2, 1)


class Resize(nn.Module):
    """Bilinear antialiased resize to ``size``×``size``; a no-op when the input already has it."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        if x.is_cuda and x.requires_grad and torch.are_deterministic_algorithms_enabled():
            return separable_resize(x, self.size)  # the CUDA backward of interpolate is not deterministic
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}"


_MATRICES: dict[tuple, torch.Tensor] = {}


def resize_matrix(n_in: int, n_out: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[n_out, n_in]: the 1-D antialiased bilinear resize as a matrix, built once per size, dtype and
    device (building it on the CPU and copying it over every forward cost a host sync per step)."""
    key = (n_in, n_out, dtype, torch.device(device))
    matrix = _MATRICES.get(key)
    if matrix is None:
        with torch.no_grad():
            matrix = _MATRICES[key] = _build_resize_matrix(n_in, n_out).to(device=device, dtype=dtype)
    return matrix


def _build_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """interpolate applied to the unit vectors, on the CPU in float64, forward only."""
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
    cols = F.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False, antialias=True)
    return cols.reshape(n_in, n_out).t().contiguous()


def separable_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The resize of :class:`Resize` as two matrix products (deterministic forward and backward):
    the antialiased bilinear filter is separable, rows then columns."""
    rows = resize_matrix(x.shape[-2], size, x.dtype, x.device)
    cols = resize_matrix(x.shape[-1], size, x.dtype, x.device)
    return rows @ x @ cols.t()


class ConvStem(nn.Module):
    """Learned stem [B,1,H,W] → [B,3,stem_size,stem_size]: conv3×3-BN-ReLU ×2 (stride 2), conv1×1 to 3 channels.

    The last layer has no ReLU/BN so the output can take the signed range of an
    ImageNet-normalised image, which the pretrained backbone expects.
    """

    def __init__(self, stem_size: int = 224):
        super().__init__()
        c0, c1, c2, c3 = STEM_CHANNELS
        s1, s2, s3 = STEM_STRIDES
        self.layers = nn.Sequential(
            nn.Conv2d(c0, c1, 3, stride=s1, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=s2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, c3, 1, stride=s3),
        )
        self.resize = Resize(stem_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(self.layers(x))
