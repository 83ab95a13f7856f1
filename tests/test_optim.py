"""Optimizer and LR-scheduler factory: every choice builds and trains, settings and errors, resume."""

import copy
import math
import sys

import pytest
import torch

from trainer.config.choices import LR_SCHEDULERS, OPTIMIZERS
from trainer.compat import install_command
from trainer.training.optim.optimizers import (
    OptimizerSettingsError,
    OptimizerUnavailableError,
    build_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
    parse_settings,
)
from trainer.training.optim.schedulers import build_scheduler

# bitsandbytes warns on every paged optimizer on cpu; the factory's note says the same in words.
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

LR = 1e-3
TE_LR = 5e-4
LR_NEAR_ONE = {"Prodigy", "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD"}
EIGHT_BIT = ("AdamW8bit", "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit")


def _toy(seed: int = 0):
    """Two layers standing for the text encoder and the U-Net. The first weight has 96*64 = 6144
    elements, above bitsandbytes' min_8bit_size (4096), so 8-bit optimizers keep its state in 8 bits."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 4))
    return net


def _groups(net, te_lr=TE_LR):
    return [{"params": list(net[0].parameters()), "lr": te_lr}, {"params": list(net[1].parameters())}]


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 64, generator=generator), torch.randn(16, 4, generator=generator)


def _train_step(net, info, sched=None) -> float:
    x, y = _batch()
    loss = torch.nn.functional.mse_loss(net(x), y)
    info.optimizer.zero_grad()
    loss.backward()
    info.optimizer.step()
    if sched is not None:
        sched.step(loss.item())
    return loss.item()


# ---------------------------------------------------------------- parse_settings


@pytest.mark.parametrize("text, expected", [
    ("betas=(0.9,0.99);weight_decay=0.01", {"betas": (0.9, 0.99), "weight_decay": 0.01}),
    ("weight_decay=0.01\n\nbetas=(0.9, 0.99)\n", {"weight_decay": 0.01, "betas": (0.9, 0.99)}),
    (" weight_decay = 0.01 ;  eps = 1e-8 ; ", {"weight_decay": 0.01, "eps": 1e-8}),
    ("milestones=[5,10];decouple=True;d0=None", {"milestones": [5, 10], "decouple": True, "d0": None}),
    ("mode=triangular2;anneal_strategy='cos'", {"mode": "triangular2", "anneal_strategy": "cos"}),
    ("flag=true;other=FALSE;x=none;y=null", {"flag": True, "other": False, "x": None, "y": None}),
    ("note='a=b'", {"note": "a=b"}),  # split at the first '=' only
    ("", {}),
    (None, {}),
])
def test_parse_settings_good(text, expected):
    assert parse_settings(text, field="train_optimizer_settings") == expected


def test_parse_settings_infinity_is_a_float():
    parsed = parse_settings("growth_rate=inf;low=-inf", field="train_optimizer_settings")
    assert parsed == {"growth_rate": math.inf, "low": -math.inf}


def test_parse_settings_line_without_equals():
    with pytest.raises(OptimizerSettingsError) as caught:
        parse_settings("weight_decay=0.01;foo", field="train_optimizer_settings")
    message = str(caught.value)
    assert "train_optimizer_settings" in message and "'foo'" in message and "has no '='" in message
    assert "weight_decay=0.01; betas=(0.9,0.99)" in message


def test_parse_settings_value_not_a_literal():
    with pytest.raises(OptimizerSettingsError) as caught:
        parse_settings("x=(", field="train_lr_scheduler_settings")
    message = str(caught.value)
    assert "train_lr_scheduler_settings" in message and "'x=('" in message and "not a Python literal" in message
    assert "name=value" in message


@pytest.mark.parametrize("text, words", [
    ("=3", "keyword name"),
    ("x=", "no value"),
    ("a=1;a=2", "given twice"),
    ("1x=2", "keyword name"),
])
def test_parse_settings_other_bad_lines(text, words):
    with pytest.raises(OptimizerSettingsError, match=words):
        parse_settings(text, field="train_optimizer_settings")


# ---------------------------------------------------------------- every optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains(name):
    net = _toy()
    before = [p.detach().clone() for p in net.parameters()]
    lr = 1.0 if name in LR_NEAR_ONE else LR
    te_lr = lr if name in LR_NEAR_ONE else lr / 2  # adaptive ones take a single LR (tested below)
    info = build_optimizer(name, _groups(net, te_lr=te_lr), lr=lr, device="cpu", network=net)
    assert info.name == name
    # RAdamScheduleFree takes no step during its first rectification steps (silent_sgd_phase).
    losses = [_train_step(net, info) for _ in range(6 if name == "RAdamScheduleFree" else 3)]
    assert all(math.isfinite(loss) for loss in losses)
    for old, new in zip(before, net.parameters()):
        assert torch.isfinite(new).all()
        assert not torch.equal(old, new), f"{name} left a parameter unchanged"
    group_lrs = {g.get("lr") for g in info.optimizer.param_groups}
    if info.uses_own_schedule:
        assert group_lrs == {None}  # AdaFactor with relative_step drops every LR
    else:
        assert group_lrs == {te_lr, lr}  # text-encoder and U-Net LRs both kept


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_8bit_optimizers_keep_8bit_state(name):
    net = _toy()
    info = build_optimizer(name, _groups(net), lr=LR, device="cpu")
    _train_step(net, info)
    big = info.optimizer.state[net[0].weight]
    small = info.optimizer.state[net[1].bias]  # 4 elements: below min_8bit_size, so 32-bit
    assert big["state1"].dtype == torch.uint8
    assert small["state1"].dtype == torch.float32


def test_group_params_may_be_one_tensor_and_empty_groups_are_dropped():
    net = _toy()
    info = build_optimizer("AdamW", [{"params": net[0].weight}, {"params": []}], lr=LR, device="cpu")
    assert len(info.optimizer.param_groups) == 1 and info.optimizer.param_groups[0]["params"] == [net[0].weight]
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("AdamW", [{"params": []}], lr=LR, device="cpu")


def test_names_match_case_insensitively():
    net = _toy()
    assert build_optimizer("adamw8bit", net.parameters(), lr=LR, device="cpu").name == "AdamW8bit"
    assert build_optimizer("DADAPTADAM", net.parameters(), lr=1.0, device="cpu").name == "DadaptAdam"


def test_unknown_optimizer_name_suggests_nearest():
    with pytest.raises(ValueError) as caught:
        build_optimizer("AdamW8bt", _toy().parameters(), lr=LR, device="cpu")
    message = str(caught.value)
    assert "train_optimizer" in message and '"AdamW8bt"' in message and "Did you mean 'AdamW8bit'" in message
    assert "Prodigy" in message  # the choices are listed


def test_separator_entry_is_explained():
    with pytest.raises(ValueError, match="separator"):
        build_optimizer("--------------------------", _toy().parameters(), lr=LR, device="cpu")


@pytest.mark.parametrize("name, bad", [("AdamW", "weight_decai"), ("CAME", "betaz"), ("AdaFactor", "momentum")])
def test_unknown_optimizer_setting_lists_accepted(name, bad):
    # CAME swallows unknown keywords in **kwargs; the factory still refuses them.
    with pytest.raises(OptimizerSettingsError) as caught:
        build_optimizer(name, _toy().parameters(), lr=LR, device="cpu", settings={bad: 0.1})
    message = str(caught.value)
    assert "train_optimizer_settings" in message and repr(bad) in message and "Accepted settings:" in message
    assert ("weight_decay" if name != "AdaFactor" else "relative_step") in message


def test_lr_in_settings_points_to_the_lr_field():
    with pytest.raises(OptimizerSettingsError, match="train_learning_rate"):
        build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu", settings={"lr": 0.1})


def test_rejected_setting_value_names_the_field():
    with pytest.raises(OptimizerSettingsError, match="train_optimizer_settings") as caught:
        build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu", settings={"betas": (0.9, 1.5)})
    assert "1.5" in str(caught.value)


@pytest.mark.parametrize("as_text", [False, True])
def test_settings_reach_the_optimizer(as_text):
    text = "weight_decay=0.05;betas=(0.8,0.9)"
    settings = text if as_text else parse_settings(text, field="train_optimizer_settings")
    info = build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu", settings=settings)
    group = info.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.05 and tuple(group["betas"]) == (0.8, 0.9)


@pytest.mark.parametrize("name", ["SGDNesterov", "SGDNesterov8bit"])
def test_sgd_nesterov_defaults_and_forced_nesterov(name):
    info = build_optimizer(name, _toy().parameters(), lr=LR, device="cpu", settings={"nesterov": False})
    assert info.kwargs["nesterov"] is True and info.kwargs["momentum"] == 0.9
    assert any("always uses nesterov=True" in note for note in info.notes)
    group = info.optimizer.param_groups[0]
    if name == "SGDNesterov":
        assert group["nesterov"] is True and group["momentum"] == 0.9
    else:  # bitsandbytes keeps (momentum, dampening) as betas and has no Nesterov update: a note says so
        assert group["betas"][0] == 0.9 and any("ignores nesterov" in note for note in info.notes)


def test_sgd8bit_without_momentum_is_a_settings_error():
    with pytest.raises(OptimizerSettingsError, match="train_optimizer_settings"):
        build_optimizer("SGDNesterov8bit", _toy().parameters(), lr=LR, device="cpu", settings={"momentum": 0})


def test_lr_near_one_note():
    low = build_optimizer("Prodigy", _toy().parameters(), lr=1e-4, device="cpu")
    assert any("near 1.0" in note for note in low.notes)
    assert not build_optimizer("DAdaptSGD", _toy().parameters(), lr=1.0, device="cpu").notes


@pytest.mark.parametrize("name", sorted(LR_NEAR_ONE))
def test_adaptive_optimizers_refuse_differing_group_lrs(name):
    with pytest.raises(ValueError, match="train_textencoder_learning_rate"):
        build_optimizer(name, _groups(_toy(), te_lr=0.5), lr=1.0, device="cpu")


def test_missing_backend_names_package_and_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(OptimizerUnavailableError) as caught:
        build_optimizer("Prodigy", _toy().parameters(), lr=1.0, device="cpu")
    assert install_command("prodigyopt") in str(caught.value) and "DadaptAdam" in str(caught.value)
    assert "pip install" not in str(caught.value)  # a bare pip install can move the web UI's packages


def test_missing_bitsandbytes_suggests_installed_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(OptimizerUnavailableError) as caught:
        build_optimizer("Lion8bit", _toy().parameters(), lr=LR, device="cpu")
    assert install_command("bitsandbytes") in str(caught.value) and "choose Lion," in str(caught.value)


def _old_dadaptation(monkeypatch):
    """dadaptation 2.0, the wheel a web UI's pip (--prefer-binary) takes: no DAdaptLion."""
    import types

    import trainer.training.optim.optimizers as optim

    module = types.ModuleType("dadaptation")
    module.DAdaptAdam = torch.optim.AdamW
    monkeypatch.setitem(sys.modules, "dadaptation", module)
    monkeypatch.setattr(optim, "installed_version", lambda dist: "2.0" if dist == "dadaptation" else "9")
    monkeypatch.setattr(optim, "_installed", lambda name: True)


