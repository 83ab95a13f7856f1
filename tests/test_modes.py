"""The special modes on tiny models: iLECO, ADDifT, Difference, Multi-ADDifT."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import TinyHost, pattern_image, quick_config
from trainer.training.control import TrainControl
from trainer.training.job import run_job
from trainer.modes.base import repeat_cond, unet_forward


def _network_for(bundle, path):
    """Our network rebuilt from a saved file and applied to ``bundle`` (multiplier settable)."""
    from trainer.network.network import spec_from_config
    from trainer.network.resume import resume_network

    net = resume_network(bundle, spec_from_config(quick_config(), train_text_encoder=False), str(path))
    net.apply_to()
    return net


@torch.no_grad()
def _pred_distance(bundle, net, multiplier, c_a, c_b, seed=123, n=6):
    """Mean squared distance between the prediction for prompt a with the network at
    ``multiplier`` and the base model's prediction for prompt b, on shared noise and t."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 4, 8, 8), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    net.multiplier = 0.0
    b = unet_forward(bundle, x, t, repeat_cond(c_b, n))
    net.multiplier = multiplier
    a = unet_forward(bundle, x, t, repeat_cond(c_a, n))
    return (a - b).pow(2).mean().item()


@pytest.mark.slow
def test_ileco_moves_original_prediction_to_target(tmp_path):
    from trainer.conditioning import PromptEncoder

    cfg = quick_config(mode="iLECO", original_prompt="a photo of a cat", target_prompt="a photo of a dog",
                       train_iterations="40", train_learning_rate="1e-2", save_lora_name="ileco",
                       network_element="CrossAttention")
    host = TinyHost("sd1", tmp_path)
    res = run_job(cfg, host=host, logs_dir=tmp_path / "logs")
    meta_path = res.saved[-1]
    bundle = TinyHost("sd1").load(None)
    enc = PromptEncoder(bundle)
    c_o, c_t = enc.encode(["a photo of a cat"]), enc.encode(["a photo of a dog"])
    net = _network_for(bundle, meta_path)
    before = _pred_distance(bundle, net, 0.0, c_o, c_t)
    after = _pred_distance(bundle, net, 1.0, c_o, c_t)
    assert after < 0.5 * before, (before, after)
    # multiplier 0 is exactly the base model
    net.remove()
    assert _pred_distance(bundle, net, 0.0, c_o, c_t) == before


def test_ileco_needs_original_prompt(tmp_path):
    import pytest

    from trainer.config import ConfigError

    cfg = quick_config(mode="iLECO", original_prompt="", target_prompt="x")
    with pytest.raises(ConfigError, match="original prompt"):
        run_job(cfg, host=TinyHost("sd1", tmp_path), logs_dir=tmp_path / "logs")


def _pair(tmp_path, same=False):
    a = pattern_image(tmp_path / "orig.png", 1)
    b = pattern_image(tmp_path / "target.png", 1 if same else 7)
    return str(a), str(b)


@torch.no_grad()
def _x0_shift(bundle, net, multiplier, z_noisy_src, t, cond):
    """Change of the model's clean-latent estimate caused by the network."""
    sched = bundle.noise_scheduler
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    net.multiplier = 0.0
    eps0 = unet_forward(bundle, z_noisy_src, t, cond)
    net.multiplier = multiplier
    eps1 = unet_forward(bundle, z_noisy_src, t, cond)
    return -(1 - ab).sqrt() / ab.sqrt() * (eps1 - eps0)


def _encode(bundle, path):
    from trainer.data.cache import encode_latents_mean
    from trainer.modes.addift import load_pixels

    px, _, _ = load_pixels(path)
    with torch.no_grad():
        return encode_latents_mean(bundle.vae, px, bundle.family.latent_scale)


