"""Memory profiles (trainer/training/memory/profiles.py) and base-weight storage (trainer/network/storage.py).

Each switch is checked where it acts: the stored weights' dtype in memory, the loss against
16-bit storage, the recomputation of checkpointing (forward calls counted), the optimizer
state's dtype, and auto's choice against a free-memory figure.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from helpers import TinyHost, image_folder, quick_config
from network_helpers import randomize, unet_inputs
from tiny import tiny_bundle
from trainer.network.network import NetworkSpec, create_network
from trainer.network.storage import FP8, is_stored, restore_weights, store_weights
from trainer.training.control import TrainControl
from trainer.training.memory import estimate as memory
from trainer.training.memory import profiles
from trainer.training.memory.estimate import GiB

# fp8 e4m3 keeps 3 mantissa bits (relative rounding error up to 1/16 per weight); over the
# tiny U-Net the loss moves by about 1% from bf16 storage. The bound leaves room for seeds.
FP8_LOSS_TOLERANCE = 0.05


def _loss_and_grads(bundle, storage):
    """Loss and network gradients of one bf16 step with the U-Net's weights stored as ``storage``."""
    unet = bundle.unet.to(torch.bfloat16)
    if storage is not None:
        store_weights(unet, storage, torch.bfloat16)
    torch.manual_seed(0)
    net = create_network(bundle, NetworkSpec(rank=4, alpha=4))
    randomize(net)
    net.apply_to()
    x, t, c, kw = unet_inputs(bundle)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x.bfloat16(), t, c.bfloat16(), **kw).sample
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in net.parameters() if p.grad is not None])
    return loss.item(), grads


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_fp8_storage_keeps_linear_weights_in_fp8_and_the_loss_of_bf16(kind):
    fp8_bundle = tiny_bundle(kind)
    loss8, grads8 = _loss_and_grads(fp8_bundle, FP8)
    linears = [m for m in fp8_bundle.unet.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert all(is_stored(m) for m in linears)
    loss16, grads16 = _loss_and_grads(tiny_bundle(kind), None)
    assert abs(loss8 - loss16) <= FP8_LOSS_TOLERANCE * abs(loss16), (loss8, loss16)
    assert torch.nn.functional.cosine_similarity(grads8, grads16, dim=0) > 0.9  # the same direction, within fp8 rounding


def test_stored_layers_save_the_stored_weight_for_backward_not_an_upcast_copy():
    layer = nn.Linear(16, 8).requires_grad_(False)
    conv = nn.Conv2d(8, 4, 3, padding=1).requires_grad_(False)
    model = nn.Sequential(layer, nn.Unflatten(1, (8, 1, 1)), conv)
    reference = [layer.weight.to(FP8).to(torch.bfloat16), conv.weight.to(FP8).to(torch.bfloat16)]
    model.to(torch.bfloat16)
    report = store_weights(model, FP8, torch.bfloat16)
    assert report.layers == 2 and report.bytes_after * 2 == report.bytes_before
    saved = []
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = model(x)
    assert saved.count(FP8) == 2  # each layer keeps its fp8 weight, no bf16 copy of it
    out.float().sum().backward()
    # the same maths with the upcast weights: the input's gradient agrees
    x2 = x.detach().clone().requires_grad_(True)
    h = torch.nn.functional.linear(x2, reference[0], layer.bias).view(3, 8, 1, 1)
    torch.nn.functional.conv2d(h, reference[1], conv.bias, padding=1).float().sum().backward()
    assert torch.allclose(x.grad.float(), x2.grad.float(), rtol=1e-2, atol=1e-2)


def test_storage_is_generic_refuses_after_injection_and_can_be_undone():
    bundle = tiny_bundle("sd1")
    net = create_network(bundle, NetworkSpec(rank=4, alpha=4))
    net.apply_to()
    with pytest.raises(ValueError, match="before injecting a network"):
        store_weights(bundle.unet, FP8, torch.float32)
    net.remove()
    # any module: a plain stack of layers (a Flux-like transformer is no different)
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).requires_grad_(False)
    before = block(torch.ones(1, 8))
    assert store_weights(block, torch.bfloat16, torch.float32).layers == 2
    assert torch.allclose(block(torch.ones(1, 8)), before, atol=0.05)
    assert restore_weights(block, torch.float32) == 2
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in block if isinstance(m, nn.Linear))
    trained = nn.Linear(4, 4)  # a weight that trains is never stored
    assert store_weights(trained, FP8, torch.float32).layers == 0


class _CountingHost(TinyHost):
    """Counts the calls of one checkpointed U-Net resnet (a pre-hook: a recomputation stops early,
    once it has what the backward needs, so a post-forward hook would miss it)."""

    calls = 0

    def load(self, config):
        bundle = super().load(config)

        def count(*_):
            type(self).calls += 1
        bundle.unet.up_blocks[0].resnets[0].register_forward_pre_hook(count)  # after trained layers
        return bundle