def test_an_optimizer_newer_than_its_installed_package_names_the_version_it_needs(monkeypatch):
    from trainer.training.optim.optimizers import availability_problem

    _old_dadaptation(monkeypatch)
    with pytest.raises(OptimizerUnavailableError) as caught:
        build_optimizer("DadaptLion", _toy().parameters(), lr=1.0, device="cpu")
    assert "needs dadaptation >= 3.0" in str(caught.value) and "2.0" in str(caught.value)
    assert install_command("dadaptation") in str(caught.value)
    problem = availability_problem("dadaptlion")
    assert problem.startswith("train_optimizer DadaptLion needs dadaptation >= 3.0, but 2.0 is installed")
    assert availability_problem("DadaptAdam") is None  # 2.0 has it


def test_the_run_checks_report_a_missing_or_too_old_optimizer_package_before_anything_loads(monkeypatch):
    from trainer.config import ConfigError, TrainConfig

    _old_dadaptation(monkeypatch)
    config = TrainConfig.from_dict({"mode": "iLECO", "original_prompt": "a cat", "train_optimizer": "DadaptLion"})
    with pytest.raises(ConfigError, match="DadaptLion needs dadaptation >= 3.0"):
        config.check_for_run()


def test_bitsandbytes_refuses_unsupported_device():
    with pytest.raises(OptimizerUnavailableError) as caught:
        build_optimizer("AdamW8bit", _toy().parameters(), lr=LR, device=torch.device("mps"))
    assert "'mps'" in str(caught.value) and "AdamW" in str(caught.value)


