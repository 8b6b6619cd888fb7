"""ONNX for PyTorch's antialiased resize (``F.interpolate(antialias=True)``), which the legacy
exporter does not map: the symbolics cxr.tools.export registers before exporting, and the
resampling weights they bake in."""

from __future__ import annotations

import numpy as np
import torch

from cxrbase.errors import CxrError


def _aa_filter(kind: str):
    """Pillow's resampling filters (PyTorch's antialiased kernels are the same): (filter, support)."""
    if kind == "linear":
        return (lambda x: max(0.0, 1.0 - abs(x))), 1.0
    a = -0.5

    def cubic(x: float) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    return cubic, 2.0


def aa_resize_matrix(in_size: int, out_size: int, kind: str) -> np.ndarray:
    """[out, in] weights of an antialiased resize along one axis (Pillow's precompute_coeffs:
    support × downscale factor, normalised inside the image)."""
    filt, support = _aa_filter(kind)
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support *= fscale
    w = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        k = np.array([filt((j - center + 0.5) / fscale) for j in range(lo, hi)])
        w[i, lo:hi] = k / k.sum() if k.sum() != 0 else k
    return w


def _resize_aa(g, x, output_size, align_corners, mode: str):
    """aten::_upsample_{bilinear,bicubic}2d_aa (F.interpolate(antialias=True)), which the legacy
    exporter does not map. With static sizes (the fixed-size stems: conv_stem, BEiT) it becomes
    two MatMuls with Pillow's/PyTorch's resampling weights — onnxruntime's Resize(antialias=1)
    differs from them by up to 0.04 on downscaling. A traced output size (timm ViT's position
    embeddings at other sizes: an upsampling) becomes Resize(antialias=1, cubic a = −0.5), which
    agrees with PyTorch when upsampling (antialiasing only acts when downscaling)."""
    from torch.onnx import symbolic_helper as sh

    if sh._maybe_get_const(align_corners, "b"):
        raise CxrError("export: antialiased resize with align_corners=True has no ONNX equivalent")
    size = sh._maybe_get_const(output_size, "is")
    in_hw = (sh._get_tensor_sizes(x) or [None] * 4)[-2:]
    if not sh._is_value(size) and None not in in_hw:
        wh = aa_resize_matrix(in_hw[0], size[0], mode).astype(np.float32)
        ww = aa_resize_matrix(in_hw[1], size[1], mode).astype(np.float32)
        rows = g.op("MatMul", g.op("Constant", value_t=torch.from_numpy(wh)), x)
        return g.op("MatMul", rows, g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(ww.T))))
    nc = g.op(
        "Slice",
        g.op("Shape", x),
        g.op("Constant", value_t=torch.tensor([0])),
        g.op("Constant", value_t=torch.tensor([2])),
    )
    if sh._is_value(size):
        hw = g.op(
            "Cast", g.op("Concat", *[sh._unsqueeze_helper(g, v, [0]) for v in sh._unpack_list(size)], axis_i=0), to_i=7
        )  # int64
    else:
        hw = g.op("Constant", value_t=torch.tensor(list(size), dtype=torch.int64))
    sizes = g.op("Concat", nc, hw, axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    if mode == "cubic":
        return g.op(
            "Resize",
            x,
            empty,
            empty,
            sizes,
            mode_s="cubic",
            antialias_i=1,
            cubic_coeff_a_f=-0.5,
            exclude_outside_i=1,
            coordinate_transformation_mode_s="half_pixel",
        )
    return g.op(
        "Resize", x, empty, empty, sizes, mode_s="linear", antialias_i=1, coordinate_transformation_mode_s="half_pixel"
    )


def _upsample_bilinear_aa(g, x, output_size, align_corners, scale_factors):
    return _resize_aa(g, x, output_size, align_corners, "linear")


def _upsample_bicubic_aa(g, x, output_size, align_corners, scale_factors):
    return _resize_aa(g, x, output_size, align_corners, "cubic")