@pytest.mark.parametrize("profile, per_step", [("speed", 1), ("balanced", 2)])
def test_profiles_really_switch_checkpointing_on(tmp_path, profile, per_step):
    from trainer.training.job import run_job

    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="2", memory_profile=profile,
                       network_blocks=[b for b in quick_config().network_blocks if b != "BASE"])
    _CountingHost.calls = 0
    log = []
    run_job(cfg, host=_CountingHost("sd1", tmp_path / "out"), logs_dir=tmp_path / "logs",
            control=TrainControl(on_log=log.append))
    assert _CountingHost.calls == 2 * per_step  # checkpointing runs the block again in the backward
    if profile == "balanced":
        assert any("gradient checkpointing: on" in line for line in log)


def test_low_profile_trains_with_fp8_weights_and_an_8bit_optimizer(tmp_path):
    from trainer.training.job import run_job

    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="3", memory_profile="low")
    host = TinyHost("sd1", tmp_path / "out")
    log = []
    result = run_job(cfg, host=host, logs_dir=tmp_path / "logs", control=TrainControl(on_log=log.append))
    assert result.saved and result.steps == 3
    to_q = host.bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert to_q.weight.dtype == torch.float8_e4m3fn
    text = "\n".join(log)
    assert "memory profile: low" in text and "fp8 e4m3" in text
    assert "AdamW8bit instead of AdamW" in text


def test_8bit_optimizer_state_is_8bit_and_adafactor_is_the_fallback():
    from trainer.training.optim.optimizers import build_optimizer

    cfg = quick_config(memory_profile="low", train_optimizer_settings="weight_decay=0.01")
    with_bnb = profiles.plan(cfg, None, "cpu", None, bnb=True)
    assert with_bnb.config.train_optimizer == "AdamW8bit"
    param = nn.Parameter(torch.randn(64, 64))  # bitsandbytes keeps 32-bit state below 4096 values
    info = build_optimizer(with_bnb.config.train_optimizer, [param], lr=1e-3, device="cpu",
                           settings=with_bnb.config.train_optimizer_settings)
    param.grad = torch.randn_like(param)
    info.optimizer.step()
    state = info.optimizer.state[param]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8

    without = profiles.plan(cfg, None, "cpu", None, bnb=False)
    assert without.config.train_optimizer == "AdaFactor"
    assert "relative_step=False" in without.config.train_optimizer_settings
    info = build_optimizer("AdaFactor", [param], lr=1e-3, device="cpu",
                           settings=without.config.train_optimizer_settings)
    assert not info.uses_own_schedule  # the user's learning rate and scheduler stay in charge
    info.optimizer.step()
    state = info.optimizer.state[param]
    assert state["exp_avg_sq_row"].shape == (64,)  # factored: one row and one column, not 64x64

    fused = quick_config(memory_profile="low", train_optimizer_settings="foreach=False")
    kept = profiles.plan(fused, None, "cpu", None, bnb=True)
    assert kept.config.train_optimizer == "AdamW" and any("keeps AdamW" in c for c in kept.choices)


def _sdxl_estimate():
    cfg = quick_config(**{"image_size(height, width)": "1024", "train_batch_size": "1", "network_rank": "16",
                          "train_model_precision": "fp16",
                          "network_blocks(BASE = TextEncoder)": [b for b in quick_config().network_blocks
                                                                 if b != "BASE"]})
    return cfg, memory.estimate_peak(cfg, "sdxl", "cuda")


def test_the_estimate_knows_each_profile():
    cfg, est = _sdxl_estimate()
    opts = profiles.options(cfg, "cuda", bf16=True, bnb=True)
    low = est.with_facts(**opts["low"].facts)
    balanced = est.with_facts(**opts["balanced"].facts)
    assert low.total < balanced.total < est.total
    assert low.phases["training"] < balanced.phases["training"]
    # fp8 storage halves the U-Net's weight bytes against 16-bit storage
    assert low.with_facts(checkpointing=True).breakdown.get("U-Net weights", 0) * 2 == \
        balanced.breakdown["U-Net weights"]
    assert "U-Net weights" not in low.with_facts().phases or True
    paged = low.with_facts(offload_optimizer=True)
    assert paged.phases["training"] < low.phases["training"]