def test_paged_optimizer_on_cpu_says_it_runs_unpaged():
    info = build_optimizer("PagedAdamW8bit", _toy().parameters(), lr=LR, device="cpu")
    assert any("unpaged" in note for note in info.notes)


def test_adafactor_relative_step_rules():
    net = _toy()
    info = build_optimizer("AdaFactor", _groups(net), lr=LR, device="cpu")
    assert info.uses_own_schedule and info.kwargs["lr"] is None
    sched = build_scheduler("cosine", info, num_training_steps=10)
    assert type(sched.scheduler).__name__ == "AdafactorSchedule" and sched.notes
    _train_step(net, info, sched)
    assert all(0 < lr < 1 for lr in sched.lr_values())  # the LR AdaFactor computed itself

    manual = build_optimizer("AdaFactor", _toy().parameters(), lr=LR, device="cpu",
                             settings={"relative_step": False, "scale_parameter": False})
    assert not manual.uses_own_schedule and manual.optimizer.param_groups[0]["lr"] == LR
    forced = build_optimizer("AdaFactor", _toy().parameters(), lr=LR, device="cpu",
                             settings={"relative_step": False, "warmup_init": True})
    assert forced.uses_own_schedule and any("warmup_init" in note for note in forced.notes)


def test_adam_mini_needs_network_and_trains_only_given_params():
    with pytest.raises(ValueError, match="network="):
        build_optimizer("AdamMini", _toy().parameters(), lr=LR, device="cpu")
    net = _toy()
    extra = torch.nn.Parameter(torch.ones(3))
    net.register_parameter("extra", extra)  # trainable, but not handed to the optimizer
    info = build_optimizer("AdamMini", _groups(net), lr=LR, device="cpu", network=net)
    (net(_batch()[0]).sum() + extra.sum()).backward()
    info.optimizer.step()
    assert torch.equal(extra, torch.ones(3))
    assert {g["lr"] for g in info.optimizer.param_groups} == {TE_LR, LR}