@pytest.mark.slow
def test_addift_learns_the_pair_difference(tmp_path, monkeypatch):
    """ADDifT's steps teach: network at +0.25 on the noised target predicts what the base model
    predicts on the noised original, and at -0.25 on the noised original what the base predicts
    on the noised target (same noise, same t).

    A random tiny UNet's output is not smooth in its input noise (a trained one is), so over
    fresh noise draws the relation is not learnable in a test's few steps; the noise is held
    fixed here, which checks that the step trains the right inputs, signs and multipliers.
    """
    from trainer.conditioning import PromptEncoder
    from trainer.modes import addift

    fixed = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    real_randn = torch.randn

    def fixed_randn(shape, *a, **k):
        return fixed.expand(shape).clone() if tuple(shape[1:]) == (4, 8, 8) else real_randn(shape, *a, **k)

    monkeypatch.setattr(addift.torch, "randn", fixed_randn)
    orig, target = _pair(tmp_path)
    cfg = quick_config(mode="ADDifT", original_image=orig, target_image=target, train_iterations="60",
                       train_batch_size="1", train_learning_rate="3e-3", save_lora_name="addift",
                       train_min_timesteps="500", train_max_timesteps="1000")
    res = run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs")
    monkeypatch.setattr(addift.torch, "randn", real_randn)
    bundle = TinyHost("sd1").load(None)
    net = _network_for(bundle, res.saved[-1])
    z_o, z_t = _encode(bundle, orig), _encode(bundle, target)
    t = torch.tensor([550, 650, 750, 850, 950])
    noise = fixed.expand(5, -1, -1, -1)
    x_o = bundle.noise_scheduler.add_noise(z_o.expand(5, -1, -1, -1), noise, t)
    x_t = bundle.noise_scheduler.add_noise(z_t.expand(5, -1, -1, -1), noise, t)
    cond = repeat_cond(PromptEncoder(bundle).encode([""]), 5)
    with torch.no_grad():
        net.multiplier = 0.0
        base_o, base_t = unet_forward(bundle, x_o, t, cond), unet_forward(bundle, x_t, t, cond)
        net.multiplier = -0.25
        net_o = unet_forward(bundle, x_o, t, cond)
        net.multiplier = 0.25
        net_t = unet_forward(bundle, x_t, t, cond)
    before = (base_o - base_t).pow(2).mean().item()
    assert (net_o - base_t).pow(2).mean().item() < 0.5 * before   # original -> target behaviour
    assert (net_t - base_o).pow(2).mean().item() < 0.5 * before   # and the forward direction


@pytest.mark.slow
def test_addift_identical_pair_trains_nothing(tmp_path):
    orig, target = _pair(tmp_path, same=True)
    cfg = quick_config(mode="ADDifT", original_image=orig, target_image=target, train_iterations="10",
                       train_batch_size="1", save_lora_name="same")
    res = run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs")
    ups = [v for k, v in load_file(str(res.saved[-1])).items() if k.endswith("lora_up.weight")]
    assert ups and max(v.abs().max().item() for v in ups) < 1e-6


@pytest.mark.slow
def test_addift_random_schedule_and_reverse_options_run(tmp_path, monkeypatch):
    """Random schedule: a t drawn in [min, max) for each forward step, reused by the reverse step.
    diff_revert_original_target swaps the pair; a negative diff_alt_ratio makes the reverse steps
    train on the noise itself, at multiplier -0.25·|ratio|."""
    from trainer.modes import addift

    nets, calls = [], []
    real_build, real_forward = addift.build_network, addift.unet_forward

    def build(*a, **k):
        nets.append(real_build(*a, **k))
        return nets[-1]

    def forward(bundle, x, t, cond, time_ids=None):
        calls.append((x.detach().clone(), t.clone(), nets[0].multiplier))
        return real_forward(bundle, x, t, cond, time_ids)

    monkeypatch.setattr(addift, "build_network", build)
    monkeypatch.setattr(addift, "unet_forward", forward)
    orig, target = _pair(tmp_path)
    logs = []
    cfg = quick_config(mode="ADDifT", original_image=orig, target_image=target, train_iterations="6",
                       addift_timestep_schedule="random", diff_alt_ratio="-2", diff_revert_original_target=True,
                       train_batch_size="1", train_min_timesteps="100", train_max_timesteps="900",
                       save_lora_name="opts")
    run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs", control=TrainControl(on_log=logs.append))
    assert any("random draw in [100, 900)" in m for m in logs)
    assert len(calls) == 12  # per step: the base prediction (network off), then the trained one
    steps = [(calls[2 * n], calls[2 * n + 1]) for n in range(6)]
    ts = [int(base[1][0]) for base, _ in steps]
    assert all(100 <= t < 900 for t in ts)
    assert ts[0::2] == ts[1::2]                         # the reverse step reuses the forward step's t
    assert len(set(ts[0::2])) == 3                      # and each forward step draws anew
    assert [b[2] for b, _ in steps] == [0.0] * 6        # base predictions with the network off
    assert [p[2] for _, p in steps] == [0.25, -0.5] * 3  # -0.25·|diff_alt_ratio| on reverse steps

    bundle = TinyHost("sd1").load(None)
    z_o, z_t = _encode(bundle, orig), _encode(bundle, target)
    sched = bundle.noise_scheduler
    for n, ((x_a, t, _), (x_b, _, _)) in enumerate(steps):
        scale = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        if n % 2 == 0:  # same noise on both: x_b − x_a = √ᾱ·(b − a), with a = target, b = original (reverted)
            torch.testing.assert_close((x_b - x_a) / scale, z_o - z_t, atol=1e-3, rtol=1e-3)
        else:           # a negative ratio: both sides are the noise itself
            torch.testing.assert_close(x_a, x_b)


