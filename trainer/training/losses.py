"""Noise, timesteps, targets and the element loss, shared by every mode (SPEC.md §4.0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_timesteps(batch: int, lo: int, hi: int, *, fixed_in_batch: bool, device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform integer timesteps in ``[lo, hi)``; one shared value when ``fixed_in_batch``."""
    n = 1 if fixed_in_batch else batch
    t = torch.randint(lo, hi, (n,), device="cpu", generator=generator)
    if fixed_in_batch:
        t = t.expand(batch)
    return t.to(device).long()


def make_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``offset`` adds a per-channel constant (noise offset)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if offset:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + offset * shift.to(latents.device, latents.dtype)
    return noise


def training_target(scheduler, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (eps models) or v (v-prediction models)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) per timestep."""
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac)


def element_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-element loss in fp32: ``MSE``, ``L1`` or ``Smooth-L1`` (Huber, beta 1)."""
    pred, target = pred.float(), target.float()
    if kind == "MSE":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "L1":
        return F.l1_loss(pred, target, reduction="none")
    if kind == "Smooth-L1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    raise ValueError(f"train_loss_function: {kind!r} is not known; use MSE, L1 or Smooth-L1")


def diffusion_loss(pred, target, timesteps, *, scheduler, kind: str = "MSE", snr_gamma: float = 0.0,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the per-sample loss, with optional min-SNR weighting and mask.

    The per-sample loss is the mean over (C, H, W); with a ``mask`` (1 where the loss counts,
    broadcast over the channels) it is the mean over the masked area, so a small mask does not
    shrink the loss (ADDifT's difference mask). Min-SNR-gamma weights each sample by
    ``min(gamma / SNR(t), 1)``.
    """
    # Min-SNR follows the reference (SPEC.md §4.0), not diffusers/kohya: the weight is
    # min(γ/SNR, 1) for epsilon AND v-prediction models. diffusers' train scripts and kohya's
    # apply_snr_weight(v_prediction=True) use min(SNR, γ)/(SNR + 1) for v-prediction instead
    # (e.g. SNR 9, γ 5: 0.5 there, 5/9 here). Kept so the reference's presets train the same.
    loss = element_loss(pred, target, kind)
    if mask is not None:
        mask = mask.to(loss.dtype)
        per_sample = (loss * mask).flatten(1).sum(1) / mask.expand_as(loss).flatten(1).sum(1).clamp_min(1.0)
    else:
        per_sample = loss.flatten(1).mean(1)
    if snr_gamma and snr_gamma > 0:
        weight = torch.clamp(snr_gamma / snr(scheduler, timesteps), max=1.0)
        per_sample = per_sample * weight.to(per_sample.dtype)
    return per_sample.mean()


def rescale_zero_terminal_snr(scheduler) -> None:
    """Rescale the scheduler's betas to zero terminal SNR (Lin et al. 2024, Alg. 1), in place."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as rescale

    betas = rescale(scheduler.betas)
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