def test_schedule_free_eval_and_train_modes():
    net = _toy()
    info = build_optimizer("AdamWScheduleFree", net.parameters(), lr=LR, device="cpu")
    assert info.is_schedule_free and info.optimizer.param_groups[0]["train_mode"]
    for _ in range(3):
        _train_step(net, info)
    train_weights = net[0].weight.detach().clone()
    optimizer_eval_mode(info)
    assert not info.optimizer.param_groups[0]["train_mode"]
    assert not torch.equal(train_weights, net[0].weight)  # the averaged weights, the ones to save
    optimizer_train_mode(info)
    assert torch.allclose(train_weights, net[0].weight, atol=1e-6)
    plain = build_optimizer("AdamW", net.parameters(), lr=LR, device="cpu")
    optimizer_eval_mode(plain)  # a no-op for the others
    assert torch.allclose(train_weights, net[0].weight, atol=1e-6)


# ---------------------------------------------------------------- every scheduler

N = 20


def _peak_then_low(lrs, w):
    assert max(lrs) == pytest.approx(LR) and lrs[N - 1] < 0.05 * LR


def _decreasing(lrs, w):
    after = lrs[w:N]
    assert all(b <= a for a, b in zip(after, after[1:])) and after[-1] < after[0] * 0.2


def _restarts(lrs, w):
    assert any(b > a * 2 for a, b in zip(lrs[w:N], lrs[w + 1:N])) and min(lrs[w:N]) < 0.1 * LR


def _constant(lrs, w):
    assert all(lr == pytest.approx(LR) for lr in lrs)


def _constant_after_warmup(lrs, w):
    assert all(lr == pytest.approx(LR) for lr in lrs[w:])


def _piecewise(lrs, w):
    assert lrs[:10] == pytest.approx([LR] * 10) and lrs[10:] == pytest.approx([LR * 0.1] * (N + 1 - 10))