@torch.no_grad()
def _denoise_loss(bundle, net, multiplier, z, seed=9, n=16):
    """Noise-prediction loss of the model (network at ``multiplier``) on latent ``z``."""
    from trainer.conditioning import PromptEncoder

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *z.shape[1:]), generator=gen)
    t = torch.randint(300, 700, (n,), generator=gen)
    x = bundle.noise_scheduler.add_noise(z.expand(n, -1, -1, -1), noise, t)
    net.multiplier = multiplier
    pred = unet_forward(bundle, x, t, repeat_cond(PromptEncoder(bundle).encode([""]), n))
    return (pred - noise).pow(2).mean().item()


@pytest.mark.slow
def test_difference_second_pass_points_from_original_to_target(tmp_path):
    """The difference network alone, on the base model, favours the target over the original:
    its denoising loss on the target image falls relative to its loss on the original."""
    orig, target = _pair(tmp_path)
    out = tmp_path / "out"
    cfg = quick_config(mode="Difference", original_image=orig, target_image=target, train_iterations="40",
                       train_batch_size="2", train_learning_rate="3e-3", save_lora_name="diff",
                       diff_save_1st_pass=True, train_min_timesteps="300", train_max_timesteps="700")
    res = run_job(cfg, host=TinyHost("sd1", out), logs_dir=tmp_path / "logs")
    assert [p.name for p in res.saved] == ["diff_copy.safetensors", "diff.safetensors"]
    bundle = TinyHost("sd1").load(None)
    net = _network_for(bundle, out / "diff.safetensors")
    z_o, z_t = _encode(bundle, orig), _encode(bundle, target)
    gap_base = _denoise_loss(bundle, net, 0.0, z_t) - _denoise_loss(bundle, net, 0.0, z_o)
    gap_diff = _denoise_loss(bundle, net, 1.0, z_t) - _denoise_loss(bundle, net, 1.0, z_o)
    assert gap_diff < gap_base - 0.005, (gap_base, gap_diff)


