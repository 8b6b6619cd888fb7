"""The model suite of SPEC.md behind one registry: ``build_model(name, ...)``.

    from cxr.models import build_model, MODEL_NAMES
    model = build_model("densenet121", 14, pretrained="weights/densenet121.pth")
    logits = model(image, meta=None)         # image [B,1,H,W] float → [B,14]
    fmap = model.features(image)             # [B,C,h,w] final feature map
    emb = model.pooled(image, meta=None)     # [B,D] input of the final linear layer
    model.cam_layer, model.classifier_weight, model.uses_meta, model.l2_params()

Every model is a :class:`~cxr.models.classifier.CxrClassifier`; the families
live in densenet.py, cbam.py, resnet.py, transformer.py and cnn.py. Nothing is
downloaded: backbones are built with random init and ``pretrained`` is a local
state-dict path (see weights.py). ``python -m cxr.models list`` prints the suite.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cxrbase.errors import CxrError

from .backbones import BuildArgs
from .classifier import CxrClassifier
from .heads import METADATA_MODES

__all__ = ["MODEL_NAMES", "REGISTRY", "build_model", "CxrClassifier", "count_parameters", "ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the family module and its builder, the module's description constant, and the
    family's own options with their types.

    The family module is imported when a model of it is first built, not with the package: timm (and
    torchvision and torch._dynamo with it) is ~1.6 s of import per process here, which a ``cnn`` or
    ``ood_ae`` run, and every command that builds no model, never needs."""

    module: str
    function: str
    description_name: str
    options: dict[str, type]

    @property
    def builder(self) -> Callable[..., CxrClassifier]:
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.function)

    @property
    def description(self) -> str:
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.description_name)


REGISTRY: dict[str, ModelSpec] = {
    "densenet121": ModelSpec("densenet", "build", "DESCRIPTION", {"stem_size": int}),
    "densenet121_cbam": ModelSpec("cbam", "build", "DESCRIPTION", {"head_dropout": float, "stem_size": int}),
    "resnet50": ModelSpec("resnet", "build", "DESCRIPTION", {"stem_size": int}),
    "beit": ModelSpec("transformer", "build_beit", "BEIT_DESCRIPTION", {"arch": str, "img_size": int}),
    "vit": ModelSpec("transformer", "build_vit", "VIT_DESCRIPTION", {"arch": str, "stem_size": int, "img_size": int}),
    "cnn": ModelSpec("cnn", "build", "DESCRIPTION", {"stem_size": int, "width": int}),
    # not a classifier: the OOD gate's autoencoder (ood_ae.py; the gate is cxr/tools/ood.py), trained with loss.name=ssim_recon
    "ood_ae": ModelSpec("ood_ae", "build", "DESCRIPTION", {"width": int, "code": int}),
}
# the classifier suite (CxrClassifier: logits [B,14]); ood_ae is built by name but is not a classifier
MODEL_NAMES: tuple[str, ...] = tuple(name for name in REGISTRY if name != "ood_ae")


def build_model(
    name: str,
    num_labels: int = 14,
    *,
    pretrained: str | Path | None = None,
    metadata: str = "none",
    meta_dim: int = 5,
    conv_stem: bool = False,
    grad_checkpointing: bool = False,
    channels_last: bool = False,
    dropout: float = 0.0,
    **options,
) -> CxrClassifier:
    """Build model ``name`` of :data:`MODEL_NAMES` with random init or local ``pretrained`` backbone weights.

    image [B,1,H,W] float (H=W from 224 to 1024 and above) and, when
    ``metadata`` is ``concat``/``mlp``, meta [B,meta_dim] → logits [B,num_labels].
    ``conv_stem`` puts the learned 1→32→16→3 stem in front (full-resolution
    input); ``grad_checkpointing`` recomputes activations in backward;
    ``channels_last`` converts the memory format (a GPU speed switch);
    ``dropout`` acts on the input of the final linear layer. Family options:
    see ``REGISTRY[name].options``. Invalid names/values raise CxrError.
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise CxrError(f"model {name!r}: unknown — choose one of {', '.join(MODEL_NAMES)}")
    args = BuildArgs(
        num_labels=num_labels,
        pretrained=pretrained,
        metadata=metadata,
        meta_dim=meta_dim,
        conv_stem=conv_stem,
        grad_checkpointing=grad_checkpointing,
        channels_last=channels_last,
        dropout=dropout,
    )
    _check_common(name, args)
    _check_options(name, spec, options)
    model = spec.builder(args, **options)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_common(name: str, args: BuildArgs) -> None:
    """Raise CxrError for an invalid common option, naming the valid values."""
    if not isinstance(args.num_labels, int) or isinstance(args.num_labels, bool) or args.num_labels < 1:
        raise CxrError(f"model {name}: num_labels={args.num_labels!r} — use a positive integer (14 for NIH)")
    if args.metadata not in METADATA_MODES:
        raise CxrError(f"model {name}: metadata={args.metadata!r} — choose one of {', '.join(METADATA_MODES)}")
    if not isinstance(args.meta_dim, int) or isinstance(args.meta_dim, bool) or args.meta_dim < 1:
        raise CxrError(f"model {name}: meta_dim={args.meta_dim!r} — use a positive integer (5: age, sex×2, view×2)")
    if not isinstance(args.dropout, (int, float)) or not 0.0 <= args.dropout < 1.0:
        raise CxrError(f"model {name}: dropout={args.dropout!r} — use a value in [0, 1)")
    for flag in ("conv_stem", "grad_checkpointing", "channels_last"):
        if not isinstance(getattr(args, flag), bool):
            raise CxrError(f"model {name}: {flag}={getattr(args, flag)!r} — use true or false")
    if args.pretrained is not None and not isinstance(args.pretrained, (str, Path)):
        raise CxrError(f"model {name}: pretrained={args.pretrained!r} — use a local weights path or None")


def _check_options(name: str, spec: ModelSpec, options: dict) -> None:
    """Raise CxrError for a family option that does not exist or has the wrong type."""
    for key, value in options.items():
        if key not in spec.options:
            valid = ", ".join(spec.options) or "none"
            raise CxrError(f"model {name}: unknown option {key!r} — options of {name}: {valid}")
        kind = spec.options[key]
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
            raise CxrError(f"model {name}: {key}={value!r} — expected {kind.__name__}")
        if key in ("stem_size", "img_size") and value < 32:
            raise CxrError(f"model {name}: {key}={value} — use a size of at least 32 (224 is the native size)")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
