"""The one model contract of the suite: a grey image (+ metadata) → multi-label logits.

Every model of the registry is a :class:`CxrClassifier` composed of

    stem  : image [B,1,H,W] → backbone input (identity, learned conv stem, or fixed resize)
    trunk : → final feature map [B,C,h,w]; ``cam_layer`` is the module producing it,
            ``cam_layers`` the stage outputs before it (finer maps for Grad-CAM)
    pool  : → pooled image features [B,C]
    head  : (+ meta) → pre-logits [B,D] → dropout → linear → logits [B,num_labels]

so training, evaluation, CAM/Grad-CAM and embeddings use the same five calls
on any model: ``model(image, meta)``, ``model.features(image)``,
``model.pooled(image, meta)``, ``model.cam_layer``, ``model.classifier_weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrbase.errors import CxrError

from .heads import Head


class CxrClassifier(nn.Module):
    """Grey image [B,1,H,W] float (+ meta [B,meta_dim]) → logits [B,num_labels]; see the module docstring.

    ``pooled_linear`` says the head is GAP + linear on the feature map (CAM
    applies); ``l2_lambda`` > 0 marks the head's hidden dense kernels for an L2 penalty.
    """

    def __init__(
        self,
        *,
        name: str,
        stem: nn.Module,
        trunk: nn.Module,
        cam_layer: nn.Module,
        pool: nn.Module,
        head: Head,
        pooled_linear: bool,
        channels_last: bool = False,
        l2_lambda: float = 0.0,
        cam_layers: tuple[nn.Module, ...] = (),
    ):
        super().__init__()
        self.name = name
        self.stem = stem
        self.trunk = trunk
        self.pool = pool
        self.head = head
        # Kept by name, not as an attribute: an attribute would register the module
        # twice, and a name still resolves after wrappers swap submodules in place.
        self.cam_layer_name = next((n for n, m in self.named_modules() if m is cam_layer), None)
        if self.cam_layer_name is None:
            raise ValueError(f"{name}: cam_layer is not a submodule of the model")
        names = {id(m): n for n, m in self.named_modules()}
        if any(id(m) not in names for m in cam_layers):
            raise ValueError(f"{name}: a cam_layers entry is not a submodule of the model")
        self.cam_layer_names = [*(names[id(m)] for m in cam_layers if m is not cam_layer), self.cam_layer_name]
        self.pooled_linear = pooled_linear
        self.channels_last = channels_last
        self.l2_lambda = float(l2_lambda)

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output is the final feature map (hook it for Grad-CAM)."""
        return self.get_submodule(self.cam_layer_name)

    @property
    def cam_layer_candidates(self) -> list[str]:
        """Names of the modules whose outputs are feature maps a Grad-CAM may use, shallow → deep:
        the stage outputs the family declares (``cam_layers``), then ``cam_layer``. Deeper maps are
        more specific to the labels, shallower ones finer (cxr.tools.explain picks by map size)."""
        return list(self.cam_layer_names)

    @property
    def uses_meta(self) -> bool:
        """True when ``forward``/``pooled`` need ``meta``; other models ignore it."""
        return self.head.uses_meta

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (weight [num_labels, D], bias [num_labels])."""
        return self.head.classifier

    @property
    def classifier_weight(self) -> torch.Tensor | None:
        """[num_labels, C] weights on the feature-map channels when the head is pooled-linear, else None.

        With metadata fusion these are the image columns; the metadata part adds a
        per-sample constant to each logit, so CAM maps are unchanged.
        """
        if not self.pooled_linear:
            return None
        return self.head.classifier.weight[:, : self.head.in_features]

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Final feature map [B,C,h,w] (transformers: patch tokens on their grid)."""
        return self.trunk(self.stem(self._checked(image)))

    def pooled(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate features [B,D]: the input of the final linear layer (for embeddings)."""
        return self.head.pre_logits(self.pool(self.features(image)), meta)

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B,num_labels] for image [B,1,H,W] (any H, W ≥ 32; 224…1024+ intended)."""
        return self.head(self.pool(self.features(image)), meta)

    def l2_params(self) -> tuple[list[nn.Parameter], float]:
        """(weights, λ) that take an explicit L2 penalty λ·Σ w² (Keras ``kernel_regularizer=l2(λ)``).

        Only ``densenet121_cbam`` has any (its dense 128 and 64 kernels, λ = 1e-3);
        other models return ([], 0.0). Training applies it either by adding
        ``model.l2_penalty()`` to the loss, or — equivalently for Adam with coupled
        decay — by putting these weights in their own param group with
        ``weight_decay = 2·λ`` (the gradient of λ·w² is 2λw) and leaving them out
        of the default group (so they are not decayed twice). Biases are not penalised.
        """
        if self.l2_lambda <= 0:
            return [], 0.0
        weights = [m.weight for m in self.head.body.modules() if isinstance(m, nn.Linear)]
        return weights, self.l2_lambda

    def l2_penalty(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """λ·Σ w² over :meth:`l2_params` (a scalar tensor; 0 when the model has none), computed in
        ``dtype`` when given (validation reports it in float32 whatever the weights' precision)."""
        weights, lam = self.l2_params()
        if not weights:
            return self.head.classifier.weight.new_zeros(())
        return lam * sum((w if dtype is None else w.to(dtype)).pow(2).sum() for w in weights)

    def _checked(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 1:
            raise CxrError(
                f"model input: image has shape {tuple(image.shape)}, expected [B,1,H,W] — "
                "the suite takes one grey channel"
            )
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return image