@pytest.mark.slow
def test_difference_first_pass_only_and_load(tmp_path, monkeypatch):
    from trainer.modes import difference

    orig, target = _pair(tmp_path)
    out = tmp_path / "out"
    only = quick_config(mode="Difference", original_image=orig, target_image=target, train_iterations="3",
                        save_lora_name="first", diff_1st_pass_only=True)
    res = run_job(only, host=TinyHost("sd1", out), logs_dir=tmp_path / "logs")
    assert [p.name for p in res.saved] == ["first_copy.safetensors"]  # saved without diff_save_1st_pass
    copy_weights = load_file(str(out / "first_copy.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in copy_weights.items() if k.endswith("lora_up.weight"))

    seen = []  # what pass 2 trains with: the frozen copy network's weights and multiplier, per step
    real = difference.ImageTask.compute_loss

    def spy(self, step):
        if self.frozen is not None:
            seen.append(({k: v.detach().clone() for k, v in self.frozen.state_dict().items()},
                         self.frozen.multiplier, any(p.requires_grad for p in self.frozen.parameters())))
        return real(self, step)

    monkeypatch.setattr(difference.ImageTask, "compute_loss", spy)
    logs = []
    load = quick_config(mode="Difference", original_image=orig, target_image=target, train_iterations="3",
                        save_lora_name="second", diff_load_1st_pass="first_copy")
    res = run_job(load, host=TinyHost("sd1", out), logs_dir=tmp_path / "logs", control=TrainControl(on_log=logs.append))
    assert [p.name for p in res.saved] == ["second.safetensors"]
    assert any("copy network loaded" in m for m in logs)
    assert len(seen) == 3  # pass 1 was skipped: only pass 2's steps ran
    for weights, multiplier, trainable in seen:
        # the copy network on during pass 2 is the saved one, on at 1 and not trained
        assert weights.keys() == copy_weights.keys() and multiplier == 1.0 and not trainable
        for k, v in copy_weights.items():
            torch.testing.assert_close(weights[k], v, msg=k)


@pytest.mark.slow
def test_multi_addift_pairs_and_trains(tmp_path):
    from trainer.data.pairs import find_pairs

    data = tmp_path / "pairs"
    data.mkdir()
    for i in range(2):
        pattern_image(data / f"img{i}.png", i)
        pattern_image(data / f"img{i}_closed.png", i + 10)
    pattern_image(data / "lonely.png", 20)                 # decoy: no target
    pattern_image(data / "img0_closed.jpg", 21)            # decoy: other extension
    pattern_image(data / "stray_closed.png", 22)           # decoy: target without original
    scan = find_pairs(data, "_closed")
    assert sorted((a.name, b.name) for a, b in scan.pairs) == [("img0.png", "img0_closed.png"),
                                                                ("img1.png", "img1_closed.png")]
    assert sorted(p.name for p in scan.unmatched) == ["img0_closed.jpg", "lonely.png", "stray_closed.png"]
    logs = []
    cfg = quick_config(mode="Multi-ADDifT", lora_data_directory=str(data), diff_target_name="_closed",
                       train_iterations="6", diff_use_diff_mask=True, save_lora_name="multi",
                       logging_save_csv=True)
    res = run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs", control=TrainControl(on_log=logs.append))
    assert res.saved[-1].name == "multi.safetensors"
    assert any("lonely.png" in m for m in logs)
    ups = [v for k, v in load_file(str(res.saved[-1])).items() if k.endswith("lora_up.weight")]
    assert max(v.abs().max().item() for v in ups) > 0


@pytest.mark.slow
def test_modes_record_mode_and_prompts_in_metadata(tmp_path):
    from safetensors import safe_open

    cfg = quick_config(mode="iLECO", original_prompt="red apple", target_prompt="", train_iterations="2",
                       save_lora_name="meta")
    res = run_job(cfg, host=TinyHost("sd1", tmp_path), logs_dir=tmp_path / "logs")
    with safe_open(str(res.saved[-1]), "pt") as f:
        meta = f.metadata()
    assert meta["traintrain_mode"] == "iLECO"
    assert meta["traintrain_original_prompt"] == "red apple"


def _mode_config(mode, tmp_path, name):
    extra = {}
    if mode == "iLECO":
        extra = dict(original_prompt="a cat", target_prompt="a dog")
    elif mode in ("ADDifT", "Difference"):
        orig, target = _pair(tmp_path)
        extra = dict(original_image=orig, target_image=target)
    elif mode == "Multi-ADDifT":
        data = tmp_path / "pairs"
        data.mkdir(exist_ok=True)
        for i in range(2):
            pattern_image(data / f"p{i}.png", i)
            pattern_image(data / f"p{i}_t.png", i + 5)
        extra = dict(lora_data_directory=str(data), diff_target_name="_t")
    return quick_config(mode=mode, train_iterations="6", save_lora_name=name, train_lr_scheduler="cosine",
                        save_overwrite=True, **extra)


import pytest  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["iLECO", "ADDifT", "Difference", "Multi-ADDifT"])
def test_stop_and_resume_in_every_mode_equals_an_uninterrupted_run(tmp_path, mode):
    full = run_job(_mode_config(mode, tmp_path, "full"), host=TinyHost("sd1", tmp_path / "a"),
                   logs_dir=tmp_path / "logs")
    stop = TrainControl()

    def stop_in_last_pass(event):  # Difference: stop inside pass 2, so resume must restore pass 1
        if event.pass_name == "main" and event.step == 3 and not event.message:
            stop.stop()

    stop.listen(on_progress=stop_in_last_pass)
    cfg = _mode_config(mode, tmp_path, "part")
    first = run_job(cfg, host=TinyHost("sd1", tmp_path / "b"), logs_dir=tmp_path / "logs", control=stop)
    assert first.stopped and first.steps == 3
    second = run_job(cfg, host=TinyHost("sd1", tmp_path / "b"), logs_dir=tmp_path / "logs", resume=True)
    assert not second.stopped
    a, b = load_file(str(full.saved[-1])), load_file(str(second.saved[-1]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_multi_addift_difference_mask_reaches_the_loss(tmp_path, monkeypatch):
    """With diff_use_diff_mask the loss gets the pair's difference mask (at latent size) and
    averages over it, instead of multiplying both predictions by it."""
    import numpy as np
    from PIL import Image

    from trainer.modes import addift

    masks = []
    real = addift.diffusion_loss
    monkeypatch.setattr(addift, "diffusion_loss", lambda *a, **k: masks.append(k.get("mask")) or real(*a, **k))
    data = tmp_path / "pairs"
    data.mkdir()
    grey = np.full((64, 64, 3), 100, dtype=np.uint8)
    changed = grey.copy()
    changed[:32, :32] = 200  # the top-left quarter differs
    Image.fromarray(grey).save(data / "a.png")
    Image.fromarray(changed).save(data / "a_t.png")
    cfg = quick_config(mode="Multi-ADDifT", lora_data_directory=str(data), diff_target_name="_t",
                       train_iterations="2", train_batch_size="1", diff_use_diff_mask=True, save_lora_name="mask")
    run_job(cfg, host=TinyHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs")
    assert len(masks) == 2
    expected = torch.zeros((1, 1, 8, 8))
    expected[..., :4, :4] = 1.0
    for mask in masks:
        torch.testing.assert_close(mask, expected)
