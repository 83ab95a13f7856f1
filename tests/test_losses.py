"""trainer.training.losses against values worked out by hand (SPEC.md §4.0)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.training.losses import (
    diffusion_loss, element_loss, make_noise, rescale_zero_terminal_snr, sample_timesteps, snr, training_target,
)


class Schedule:
    """A noise schedule with chosen ᾱ_t: SNR(t) = ᾱ/(1−ᾱ) is 1, 4, 9 and 1/4 at t = 0..3."""

    alphas_cumprod = torch.tensor([0.5, 0.8, 0.9, 0.2])


def _column(*values) -> torch.Tensor:
    """A (1, len, 1, 1) tensor: one sample, one value per channel."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def test_element_losses_by_hand():
    pred, target = _column(0.0, 0.5, -3.0), _column(0.0, 0.0, 0.0)
    assert element_loss(pred, target, "MSE").flatten().tolist() == [0.0, 0.25, 9.0]
    assert element_loss(pred, target, "L1").flatten().tolist() == [0.0, 0.5, 3.0]
    # Huber with β = 1: ½x² inside |x| < 1, |x| − ½ outside
    assert element_loss(pred, target, "Smooth-L1").flatten().tolist() == [0.0, 0.125, 2.5]
    with pytest.raises(ValueError, match="train_loss_function"):
        element_loss(pred, target, "Huber")


def test_element_loss_is_computed_in_fp32():
    pred = torch.full((1, 1, 1, 1), 300.0, dtype=torch.float16)
    out = element_loss(pred, torch.zeros_like(pred), "MSE")  # 90000 overflows fp16 (max 65504)
    assert out.dtype == torch.float32 and out.item() == 90000.0


def test_loss_is_the_mean_of_per_sample_means():
    pred = torch.cat([_column(1.0, 3.0), _column(2.0, 2.0)])  # sample means of squares: 5 and 4
    loss = diffusion_loss(pred, torch.zeros_like(pred), torch.tensor([0, 0]), scheduler=Schedule)
    assert loss.item() == pytest.approx(4.5)


def test_snr_of_the_schedule():
    assert snr(Schedule, torch.tensor([0, 1, 2, 3])).tolist() == pytest.approx([1.0, 4.0, 9.0, 0.25])


def test_min_snr_weights_each_sample_by_min_gamma_over_snr_and_one():
    # per-sample MSE 2 at t=2 (SNR 9) and 3 at t=1 (SNR 4); γ = 5: weights 5/9 and min(5/4, 1) = 1
    pred = torch.cat([_column(math.sqrt(2.0)), _column(math.sqrt(3.0))])
    t = torch.tensor([2, 1])
    loss = diffusion_loss(pred, torch.zeros_like(pred), t, scheduler=Schedule, snr_gamma=5.0)
    assert loss.item() == pytest.approx((2.0 * 5 / 9 + 3.0) / 2)
    # γ = 0 is off
    off = diffusion_loss(pred, torch.zeros_like(pred), t, scheduler=Schedule, snr_gamma=0.0)
    assert off.item() == pytest.approx(2.5)


def test_min_snr_for_v_prediction_uses_the_same_weight_as_the_reference():
    """The reference weighs v-prediction losses by min(γ/SNR, 1) too; diffusers and kohya would use
    min(SNR, γ)/(SNR + 1) (= 0.5 at SNR 9, γ 5). The v target itself is √ᾱ·ε − √(1−ᾱ)·z."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=4, prediction_type="v_prediction")
    sched.alphas_cumprod = torch.tensor([0.64, 0.8, 0.9, 0.2])
    z, eps = _column(1.0), _column(2.0)
    v = training_target(sched, z, eps, torch.tensor([0]), "v_prediction")
    assert v.item() == pytest.approx(0.8 * 2.0 - 0.6 * 1.0)  # √0.64 = 0.8, √0.36 = 0.6
    assert training_target(sched, z, eps, torch.tensor([0]), "epsilon") is eps
    with pytest.raises(ValueError, match="prediction type"):
        training_target(sched, z, eps, torch.tensor([0]), "sample")

    pred = _column(math.sqrt(2.0))  # MSE 2 against a zero v target, at t=2 (SNR 9)
    loss = diffusion_loss(pred, torch.zeros_like(pred), torch.tensor([2]), scheduler=sched, snr_gamma=5.0)
    assert loss.item() == pytest.approx(2.0 * 5 / 9)
    assert loss.item() != pytest.approx(2.0 * 0.5)


def test_mask_averages_over_the_masked_area_of_every_channel():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])[None]  # (1, 2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    loss = diffusion_loss(pred, torch.zeros_like(pred), torch.tensor([0]), scheduler=Schedule, mask=mask)
    assert loss.item() == pytest.approx((1 + 16) / 2)  # squares 1 and 16 kept, in both channels
    unmasked = diffusion_loss(pred, torch.zeros_like(pred), torch.tensor([0]), scheduler=Schedule)
    assert unmasked.item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    empty = diffusion_loss(pred, torch.zeros_like(pred), torch.tensor([0]), scheduler=Schedule,
                           mask=torch.zeros_like(mask))
    assert empty.item() == 0.0  # nothing to learn where the pair does not differ


def test_noise_offset_adds_one_constant_per_sample_and_channel():
    latents = torch.zeros((2, 3, 4, 4))
    plain = make_noise(latents, 0.0, generator=torch.Generator().manual_seed(7))
    shifted = make_noise(latents, 0.1, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    base = torch.randn((2, 3, 4, 4), generator=gen)
    offset = torch.randn((2, 3, 1, 1), generator=gen)
    torch.testing.assert_close(plain, base)
    torch.testing.assert_close(shifted, base + 0.1 * offset)
    diff = shifted - plain
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))  # constant over H, W


def test_timesteps_are_drawn_in_range_and_shared_when_fixed_in_batch():
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(500, 200, 203, fixed_in_batch=False, device="cpu", generator=gen)
    assert t.dtype == torch.long and set(t.tolist()) == {200, 201, 202}  # [lo, hi)
    fixed = sample_timesteps(8, 0, 1000, fixed_in_batch=True, device="cpu", generator=gen)
    assert fixed.shape == (8,) and len(set(fixed.tolist())) == 1


def test_zero_terminal_snr_makes_the_last_step_pure_noise():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    first = sched.alphas_cumprod[0].item()
    rescale_zero_terminal_snr(sched)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert sched.alphas_cumprod[0].item() == pytest.approx(first, rel=1e-3)  # the first step barely moves
    torch.testing.assert_close(sched.alphas, 1.0 - sched.betas)