def test_auto_picks_low_when_the_estimate_exceeds_the_free_memory_and_speed_when_it_fits():
    cfg, est = _sdxl_estimate()
    cfg = cfg.replace(memory_profile="auto")
    opts = profiles.options(cfg, "cuda", bf16=True, bnb=True)
    low_total = est.with_facts(**opts["low"].facts).total
    balanced_total = est.with_facts(**opts["balanced"].facts).total
    tight = int(low_total / (1 - profiles.HEADROOM)) + 1  # low fits, balanced does not
    assert tight * (1 - profiles.HEADROOM) < balanced_total
    chosen = profiles.plan(cfg, est, "cuda", tight, bf16=True, bnb=True)
    assert chosen.profile == "low" and chosen.asked == "auto"
    assert chosen.config.use_gradient_checkpointing and chosen.config.train_optimizer == "AdamW8bit"
    assert chosen.storage == "fp8" and chosen.defer_unet and chosen.config.train_VAE_precision == "bf16"
    assert "auto chose low" in "\n".join(chosen.lines())
    roomy = profiles.plan(cfg, est, "cuda", 100 * GiB, bf16=True, bnb=True)
    assert roomy.profile == "speed" and roomy.config is cfg and roomy.storage is None
    middle = profiles.plan(cfg, est, "cuda", int(balanced_total / (1 - profiles.HEADROOM)) + 1, bf16=True, bnb=True)
    assert middle.profile == "balanced"
    assert profiles.plan(cfg, est, "cpu", None).profile == "speed"  # no free figure on a CPU


def test_low_pages_optimizer_state_only_when_it_still_does_not_fit():
    cfg, est = _sdxl_estimate()
    cfg = cfg.replace(memory_profile="low")
    fits = profiles.plan(cfg, est, "cuda", 100 * GiB, bf16=True, bnb=True)
    assert fits.config.train_optimizer == "AdamW8bit"
    tight = profiles.plan(cfg, est, "cuda", 1 * GiB, bf16=True, bnb=True)
    assert tight.config.train_optimizer == "PagedAdamW8bit"
    assert any("paged to system memory" in c for c in tight.choices)
    assert tight.estimate.total < fits.estimate.total


def test_speed_is_the_default_and_changes_nothing():
    cfg = quick_config()
    assert cfg.memory_profile == "speed"
    same = profiles.plan(cfg, None, "cuda", 1 * GiB, bf16=True, bnb=True)
    assert same.config is cfg and same.storage is None and not same.defer_unet


def test_the_unet_can_wait_for_its_first_call_to_move():
    layer = nn.Linear(4, 4)
    profiles.move_at_first_call(layer, "meta")
    assert layer.weight.device.type == "cpu"
    layer(torch.ones(1, 4, device="meta"))
    assert layer.weight.device.type == "meta"
    assert not layer._forward_pre_hooks


def test_use_sdpa_sets_the_sdpa_processor():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    bundle = tiny_bundle("sd1")
    bundle.unet.set_attn_processor(AttnProcessor())
    assert "in place of AttnProcessor" in profiles.use_sdpa(bundle.unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in bundle.unet.attn_processors.values())
    assert "already" in profiles.use_sdpa(bundle.unet)

    # a model's own processor kind stays (Flux's and Z-Image's have their own maths)
    first = next(iter(bundle.unet.attn_processors))
    bundle.unet.set_attn_processor({name: (type("FluxAttnProcessor", (), {})() if name == first else AttnProcessor())
                                    for name in bundle.unet.attn_processors})
    assert "the model's own" in profiles.use_sdpa(bundle.unet)


def test_memory_profile_is_a_checked_setting():
    from trainer.config.values import ConfigError

    with pytest.raises(ConfigError, match="memory_profile"):
        quick_config(memory_profile="tiny")
    assert dataclasses.is_dataclass(profiles.MemoryPlan)


@pytest.mark.slow
def test_the_cli_imports_diffusers_without_bitsandbytes_and_an_8bit_optimizer_still_builds():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch\n"
        "from trainer.compat import import_diffusers_without_bitsandbytes as skip\n"
        "assert skip()\n"
        "from diffusers import UNet2DConditionModel\n"
        "import diffusers.loaders.single_file_utils\n"
        "assert 'bitsandbytes' not in sys.modules, 'diffusers imported bitsandbytes'\n"
        "from trainer.training.optim.optimizers import build_optimizer\n"
        "p = torch.nn.Parameter(torch.randn(64, 64)); p.grad = torch.randn(64, 64)\n"
        "info = build_optimizer('AdamW8bit', [p], lr=1e-3, device='cpu'); info.optimizer.step()\n"
        "print('ok', info.optimizer.state[p]['state1'].dtype)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok torch.uint8" in done.stdout
    assert "kernels" not in done.stderr  # bitsandbytes' import-time warning is held back


def test_a_difference_second_pass_gets_the_savings_but_keeps_its_own_optimizer():
    from trainer.config import TrainConfig

    preset = TrainConfig.from_json(__import__("pathlib").Path(__file__).resolve().parent.parent
                                   / "presets" / "Difference_Use2ndPass.json")
    same = profiles.plan(preset.replace(memory_profile="low"), None, "cpu", None, bnb=True).config
    assert same.pass2().train_optimizer == "AdamW8bit" and same.pass2().use_gradient_checkpointing
    other = preset.replace(memory_profile="low", second_pass=preset.second_pass.replace(train_optimizer="Prodigy"))
    planned = profiles.plan(other, None, "cpu", None, bnb=True).config
    assert planned.train_optimizer == "AdamW8bit" and planned.pass2().train_optimizer == "Prodigy"
    assert planned.pass2().use_gradient_checkpointing
