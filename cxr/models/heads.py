"""Classification heads shared by the suite: metadata fusion, an optional MLP body, the final linear layer.

``pre_logits = body(concat(pooled_image_features, fusion(meta)))`` and
``logits = classifier(dropout(pre_logits))``. Metadata fusion (SPEC: z-scored
age, one-hot sex, one-hot view; ``meta_dim`` = 5 by default):

- ``none``: the image features only;
- ``concat``: the raw metadata vector is concatenated to the pooled features;
- ``mlp``: the metadata goes through a small MLP (meta_dim→32→32, ReLU) first.

Fusing *before* a linear classifier keeps the image part linear, so CAM
(M_c = Σ_k w_{c,k} f_k) still holds with the image columns of the weight; the
metadata then only adds a per-sample constant to each logit.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrbase.errors import CxrError

METADATA_MODES = ("none", "concat", "mlp")
META_HIDDEN = 32


class MetaFusion(nn.Module):
    """meta [B,meta_dim] → [B,out_features] (``out_features`` = 0 for ``none``)."""

    def __init__(self, mode: str, meta_dim: int, hidden: int = META_HIDDEN):
        super().__init__()
        self.mode = mode
        if mode == "mlp":
            self.net = nn.Sequential(
                nn.Linear(meta_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)
            )
            self.out_features = hidden
        else:
            self.net = nn.Identity()
            self.out_features = meta_dim if mode == "concat" else 0

    def forward(self, meta: torch.Tensor) -> torch.Tensor:
        return self.net(meta)


class Head(nn.Module):
    """pooled [B,C] (+ meta [B,m]) → logits [B,num_labels], optionally through hidden dense layers.

    ``hidden`` = (128, 64) gives Linear→ReLU→Dropout(hidden_dropout) per width;
    with no hidden layers the head is pooled-linear (CAM applies). ``dropout``
    acts on the input of the final linear layer.
    """

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        *,
        metadata: str = "none",
        meta_dim: int = 5,
        dropout: float = 0.0,
        hidden: tuple[int, ...] = (),
        hidden_dropout: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.meta_dim = meta_dim
        self.fusion = MetaFusion(metadata, meta_dim)
        width = in_features + self.fusion.out_features
        layers: list[nn.Module] = []
        for out in hidden:
            layers += [nn.Linear(width, out), nn.ReLU(inplace=True), nn.Dropout(hidden_dropout)]
            width = out
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_labels)

    @property
    def uses_meta(self) -> bool:
        return self.fusion.mode != "none"

    def pre_logits(self, pooled: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        """The input of the final linear layer [B,D] (before dropout)."""
        if self.uses_meta:
            pooled = torch.cat([pooled, self.fusion(self._checked(meta, pooled.shape[0]))], dim=1)
        return self.body(pooled)

    def forward(self, pooled: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.drop(self.pre_logits(pooled, meta)))

    def _checked(self, meta: torch.Tensor | None, batch: int) -> torch.Tensor:
        if meta is None:
            raise CxrError(
                f"model input: this model fuses metadata ({self.fusion.mode}) but meta=None — "
                f"pass meta [B,{self.meta_dim}] or build it with metadata='none'"
            )
        if meta.dim() != 2 or tuple(meta.shape) != (batch, self.meta_dim):
            raise CxrError(
                f"model input: meta has shape {tuple(meta.shape)}, expected ({batch}, {self.meta_dim}) — "
                "check meta_dim against the loader's metadata fields"
            )
        return meta.to(self.classifier.weight.dtype)
