"""``vit`` and ``beit`` — vision transformers (timm, base/16) with mean-pooled patch tokens into the head.

Input size (chosen per family, both documented here):

- ``vit``: any size — built with timm's ``dynamic_img_size``, so the learned
  absolute position embeddings (224² grid in the weights) are interpolated
  bicubically to the input's patch grid on every forward (1024² → 64×64 tokens) —
  unless built with ``img_size`` = the input size: then they are resampled once, at
  build/load, and used as they are (needed for ``train.deterministic`` on CUDA). A config
  sets a ViT's ``img_size`` from ``data.resolution`` (:func:`input_size_options`).
  ``global_pool='avg'`` with the final LayerNorm *before* pooling (``fc_norm=False``)
  keeps the usual ViT checkpoint names and makes the head pooled-linear:
  ``classifier_weight`` is valid for CAM over the token grid.
- ``beit``: a fixed input size ``img_size`` (default 224) — BEiT's relative
  position bias tables are tied to one window, so other inputs are resized
  (bilinear, antialiased) to it inside the model. To train at 512², build with
  ``img_size=512``: the tables are sized for it and a 224 checkpoint's tables are
  resized on load by timm's filter (only an explicit ``model.img_size`` does this: the
  tokens, and attention's memory, grow with it). BEiT normalises *after* pooling (its
  ``fc_norm``), so its head is not pooled-linear and ``classifier_weight`` is None.

``features`` returns the patch tokens (after the final norm for ViT, before it
for BEiT, as in each model's pooling) reshaped to [B,D,h,w]; ``cam_layer`` is the
:class:`TokenGrid` producing it. Option ``arch`` selects another timm variant of
the same family (e.g. ``vit_small_patch16_224`` for quick experiments).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cxrbase.errors import CxrError

from .backbones import BuildArgs, GlobalAvgPool, timm_backbone
from .classifier import CxrClassifier
from .heads import Head
from .stem import ConvStem, Resize

VIT_DESCRIPTION = "ViT-B/16, any input size (interpolated position embeddings), mean-pooled tokens"
BEIT_DESCRIPTION = "BEiT-B/16, fixed input size img_size (resized), mean-pooled tokens + fc_norm"
VIT_ARCH = "vit_base_patch16_224"
BEIT_ARCH = "beit_base_patch16_224"
NATIVE_SIZE = 224


class TokenGrid(nn.Module):
    """Tokens [B,prefix+h·w,D] → patch tokens on their grid [B,D,h,w] (the prefix/class tokens dropped)."""

    def __init__(self, num_prefix_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches = tokens[:, self.num_prefix_tokens :]
        b, n, d = patches.shape
        if n != grid[0] * grid[1]:
            raise CxrError(
                f"model input: {n} patch tokens do not fill a {grid[0]}×{grid[1]} grid — "
                "use an input size that is a multiple of the patch size"
            )
        return patches.transpose(1, 2).reshape(b, d, grid[0], grid[1])


class TokenTrunk(nn.Module):
    """A timm transformer's ``forward_features`` with the patch tokens put back on their grid."""

    def __init__(self, backbone: nn.Module, dynamic: bool):
        super().__init__()
        self.backbone = backbone
        self.dynamic = dynamic
        self.to_grid = TokenGrid(backbone.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embed = self.backbone.patch_embed
        grid = embed.dynamic_feat_size(tuple(x.shape[-2:])) if self.dynamic else tuple(embed.grid_size)
        return self.to_grid(self.backbone.forward_features(x), grid)


def _check_arch(arch: str, family: str) -> None:
    import timm

    if not arch.startswith(family) or arch not in timm.list_models(f"{family}*"):
        raise CxrError(
            f"{family}: unknown arch {arch!r} — use a timm {family}_* model name, "
            f"e.g. {VIT_ARCH if family == 'vit' else BEIT_ARCH}"
        )


def build_vit(
    args: BuildArgs, *, arch: str = VIT_ARCH, stem_size: int = NATIVE_SIZE, img_size: int = NATIVE_SIZE
) -> CxrClassifier:
    """ViT (dynamic input size) → norm → mean of patch tokens → (meta fusion) → dropout → linear.

    ``img_size``: the input size whose patch grid the position embeddings are built for (224 weights
    are resampled once, on load, by timm's filter). At that size the forward uses them as they are;
    at any other size they are resampled bicubically in every forward — which has no deterministic
    CUDA backward, so ``train.deterministic`` needs ``img_size`` = the input size
    (:func:`deterministic_input_error`)."""
    from timm.models import vision_transformer as timm_vit  # timm on first build (cxr/models/__init__.py)

    _check_arch(arch, "vit")
    if img_size % 16 or img_size < 16:
        raise CxrError(f"vit: img_size={img_size} — use a multiple of the patch size 16 (e.g. 224, 512, 1024)")
    backbone = timm_backbone(
        arch,
        args,
        convert=timm_vit.checkpoint_filter_fn,
        dynamic_img_size=True,
        global_pool="avg",
        fc_norm=False,
        img_size=img_size,
    )
    if args.grad_checkpointing:
        backbone.set_grad_checkpointing(True)  # per block; no BatchNorm in a transformer
    trunk = TokenTrunk(backbone, dynamic=True)
    head = Head(
        backbone.num_features, args.num_labels, metadata=args.metadata, meta_dim=args.meta_dim, dropout=args.dropout
    )
    stem = ConvStem(stem_size) if args.conv_stem else nn.Identity()
    return CxrClassifier(
        name="vit",
        stem=stem,
        trunk=trunk,
        cam_layer=trunk.to_grid,
        pool=GlobalAvgPool(),
        head=head,
        pooled_linear=True,
        channels_last=args.channels_last,
    )


def deterministic_input_error(options: dict, conv_stem: bool, resolution: int) -> str | None:
    """For ``vit`` in deterministic mode: the problem and its fix when the input size is not the
    position embeddings' (bicubic resample every forward, no deterministic CUDA backward), else None."""
    size = options.get("stem_size", NATIVE_SIZE) if conv_stem else resolution
    built = options.get("img_size", NATIVE_SIZE)
    if size == built:
        return None
    return (
        f"vit at input {size} px with position embeddings for {built} px: they would be resampled "
        f"(bicubic) in every forward, whose CUDA backward is not deterministic — set "
        f"model.options.img_size={size} (resampled once when the model is built)"
    )


def input_size_options(name: str, options: dict, conv_stem: bool, resolution: int) -> dict:
    """``options`` with a ViT's ``img_size`` set to the size it sees, when the config leaves it out.

    The config knows ``data.resolution``; the builder only its options. A ViT whose ``img_size``
    follows the input size gets its position embeddings resampled once, when built or loaded — never
    per forward (no bicubic interpolate, whose CUDA backward is not deterministic); it sees the same
    tokens either way. BEiT is left as it is: it resizes its input to its window (224) inside the
    model, so following the resolution would multiply its tokens (16× at 896, attention 256×) — a
    different model, chosen only by an explicit ``model.img_size``. Kept as they were: an explicit
    ``img_size``; an input of 224 (the builder's default, so configs and hashes of 224 runs do not
    change); a size that is not a multiple of the patch size 16 (reported at the first batch);
    with ``conv_stem`` the size is ``stem_size``."""
    if name != "vit" or "img_size" in options:
        return options
    if conv_stem:
        size = options.get("stem_size", NATIVE_SIZE)
    else:
        size = resolution
    if size == NATIVE_SIZE or size % 16 or size < 32:
        return options
    return {**options, "img_size": int(size)}


def build_beit(args: BuildArgs, *, arch: str = BEIT_ARCH, img_size: int = NATIVE_SIZE) -> CxrClassifier:
    """BEiT (fixed img_size; inputs resized) → mean of patch tokens → fc_norm → (meta fusion) → dropout → linear."""
    from timm.models import beit as timm_beit  # timm on first build (cxr/models/__init__.py)

    _check_arch(arch, "beit")
    if img_size % 16 or img_size < 32:
        raise CxrError(f"beit: img_size={img_size} — use a multiple of the patch size 16 (e.g. 224, 512)")
    backbone = timm_backbone(arch, args, convert=timm_beit.checkpoint_filter_fn, img_size=img_size, global_pool="avg")
    # Pooling then fc_norm is this model's pooling; moving the (already loaded)
    # norm out of the backbone lets features() stop at the token grid.
    pool = nn.Sequential(GlobalAvgPool(), backbone.fc_norm)
    backbone.fc_norm = nn.Identity()
    if args.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    trunk = TokenTrunk(backbone, dynamic=False)
    head = Head(
        backbone.num_features, args.num_labels, metadata=args.metadata, meta_dim=args.meta_dim, dropout=args.dropout
    )
    stem = nn.Sequential(ConvStem(img_size) if args.conv_stem else nn.Identity(), Resize(img_size))
    return CxrClassifier(
        name="beit",
        stem=stem,
        trunk=trunk,
        cam_layer=trunk.to_grid,
        pool=pool,
        head=head,
        pooled_linear=False,
        channels_last=args.channels_last,
    )


def fit_position_embeddings(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``saved`` with a ViT's position embeddings resampled to ``model``'s grid where only their token
    count differs: the weights of a ViT built before its ``img_size`` followed ``data.resolution``
    (224 grid, resampled in every forward) load into the model built for the input size now. timm's
    per-forward path and this call are the same ``resample_abs_pos_embed`` (bicubic, antialiased),
    so the loaded model computes what the saved one did. timm is imported only for such a ViT: every
    checkpoint load passes here, and timm brings torchvision and torch._dynamo (~1.7 s on a CPU core)."""
    own, out = model.state_dict(), dict(saved)
    for key, value in saved.items():
        mine = own.get(key)
        if not key.endswith("pos_embed") or mine is None or value.ndim != 3 or mine.shape == value.shape:
            continue
        if mine.ndim != 3 or mine.shape[2] != value.shape[2]:  # another width: a different model
            continue
        for prefix in (1, 0):  # a class token, or none
            new, old = math.isqrt(mine.shape[1] - prefix), math.isqrt(value.shape[1] - prefix)
            if new * new == mine.shape[1] - prefix and old * old == value.shape[1] - prefix:
                from timm.layers import resample_abs_pos_embed

                out[key] = resample_abs_pos_embed(value, new_size=[new, new], num_prefix_tokens=prefix)
                break
    return out
