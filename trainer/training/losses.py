"""Noise, timesteps, targets and the element loss, shared by every mode (SPEC.md §4.0).

Flow matching (Flux, Z-Image), written once here for every mode: with σ in [0, 1],
``x_σ = (1 − σ)·x0 + σ·ε`` and the target is the velocity ``ε − x0``. Timesteps are carried as
``t = σ·1000``, the flow-match scheduler's own timesteps (diffusers' ``FlowMatchEulerDiscreteScheduler``:
``timesteps = sigmas * num_train_timesteps``), so the modes' 0..1000 ranges (train_min/max_timesteps,
ADDifT's fixed schedule) keep their meaning: σ = t/1000. LoRA-style sampling draws σ logit-normally
(σ = sigmoid(u), u ~ N(0, 1)) and shifts it as the family's scheduler config says: a fixed shift s
(Z-Image-Turbo, s = 3: σ' = sσ/(1 + (s − 1)σ), as SPEC.md §4.6) or Flux's resolution-dependent shift
(mu from the image's token count between base_shift and max_shift, σ' = e^mu/(e^mu + 1/σ − 1)); the
result is then mapped into the [min, max) timestep range. What the model is given and the sign of its
output are the family's (modes/base.py). Min-SNR weighting has no meaning here and is not applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_flow(scheduler) -> bool:
    """True for a flow-matching scheduler (Flux, Z-Image bundles)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def sample_timesteps(batch: int, lo: int, hi: int, *, fixed_in_batch: bool, device,
                     generator: torch.Generator | None = None, scheduler=None,
                     latent_hw: tuple | None = None) -> torch.Tensor:
    """Uniform integer timesteps in ``[lo, hi)``; one shared value when ``fixed_in_batch``.

    With a flow-matching ``scheduler``: float timesteps σ·1000, σ logit-normal and shifted
    (``latent_hw``, the latent's height and width, sets Flux's resolution-dependent shift)."""
    if scheduler is not None and is_flow(scheduler):
        return flow_timesteps(batch, lo, hi, scheduler=scheduler, latent_hw=latent_hw,
                              fixed_in_batch=fixed_in_batch, device=device, generator=generator)
    n = 1 if fixed_in_batch else batch
    t = torch.randint(lo, hi, (n,), device="cpu", generator=generator)
    if fixed_in_batch:
        t = t.expand(batch)
    return t.to(device).long()


def shift_sigmas(sigmas: torch.Tensor, scheduler, latent_hw: tuple | None = None) -> torch.Tensor:
    """σ shifted as the scheduler's config says (fixed ``shift``, or dynamic with the image's token count)."""
    import math

    cfg = scheduler.config
    if getattr(cfg, "use_dynamic_shifting", False):
        h, w = latent_hw if latent_hw is not None else (128, 128)
        tokens = (int(h) // 2) * (int(w) // 2)  # Flux packs 2x2 latent patches into one token
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        mu = cfg.base_shift + slope * (tokens - cfg.base_image_seq_len)
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas.clamp_min(1e-6) - 1.0))
    shift = float(getattr(cfg, "shift", 1.0))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_euler(x: torch.Tensor, sigmas: list, velocity, on_step=None) -> torch.Tensor:
    """Euler steps of a flow-matching model from ``sigmas[0]`` down to ``sigmas[-1]``: at step i,
    ``x += (σ[i+1] − σ[i]) · velocity(x, i)`` (the velocity ε − x0, as ``transformer_forward`` returns it;
    the step FlowMatchEulerDiscreteScheduler takes). ``on_step(i, x)`` sees the latent before each step.
    The one sampler of these families: iLECO's trajectory and the previews both run it."""
    for i in range(len(sigmas) - 1):
        if on_step is not None:
            on_step(i, x)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * velocity(x, i)
    return x


def flow_timesteps(batch: int, lo: int, hi: int, *, scheduler, latent_hw: tuple | None, fixed_in_batch: bool,
                   device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow-matching timesteps σ·1000 (float): logit-normal σ, shifted, mapped into [lo, hi)."""
    total = float(scheduler.config.num_train_timesteps)
    n = 1 if fixed_in_batch else batch
    sigmas = shift_sigmas(torch.sigmoid(torch.randn((n,), generator=generator)), scheduler, latent_hw)
    t = lo + sigmas * (hi - lo)
    if fixed_in_batch:
        t = t.expand(batch)
    return t.clamp(0.0, total).to(device)


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noisy latents at ``timesteps``: the scheduler's ``add_noise`` (DDPM), or
    ``(1 − σ)·x0 + σ·ε`` with σ = t/1000 (flow matching)."""
    if not is_flow(scheduler):
        return scheduler.add_noise(latents, noise, timesteps)
    sigma = flow_sigma(scheduler, timesteps).to(latents.device, torch.float32)
    sigma = sigma.view(-1, *([1] * (latents.dim() - 1)))
    return ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)


def flow_sigma(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """σ of flow-matching timesteps (t / num_train_timesteps)."""
    return timesteps.float() / float(scheduler.config.num_train_timesteps)


def make_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``offset`` adds a per-channel constant (noise offset)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if offset:
        shift = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + offset * shift.to(latents.device, latents.dtype)
    return noise


def training_target(scheduler, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (eps models), v (v-prediction models) or the
    velocity ε − x0 (flow-matching models)."""
    if prediction_type == "flow":
        return noise - latents
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
    ``min(gamma / SNR(t), 1)``; it is not applied with a flow-matching scheduler.
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
    if snr_gamma and snr_gamma > 0 and not is_flow(scheduler):
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
