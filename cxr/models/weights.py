"""Loading local pretrained backbone weights into a 1-channel (or conv-stem) backbone.

Nothing here downloads: ``pretrained`` is a path to a torchvision or timm state
dict (``.pth``/``.pt`` read with ``torch.load(weights_only=True)``, or
``.safetensors``), or ``"imagenet"``: timm's ImageNet weights of the backbone
from the local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
default ``~/.cache/huggingface/hub``), put there beforehand by
``python -m cxr.models download NAME`` on a machine with internet. Sources:
densenet121 and densenet121_cbam ``timm/densenet121.tv_in1k`` (torchvision's
weights), resnet50 ``timm/resnet50.a1_in1k``, beit
``timm/beit_base_patch16_224.in22k_ft_in22k_in1k``, vit
``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`` (another ``arch`` option:
timm's default tag of that arch); cnn has none. The 3-channel first convolution of an ImageNet checkpoint is
adapted to a grey input by summing its weights over the input channels, which
gives the same output for a grey image replicated to RGB.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from cxrbase.errors import CxrError

WEIGHTS_HINT = (
    "put a torchvision/timm state dict (.pth/.pt/.safetensors) at that path — e.g. on a machine "
    "with internet: `torch.save(torchvision.models.densenet121(weights='DEFAULT').state_dict(), path)` "
    "or `timm.create_model(name, pretrained=True)` then save its state_dict — or pass pretrained=None "
    "for random init"
)
# Old torchvision DenseNet checkpoints name layers "norm.1", "conv.2", ...
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state")
_SHOW = 5


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict (.pth/.pt/.safetensors), unwrapping {"state_dict"|"model": ...} and "module." prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: pretrained weights file not found — {WEIGHTS_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (unreadable, or pickled objects beyond tensors)
        # torch's message ends in advice to use weights_only=False: show its reason only
        raise CxrError(
            f"{path}: cannot read as a state dict ({load_error_line(err)}) — do not load it with "
            f"weights_only=False; {WEIGHTS_HINT}"
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state:
        raise CxrError(f"{path}: holds no state dict (got {type(state).__name__}) — {WEIGHTS_HINT}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CxrError(f"{path}: entries that are not tensors: {bad[:_SHOW]} — save model.state_dict(), not the model")
    return {_strip_prefix(k): v for k, v in state.items()}


def _strip_prefix(key: str) -> str:
    # DataParallel/DDP checkpoints carry a "module." prefix.
    return key[len("module.") :] if key.startswith("module.") else key


def adapt_first_conv(weight: torch.Tensor, in_chans: int, *, where: str) -> torch.Tensor:
    """Adapt a first-conv weight [O, I, kh, kw] to ``in_chans`` inputs; 3→1 sums over the input channels."""
    have = weight.shape[1]
    if have == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    raise CxrError(
        f"{where}: first conv has {have} input channels, model needs {in_chans} — use a 1- or {in_chans}-channel checkpoint"
    )


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    *,
    first_conv: str,
    head_prefixes: tuple[str, ...],
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
) -> int:
    """Load a local checkpoint into ``backbone`` strictly (except its ImageNet head); return tensors loaded.

    ``first_conv`` is the module path of the input convolution (adapted to the
    backbone's channel count); keys under ``head_prefixes`` are the checkpoint's
    classifier and are dropped since the cxr head replaces it; ``convert`` is an
    optional family filter (timm's position-embedding / bias-table resizing).
    """
    state = read_state_dict(path)
    state = {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(p + "." for p in head_prefixes))}
    conv_key = first_conv + ".weight"
    target = backbone.state_dict()
    if conv_key in state and conv_key in target:
        state[conv_key] = adapt_first_conv(state[conv_key], target[conv_key].shape[1], where=str(path))
    if convert is not None:
        state = convert(state, backbone)
    _check_keys(path, state, target)
    backbone.load_state_dict(state, strict=False)
    return len(state)


def _check_keys(path: str | Path, state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> None:
    """Raise a CxrError listing a few missing / unexpected / mis-shaped keys, if any."""
    # BatchNorm recreates num_batches_tracked when a pre-2018 checkpoint lacks it.
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {tuple(v.shape)}≠{tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:_SHOW])})")
    if problems:
        raise CxrError(
            f"{path}: checkpoint does not fit this backbone: {'; '.join(problems)} — "
            "check that the file is the state dict of the same architecture (torchvision or timm naming)"
        )


# --- ImageNet weights from the Hugging Face cache (timm's own hub repos) ---------------------------
IMAGENET = "imagenet"
"""``pretrained="imagenet"``: the timm ImageNet weights of the backbone, read from the local HF cache."""
# The tag per timm architecture; others use timm's default tag. densenet121 takes
# torchvision's weights (the CheXNet starting point), converted to timm names by timm.
IMAGENET_TAGS = {"densenet121": "densenet121.tv_in1k"}
WEIGHTS_FILE = "model.safetensors"


def imagenet_tag(arch: str) -> str:
    """The timm ``arch.tag`` whose ImageNet weights ``pretrained=imagenet`` loads (e.g. ``resnet50.a1_in1k``)."""
    import timm

    if arch in IMAGENET_TAGS:
        return IMAGENET_TAGS[arch]
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        raise CxrError(
            f"{arch}: timm has no ImageNet weights on the Hugging Face hub for it — "
            "pass model.pretrained=/path/to/weights or null"
        )
    return cfg.hf_hub_id.split("/", 1)[1]


def imagenet_repo(arch: str) -> str:
    """The Hugging Face repo id of ``arch``'s ImageNet weights (``timm/densenet121.tv_in1k``)."""
    return f"timm/{imagenet_tag(arch)}"


def hub_cache() -> Path:
    """The Hugging Face hub cache dir, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def imagenet_weights_path(arch: str) -> Path:
    """The cached ``model.safetensors`` of ``arch``'s ImageNet weights; never downloads.

    Looked up with ``huggingface_hub.try_to_load_from_cache`` (a cache lookup, no
    network) in the layout the hub client writes:
    ``HUB_CACHE/models--timm--TAG/snapshots/REV/model.safetensors`` with
    ``refs/main`` naming REV. Missing: a CxrError naming the download command.
    """
    from huggingface_hub import try_to_load_from_cache

    repo = imagenet_repo(arch)
    cache = hub_cache()
    found = try_to_load_from_cache(repo, WEIGHTS_FILE, cache_dir=cache)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    where = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "<rev>" / WEIGHTS_FILE
    raise CxrError(
        f"{where}: ImageNet weights of {arch} ({repo}) are not cached and training never downloads — "
        f"on a machine with internet and the same HF_HOME/HF_HUB_CACHE run "
        f"`python -m cxr.models download {arch}`, or pass model.pretrained=/path/to/weights or null"
    )


def download_imagenet(arch: str) -> Path:
    """Fetch ``arch``'s ImageNet weights into the hub cache with ``huggingface_hub.hf_hub_download``."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(imagenet_repo(arch), WEIGHTS_FILE, cache_dir=hub_cache()))


def load_error_line(err: BaseException) -> str:
    """The informative line of a load error: torch's weights-only refusal puts the offending global
    ("Trying to load unsupported GLOBAL posix.system ...") after its advice to disable the check."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):  # the reason is a later line
        lines = [ln for ln in lines[1:] if "weights_only" not in ln and "torch.load" not in ln] or ["refused"]
    why = lines[0].replace("WeightsUnpickler error: ", "") if lines else ""
    return f"{type(err).__name__}: {why}"[:160] if why else type(err).__name__
