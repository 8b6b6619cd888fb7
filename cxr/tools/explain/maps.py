"""Heat maps: CAM, Grad-CAM (captum's LayerGradCam) and saliency (captum's Saliency), the
default Grad-CAM layer chosen by map size, and bilinear upsampling. Every map is [B, L, h, w],
clipped at 0 (the methods are described in cxr.tools.explain)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cxrbase.errors import CxrError

METHODS = ("cam", "gradcam", "saliency")
SALIENCY_MICRO_BATCH = 4
"""Images per saliency backward: each keeps the whole model's activations at full resolution and
in fp32 (~2.6 GB per 1024² image for DenseNet-121), whatever the evaluation batch size."""
METHOD_NAMES = {"cam": "CAM", "gradcam": "Grad-CAM", "saliency": "saliency"}


def _extra(meta: Any) -> tuple | None:
    return (meta,) if meta is not None else None


def cam_maps(model: Any, image: Any, labels: Sequence[int], meta: Any = None) -> Any:
    """CAM M_c = Σ_k w_{c,k} f_k: [B,len(labels),h,w] (unclipped) on the final feature map."""
    import torch

    weight = model.classifier_weight
    if weight is None:
        raise CxrError(
            f"model {model.name}: the head is not pooled-linear, so CAM is undefined — "
            "use --method gradcam (works for every model of the suite)"
        )
    with torch.no_grad():
        return torch.einsum("bkhw,lk->blhw", model.features(image), weight[list(labels)])


def gradcam_maps(
    model: Any, image: Any, labels: Sequence[int], meta: Any = None, relu: bool = True, layer: str | None = None
) -> Any:
    """Grad-CAM on the named layer (default ``model.cam_layer``): [B,len(labels),h,w];
    relu=False keeps the signed sum Σ α_k f_k."""
    import torch
    from captum.attr import LayerGradCam

    method = LayerGradCam(model, model.get_submodule(layer) if layer else model.cam_layer)
    with torch.enable_grad():
        maps = [
            method.attribute(image, target=int(c), additional_forward_args=_extra(meta), relu_attributions=relu)
            for c in labels
        ]
    return torch.cat(maps, dim=1).detach()


def saliency_map(model: Any, image: Any, labels: Sequence[int], meta: Any = None) -> Any:
    """max(0, Σ_{i∈labels} ∂y_i/∂I) for input image I [B,1,H,W] → [B,1,H,W] (y: logits)."""
    import torch
    from captum.attr import Saliency

    index = list(labels)

    def summed(x, *extra):
        return model(x, *extra)[:, index].sum(dim=1, keepdim=True)

    image = image.detach().requires_grad_(True)
    with torch.enable_grad():
        grad = Saliency(summed).attribute(image, target=0, abs=False, additional_forward_args=_extra(meta))
    return grad.detach().clamp(min=0)


def heat_maps(
    method: str, model: Any, image: Any, labels: Sequence[int], meta: Any = None, layer: str | None = None
) -> Any:
    """The method's maps [B,len(labels),h,w] at their native size (saliency: the input's), clipped at 0;
    ``layer``: Grad-CAM's layer (default: the final map)."""
    import torch

    if method == "cam":
        return cam_maps(model, image, labels, meta).clamp(min=0)
    if method == "gradcam":
        return gradcam_maps(model, image, labels, meta, layer=layer)
    if method == "saliency":  # a full backward per label: micro-batched (32 images at 1024² would need ~85 GB)
        chunks = range(0, image.shape[0], SALIENCY_MICRO_BATCH)
        return torch.cat(
            [
                torch.cat(
                    [
                        saliency_map(
                            model,
                            image[i : i + SALIENCY_MICRO_BATCH],
                            [c],
                            None if meta is None else meta[i : i + SALIENCY_MICRO_BATCH],
                        )
                        for c in labels
                    ],
                    dim=1,
                )
                for i in chunks
            ],
            dim=0,
        )
    raise CxrError(f"--method {method}: unknown — choose one of {', '.join(METHODS)}")


EMPTY_MEANING = (
    "no positive evidence for the label anywhere in the image: every Grad-CAM weight × "
    "activation sum, CAM value or input gradient is ≤ 0 before the clip at 0"
)
MIN_MAP = 16  # the default layer is the deepest whose map is at least this many cells a side


