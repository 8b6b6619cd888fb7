"""``python -m cxr.models list``: each model's name, parameter count (14 labels) and a one-line description.

``python -m cxr.models download NAME...`` fetches the ImageNet weights that
``model.pretrained=imagenet`` loads into the local Hugging Face cache (run it on a
machine with internet, e.g. a login node, with the HF_HOME/HF_HUB_CACHE the
compute nodes will see). NAME is a model of the suite or a timm architecture
(e.g. ``vit_small_patch16_224`` for ``vit arch=...``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cxrbase.errors import CxrError, cli_entry

from . import MODEL_NAMES, REGISTRY, build_model, count_parameters
from .weights import download_imagenet, hub_cache, imagenet_repo


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr.models", description="The cxr model suite (--debug shows tracebacks of errors)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="print name, parameter count and description of every model")
    listing.add_argument("--num-labels", type=int, default=14, help="outputs of the head (default 14)")
    fetch = sub.add_parser(
        "download",
        help="fetch ImageNet weights for model.pretrained=imagenet into the HF cache",
        description="Fetch the timm ImageNet weights of each NAME (a suite model or a timm "
        "architecture) into the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub); "
        "training then finds them offline with model.pretrained=imagenet.",
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(MODEL_NAMES)} or a timm arch")
    return parser.parse_args(argv)


def backbone_arch(name: str) -> str:
    """The timm architecture whose ImageNet weights model ``name`` (or timm arch ``name``) loads."""
    import timm

    from .transformer import BEIT_ARCH, VIT_ARCH

    archs = {
        "densenet121": "densenet121",
        "densenet121_cbam": "densenet121",
        "resnet50": "resnet50",
        "beit": BEIT_ARCH,
        "vit": VIT_ARCH,
    }
    if name in archs:
        return archs[name]
    if name == "cnn":
        raise CxrError("cnn: trained from scratch, it has no ImageNet weights — nothing to download")
    if not timm.list_models(name):
        raise CxrError(
            f"{name}: neither a model of the suite nor a timm architecture — use one of "
            f"{', '.join(MODEL_NAMES)} or a timm name such as vit_small_patch16_224"
        )
    return name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "list":
        width = max(map(len, MODEL_NAMES))
        for name in MODEL_NAMES:
            params = count_parameters(build_model(name, args.num_labels))
            options = ", ".join(REGISTRY[name].options)
            print(f"{name:<{width}}  {params / 1e6:7.2f} M  {REGISTRY[name].description}  [options: {options}]")
    if args.command == "download":
        for name in args.names:
            arch = backbone_arch(name)
            path = download_imagenet(arch)
            print(f"{name}: {imagenet_repo(arch)} → {path}")
        print(f"downloaded {len(args.names)} weight file(s) into {hub_cache()}; train with model.pretrained=imagenet")
    return 0


cli = cli_entry(main)  # the `cxr-models` console script

if __name__ == "__main__":
    raise SystemExit(cli())
