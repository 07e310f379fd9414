"""Variational autoencoder on 2D axial slices (Kingma & Welling 2014; Baur et al. 2021).

Same encoder/decoder as the ``ae`` with a Gaussian latent. Loss: the masked MSE of the
reconstruction plus ``kl_weight`` times the KL divergence to N(0, I), averaged over batch and
latent dimensions (so ``kl_weight`` does not scale with ``latent``). At inference the decoder
reconstructs from the posterior mean; nothing is sampled.

A small custom network rather than MONAI's ``VarAutoEncoder``: that one decodes ``mu + std``
in eval mode unless its recent ``use_mean_at_inference`` flag is set (absent from older MONAI
releases that our requirement ``monai>=1.4`` admits), and samples without our control.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ae import AEModel, ConvDecoder, ConvEncoder, bottom_shape, halving_factor
from .base import register
from .slice_model import SliceModel

LOGVAR_CLAMP = (-20.0, 10.0)


class SliceVAE(nn.Module):
    """forward(x) → (recon, mu, logvar); z ~ N(mu, exp(logvar)) in training, z = mu in eval."""

    def __init__(self, in_channels: int, channels: list[int], latent: int,
                 bottom: tuple[int, int]):
        super().__init__()
        self.encoder = ConvEncoder(in_channels, channels)
        flat = channels[-1] * bottom[0] * bottom[1]
        self.mu = nn.Linear(flat, latent)
        self.logvar = nn.Linear(flat, latent)
        self.decoder = ConvDecoder(in_channels, channels, latent, bottom)

    def forward(self, x: torch.Tensor):
        h = self.encoder(x)
        mu = self.mu(h)
        logvar = self.logvar(h).clamp(*LOGVAR_CLAMP)
        if self.training:
            # Global RNG: the trainer reseeds it every epoch, so resumed runs repeat.
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return self.decoder(z), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), mean over batch and latent dimensions."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * torch.mean(mu.pow(2) + logvar.exp() - 1.0 - logvar)


@register
class VAEModel(SliceModel):
    """Variational bottleneck autoencoder; anomalies are what the posterior mean cannot restore."""

    type_name = "vae"
    defaults = {**AEModel.defaults, "kl_weight": 1e-3}

    def __init__(self, contrasts, shape, hparams=None):
        super().__init__(contrasts, shape, hparams)
        hp = self.hparams
        bottom = bottom_shape(hp["crop"], hp["channels"], self.type_name)
        self.net = SliceVAE(len(self.contrasts), list(hp["channels"]), int(hp["latent"]), bottom)

    def crop_multiple(self) -> tuple[int, str]:
        return halving_factor(self.hparams["channels"])

    def loss_fn(self, out, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = out
        mse = F.mse_loss(recon.float() * mask, clean * mask)
        return mse + float(self.hparams["kl_weight"]) * kl_divergence(mu, logvar)

    def _forward_recon(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]