def layer_map_sizes(model: Any, resolution: int, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(h, w) of each named layer's output map for an R×R input: one no-grad forward with hooks.

    A name that is not a module of the model, or whose output is not a map [B,C,h,w], is an error."""
    import torch

    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise CxrError(
                f"--layer {name}: model {model.name} has no such module — choose one of "
                f"{', '.join(model.cam_layer_candidates)} (or another module name of the model)"
            ) from err

        def hook(_module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                sizes[name] = (int(output.shape[-2]), int(output.shape[-1]))

        handles.append(module.register_forward_hook(hook))
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.features(torch.zeros(1, 1, resolution, resolution, dtype=param.dtype, device=param.device))
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        if name not in sizes:
            raise CxrError(
                f"--layer {name}: its output is not a feature map [B,C,h,w] — choose one of "
                f"{', '.join(model.cam_layer_candidates)}"
            )
    return sizes


def choose_layer(
    model: Any, method: str, resolution: int, layer: str | None = None, min_map: int = MIN_MAP
) -> tuple[str | None, tuple[int, int] | None, str]:
    """The layer a method's maps come from at R×R: (name, (h, w), why), said in the output.

    Grad-CAM, by default: the deepest of ``model.cam_layer_candidates`` whose map has at least
    ``min_map`` cells a side (deeper maps are more specific to the labels, but a map of a few
    cells puts every peak on a coarse cell centre — the cnn's final map is 4×4 at 128 px, so the
    peak cannot fall in a small lesion's box); when none is that fine, the finest one. CAM is
    defined on the final map only; saliency is on the input (no layer).
    """
    if method == "saliency":
        if layer:
            raise CxrError(
                f"--layer {layer}: saliency is the gradient on the input image and has no layer — "
                "drop --layer, or use --method gradcam"
            )
        return None, None, "the gradient on the input image"
    candidates = model.cam_layer_candidates
    if method == "cam":
        if layer and layer != model.cam_layer_name:
            raise CxrError(
                f"--layer {layer}: CAM weighs the final map ({model.cam_layer_name}) by the classifier "
                "and is undefined on other layers — use --method gradcam for another layer"
            )
        size = layer_map_sizes(model, resolution, [model.cam_layer_name])[model.cam_layer_name]
        return model.cam_layer_name, size, "CAM is defined on the final map only"
    if layer:
        return layer, layer_map_sizes(model, resolution, [layer])[layer], "chosen with --layer"
    sizes = layer_map_sizes(model, resolution, candidates)
    fine = [n for n in candidates if min(sizes[n]) >= min_map]
    if fine:
        name = fine[-1]
        why = (
            f"the deepest of {len(candidates)} candidate layers with a map ≥ {min_map}×{min_map} "
            f"(final map {'×'.join(map(str, sizes[candidates[-1]]))})"
            if len(candidates) > 1
            else f"the model's only map ({model.name}: the last block's token grid)"
        )
        if name == candidates[-1] and len(candidates) > 1:
            why = f"the final map, already ≥ {min_map}×{min_map}"
        return name, sizes[name], why
    name = max(candidates, key=lambda n: (min(sizes[n]), candidates.index(n)))  # finest, then deepest
    why = (
        f"no candidate map is ≥ {min_map}×{min_map} at {resolution} px; the finest of {len(candidates)}"
        if len(candidates) > 1
        else f"the model's only map ({model.name}), coarser than {min_map}×{min_map}"
    )
    return name, sizes[name], why


def upsample(maps: Any, size: tuple[int, int]) -> Any:
    """Bilinear resize of maps [B,L,h,w] to size (H, W), float32, with half-pixel centres
    (``align_corners=False``): cell (i, j) of an h×w map over an H×W image is centred at pixel
    position ((i + ½)·H/h, (j + ½)·W/w) — the centre of the block of pixels it pools, as for the
    stride-s blocks of a CNN — and the map is held constant beyond the outer cell centres.
    (``align_corners=True`` would pin the outer cells' centres to the image's corner pixels,
    shifting every peak towards the border by up to half a cell.)"""
    import torch.nn.functional as F

    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