def _exponential(lrs, w):
    assert all(b == pytest.approx(a * 0.9) for a, b in zip(lrs[w:], lrs[w + 1:]))


def _step(lrs, w):
    assert lrs[w:w + 10] == pytest.approx([LR] * 10) and lrs[w + 10] == pytest.approx(LR * 0.1)


def _plateau(lrs, w):
    # Constant losses: after patience (10) steps without improvement the LR drops by factor 0.1.
    assert lrs[w] == pytest.approx(LR) and lrs[-1] == pytest.approx(LR * 0.1)


def _cyclic(lrs, w):
    assert all(1e-5 * 0.99 <= lr <= 1e-3 for lr in lrs[w:]) and lrs[N] > lrs[w]


def _one_cycle(lrs, w):
    assert max(lrs) == pytest.approx(1e-3) and lrs[0] < 1e-3 / 10 and lrs[N - 1] < lrs[0]


SHAPES = {
    "cosine_annealing": _peak_then_low, "cosine": _peak_then_low, "cosine_with_restarts": _peak_then_low,
    "cosine_annealing_with_restarts": _restarts, "linear": _decreasing, "polynomial": _decreasing,
    "constant": _constant, "constant_with_warmup": _constant_after_warmup, "piecewise_constant": _piecewise,
    "exponential": _exponential, "step": _step, "multi_step": _constant_after_warmup,
    "reduce_on_plateau": _plateau, "cyclic": _cyclic, "one_cycle": _one_cycle,
}
NO_WARMUP = {"constant", "piecewise_constant"}  # diffusers gives these none; a note says so
OWN_RISE = {"one_cycle", "cyclic"}  # their LR starts low whatever the warm-up


def test_every_scheduler_has_an_expected_shape():
    assert set(SHAPES) == set(LR_SCHEDULERS)


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_scheduler_shape(name, warmup):
    net = _toy()
    info = build_optimizer("AdamW", net.parameters(), lr=LR, device="cpu")
    sched = build_scheduler(name, info, num_training_steps=N, warmup_steps=warmup, step_rules="1:10,0.1")
    lrs = []
    for _ in range(N):  # exactly N steps, as the loop runs them
        lrs.append(sched.lr_values()[0])
        info.optimizer.step()
        sched.step(1.0)  # a constant loss: a plateau
    lrs.append(sched.lr_values()[0])
    assert all(math.isfinite(lr) and lr >= 0 for lr in lrs)
    if warmup and name in NO_WARMUP:
        assert any("no warm-up" in note for note in sched.notes)
        w = 0
    else:
        w = warmup
    if warmup and name not in NO_WARMUP | OWN_RISE:
        assert lrs[0] <= 0.2 * LR and all(b > a for a, b in zip(lrs[:w], lrs[1:w + 1]))
        assert lrs[w] == pytest.approx(LR)
    SHAPES[name](lrs, w)


def test_one_cycle_runs_exactly_n_steps():
    info = build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu")
    sched = build_scheduler("one_cycle", info, num_training_steps=N)
    for _ in range(N):
        info.optimizer.step()
        sched.step()
    info.optimizer.step()
    with pytest.raises(ValueError, match="total steps is 20"):
        sched.step()  # total_steps is N: a step more would overrun


def test_reduce_on_plateau_needs_the_loss():
    info = build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu")
    sched = build_scheduler("reduce_on_plateau", info, num_training_steps=N)
    with pytest.raises(ValueError, match="loss"):
        sched.step()


@pytest.mark.parametrize("name, settings, words", [
    ("cosine", {"eta_min": 0.0}, "Accepted settings: num_cycles"),
    ("cosine_annealing", {"foo": 1}, "eta_min"),
    ("linear", {"num_warmup_steps": 3}, "train_lr_warmup_steps"),
    ("cosine_with_restarts", {"num_cycles": 3}, "train_lr_scheduler_num_cycles"),
    ("one_cycle", {"total_steps": 5}, "train_iterations"),
    ("constant", {"lr_end": 0.1}, "Accepted settings: none"),
])
def test_unknown_scheduler_setting_is_named(name, settings, words):
    info = build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu")
    with pytest.raises(OptimizerSettingsError, match="train_lr_scheduler_settings") as caught:
        build_scheduler(name, info, num_training_steps=N, settings=settings)
    assert words in str(caught.value)


