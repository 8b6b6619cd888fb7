"""A loader batch's image on the device: the one place where handed-over pixels become the model's input.

The loaders hand over uint8 pixels (``batch["image"]`` uint8 [B, 1, R, R], after the affine warp when
augmenting) plus, in augmented training, the per-sample intensity parameters (``batch["brightness"]``,
``batch["contrast"]``, float32 [B]) and the loader's ``data.mean`` / ``data.std``
(``batch["norm"]``). :func:`to_device` copies those bytes to the device and runs the float steps
of the pixel path there (cxr/data/augmentation.py):

    x = pixel / 255 → [augmented] y = clip(b · (0.5 + c · (x − 0.5)), 0, 1) → (y − mean) / std

So a pinned batch is 1 byte per pixel instead of 4, the host→device copy carries 4× fewer
bytes, and the float arithmetic runs on the device rather than on the training thread or a
loader worker. The float ops and their order are those the wds collate step ran before
(in place on float32, scalars rounded to float32), so on the CPU the result is bitwise the
float batch that step produced.

A batch whose image is already floating point is taken as normalised and only moved: DALI's
``mixed`` pipeline (``data.device=gpu``) keeps normalising (and applying the intensity step)
on the GPU inside its graph, because its output already lies in device memory — there is no
pinned host copy and no bus transfer to shrink, and handing uint8 over there would only move
the same float stage from DALI's allocator into torch's. In-memory loaders of tests and
benchmarks that yield normalised float images pass through the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cxr.data.config import normalise_


def to_device(batch: Mapping[str, Any], device: Any) -> Any:
    """float32 [B, 1, R, R] of ``batch["image"]`` on ``device``, normalised (see the module doc).

    Copies are non_blocking: from a pinned batch the host→device copy overlaps the previous
    step's kernels on a GPU; on the CPU nothing is copied but the uint8 → float32 conversion."""
    import torch

    image = batch["image"]
    if image.is_floating_point():  # normalised already (DALI mixed, in-memory loaders)
        return image.to(device, non_blocking=True)
    mean, std = batch["norm"]
    x = image.to(device, non_blocking=True).to(torch.float32)
    if "brightness" not in batch:
        return normalise_(x, mean, std)
    bright = batch["brightness"].to(device, non_blocking=True).view(-1, 1, 1, 1)
    contrast = batch["contrast"].to(device, non_blocking=True).view(-1, 1, 1, 1)
    # the intensity step of augmentation.py, in place on the whole batch: clip(b · (0.5 + c · (x/255 − 0.5)), 0, 1)
    x.mul_(1 / 255).sub_(0.5).mul_(contrast).add_(0.5).mul_(bright).clamp_(0.0, 1.0)
    return x.sub_(mean).div_(std)
