"""The OOD gate's autoencoder (model.name=ood_ae): a small conv autoencoder whose ``forward`` returns
the per-image 1 − SSIM(image, reconstruction) [B, 1], so the ordinary training loop trains it with
loss.name=ssim_recon. It lives with the other models (cxr.models builds it by name); the gate that
scores images with it — features, feature model, threshold, CLI — is cxr.tools.ood.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrbase.errors import CxrError

DESCRIPTION = "OOD gate: conv autoencoder, forward returns 1 - SSIM(x, recon) [B,1] (cxr/models/ood_ae.py)"


def ssim_score(x01: torch.Tensor, y01: torch.Tensor) -> torch.Tensor:
    """[B] 1 − SSIM of grey images in [0, 1], [B,1,H,W] each (H, W ≥ 11)."""
    from pytorch_msssim import ssim

    return 1.0 - ssim(x01, y01, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)


def _block(c_in: int, c_out: int, down: bool) -> nn.Sequential:
    conv = (
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
        if down
        else nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    )
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


class OodAutoencoder(nn.Module):
    """image [B,1,H,W] normalised as the loader does ((x/255 − mean)/std), H = W divisible by 16
    → score [B,1] = 1 − SSIM(x, recon) in [0, 2]; :meth:`reconstruct` gives the image in [0, 1]."""

    uses_meta = False

    def __init__(self, width: int = 16, code: int = 16, mean: float = 0.5176, std: float = 0.2542):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            _block(1, w, True),
            _block(w, 2 * w, True),
            _block(2 * w, 4 * w, True),
            nn.Conv2d(4 * w, code, 4, stride=2, padding=1),
        )
        self.decoder = nn.Sequential(
            _block(code, 4 * w, False),
            _block(4 * w, 2 * w, False),
            _block(2 * w, w, False),
            nn.ConvTranspose2d(w, 1, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )
        self.register_buffer("norm", torch.tensor([mean, std], dtype=torch.float32), persistent=False)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the loader's normalisation: [0, 1] intensities (clamped; augmentation may overshoot)."""
        return (x * self.norm[1] + self.norm[0]).clamp(0.0, 1.0)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(self.to_unit(x)))

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise CxrError(
                f"ood_ae: input {tuple(x.shape)} — H and W must be multiples of 16 (data.resolution=64 or 128)"
            )
        x01 = self.to_unit(x)
        return ssim_score(x01, self.decoder(self.encoder(x01))).unsqueeze(1)


def build(args, width: int = 16, code: int = 16) -> OodAutoencoder:
    """Registry builder (cxr.models): the classifier options (num_labels, metadata …) do not apply."""
    if args.metadata != "none" or args.conv_stem or args.pretrained:
        raise CxrError(
            "model.name=ood_ae: metadata, conv_stem and pretrained do not apply — leave them at their defaults"
        )
    return OodAutoencoder(width=width, code=code)