@pytest.mark.parametrize("name, settings, final", [
    ("cosine_annealing", {"eta_min": 1e-4}, 1e-4),
    ("polynomial", {"lr_end": 1e-4}, 1e-4),
    ("linear", {"f_min": 0.5}, 0.5 * LR),
])
def test_scheduler_settings_reach_the_scheduler(name, settings, final):
    info = build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu")
    sched = build_scheduler(name, info, num_training_steps=N, settings=settings)
    for _ in range(N):
        info.optimizer.step()
        sched.step()
    assert sched.lr_values()[0] == pytest.approx(final, rel=1e-3)


def test_cycles_and_power_below_one_are_replaced():
    info = build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu")
    assert build_scheduler("cosine_with_restarts", info, num_training_steps=N, num_cycles=0).kwargs["num_cycles"] == 1
    assert build_scheduler("polynomial", info, num_training_steps=N, power=-2).kwargs["power"] == 1.0


def test_bad_scheduler_inputs():
    info = build_optimizer("AdamW", _toy().parameters(), lr=LR, device="cpu")
    with pytest.raises(ValueError, match="train_lr_step_rules"):
        build_scheduler("piecewise_constant", info, num_training_steps=N, step_rules="")
    with pytest.raises(ValueError, match="train_lr_warmup_steps"):
        build_scheduler("cosine", info, num_training_steps=N, warmup_steps=N)
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        build_scheduler("cosin", info, num_training_steps=N)


def test_schedule_free_gets_no_scheduler_and_reports_scheduled_lr():
    net = _toy()
    info = build_optimizer("AdamWScheduleFree", net.parameters(), lr=LR, device="cpu", settings={"warmup_steps": 10})
    sched = build_scheduler("cosine", info, num_training_steps=N)
    assert sched.scheduler is None and any("schedule-free" in note for note in sched.notes)
    _train_step(net, info, sched)
    assert 0 < sched.lr_values()[0] < LR  # the optimizer's own warm-up, read from scheduled_lr


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("opt_name, sched_name, warmup, save_in_eval", [
    ("AdamW", "cosine_annealing", 5, True),
    ("AdamW8bit", "linear", 2, True),
    ("Prodigy", "cosine", 0, True),
    ("AdamW", "reduce_on_plateau", 5, True),
    ("AdamWScheduleFree", "constant", 0, True),
    ("AdamWScheduleFree", "constant", 0, False),
    ("AdaFactor", "cosine", 0, True),
])
def test_state_dict_round_trip(opt_name, sched_name, warmup, save_in_eval):
    lr = 1.0 if opt_name in LR_NEAR_ONE else LR

    def build(net):
        groups = _groups(net, te_lr=lr if opt_name in LR_NEAR_ONE else TE_LR)
        info = build_optimizer(opt_name, groups, lr=lr, device="cpu")
        return info, build_scheduler(sched_name, info, num_training_steps=N, warmup_steps=warmup)

    net_a = _toy()
    info_a, sched_a = build(net_a)
    for _ in range(3):
        _train_step(net_a, info_a, sched_a)
    # Weights and optimizer state saved in the same mode: both in eval mode (beside the saved
    # network file) or both in train mode.
    if save_in_eval:
        optimizer_eval_mode(info_a)
    saved = copy.deepcopy((net_a.state_dict(), info_a.state_dict(), sched_a.state_dict()))
    optimizer_train_mode(info_a)
    lr_next = sched_a.lr_values()
    _train_step(net_a, info_a, sched_a)

    net_b = _toy(seed=99)
    net_b.load_state_dict(saved[0])
    info_b, sched_b = build(net_b)
    info_b.load_state_dict(saved[1])
    sched_b.load_state_dict(saved[2])
    if not info_b.uses_own_schedule:  # AdafactorSchedule reads the LR from gradients, none yet
        assert sched_b.lr_values() == lr_next
    _train_step(net_b, info_b, sched_b)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)
    assert sched_b.lr_values() == sched_a.lr_values()
