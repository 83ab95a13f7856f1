"""Memory profiles: which savings a run switches on, chosen before the model reaches the device.

``memory_profile`` is one of

- ``speed``: the settings as they are (what every run did before profiles existed);
- ``balanced``: gradient checkpointing, and the frozen base weights stored in 16 bits (bf16
  where the device has it, else fp16; nothing to do when the model precision is 16-bit already);
- ``low``: balanced's checkpointing, base weights stored in fp8 e4m3 and upcast per layer for
  compute (``trainer/network/storage.py``), an 8-bit optimizer in place of Adam/AdamW/Lion
  (bitsandbytes; Adafactor where bitsandbytes cannot run), on a GPU the VAE in bf16 and the
  U-Net moved to the GPU only after the latents and captions are cached, and, only where the
  estimate still exceeds the free memory, optimizer state paged to system memory (bitsandbytes'
  paged optimizers, CUDA only);
- ``auto``: the fastest of speed, balanced and low whose estimate (``estimate.py``) fits in the
  device's free memory with ``HEADROOM`` to spare; without a free-memory figure (a CPU) it keeps
  speed.

Every profile leaves on what the settings already switch on (it never turns checkpointing off
or an 8-bit optimizer back to 32 bits), caches latents and text-encoder outputs with the VAE and
unused text encoders freed after caching (the modes always do), and runs attention through
PyTorch's scaled-dot-product attention. Each change is reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from trainer.training.memory.estimate import MemoryEstimate

PROFILES = ("speed", "balanced", "low")  # fastest first
HEADROOM = 0.10  # auto wants the estimate at most 90% of the free memory

# An optimizer with two fp32 states per parameter -> its 8-bit form (same maths, 8-bit state).
EIGHT_BIT = {"AdamW": "AdamW8bit", "Adam": "Adam8bit", "PagedAdamW": "PagedAdamW8bit",
             "PagedAdamW32bit": "PagedAdamW8bit", "Lion": "Lion8bit"}
PAGED = {"AdamW8bit": "PagedAdamW8bit", "Lion8bit": "PagedLion8bit"}
# Settings that both the 32-bit and the 8-bit optimizer take with the same meaning.
_SHARED_SETTINGS = {"betas", "eps", "weight_decay", "amsgrad"}
_ADAFACTOR_SETTINGS = "relative_step=False; scale_parameter=False; warmup_init=False"


@dataclass
class MemoryPlan:
    """What a run switches on for memory, and why.

    ``config`` is the effective config (checkpointing, optimizer, VAE precision changed);
    ``storage`` the dtype name the U-Net's Linear/Conv weights are stored in ("fp8", "bf16",
    "fp16") or None; ``defer_unet`` places the U-Net on the device at its first call (after
    caching); ``choices`` the lines to log.
    """

    asked: str
    profile: str
    config: Any
    storage: str | None = None
    defer_unet: bool = False
    estimate: MemoryEstimate | None = None
    free: int | None = None
    choices: list = field(default_factory=list)
    hint: str = ""  # a slower profile that would fit, when this one does not
    denoiser: str = "U-Net"  # what the messages call the trained model ("transformer" on Flux.1 / Z-Image)

    def lines(self) -> list[str]:
        how = "" if self.asked == self.profile else f" (asked: {self.asked})"
        return [f"memory profile: {self.profile}{how}"] + [f"  {c}" for c in self.choices]


@dataclass
class _Option:
    """One profile worked out for a config: config changes, estimate facts, storage, reasons."""

    profile: str
    changes: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    storage: str | None = None
    defer_unet: bool = False
    choices: list = field(default_factory=list)


def _bf16_ok(kind: str) -> bool:
    if kind == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return kind == "cpu"


def _bnb_ok(kind: str) -> bool:
    import importlib.util

    return kind in ("cuda", "cpu") and importlib.util.find_spec("bitsandbytes") is not None


def _settings(config) -> dict | None:
    from trainer.training.optim.settings import OPTIMIZER_FIELD, OptimizerSettingsError, parse_settings

    try:
        return parse_settings(config.train_optimizer_settings or "", field=OPTIMIZER_FIELD)
    except OptimizerSettingsError:
        return None  # the run reports it with the right message; no swap


def _optimizer_choice(config, kind: str, *, bnb: bool) -> tuple[dict, str]:
    """(config changes, reason) for an 8-bit (or Adafactor) optimizer in place of the configured one."""
    name = str(config.train_optimizer)
    settings = _settings(config)
    if name not in EIGHT_BIT:
        return {}, f"optimizer: keeps {name} (no 8-bit form of it with the same maths)"
    if settings is None or set(settings) - _SHARED_SETTINGS:
        extra = ", ".join(sorted(set(settings or {}) - _SHARED_SETTINGS)) or "unreadable settings"
        return {}, f"optimizer: keeps {name} (its settings {extra} have no 8-bit counterpart)"
    if bnb:
        new = EIGHT_BIT[name]
        return ({"train_optimizer": new},
                f"optimizer: {new} instead of {name} (bitsandbytes; 8-bit optimizer state, a quarter of the bytes)")
    if set(settings) - {"weight_decay"}:
        return {}, f"optimizer: keeps {name} (bitsandbytes cannot run on {kind}; its settings do not fit Adafactor)"
    extra = f"; weight_decay={settings['weight_decay']!r}" if "weight_decay" in settings else ""
    return ({"train_optimizer": "AdaFactor", "train_optimizer_settings": _ADAFACTOR_SETTINGS + extra},
            f"optimizer: AdaFactor (your learning rate and schedule) instead of {name}: bitsandbytes' 8-bit "
            f"optimizers do not run on {kind}; Adafactor keeps factored second moments, a fraction of Adam's state")


def options(config, kind: str, *, bf16: bool | None = None, bnb: bool | None = None,
            denoiser: str = "U-Net") -> dict[str, _Option]:
    """Each profile of PROFILES worked out for ``config`` on a device of ``kind``; ``denoiser`` names
    the trained model in the reasons ("U-Net", or "transformer" for Flux.1 / Z-Image)."""
    from trainer.network.storage import fp8_supported

    bf16 = _bf16_ok(kind) if bf16 is None else bf16
    bnb = _bnb_ok(kind) if bnb is None else bnb
    precision = str(config.train_model_precision)
    half = "bf16" if bf16 else "fp16"
    out = {"speed": _Option("speed", choices=["nothing changed: the settings as they are"])}

    def checkpointing(opt: _Option) -> None:
        if config.use_gradient_checkpointing:
            opt.choices.append("gradient checkpointing: on already")
        else:
            opt.changes["use_gradient_checkpointing"] = True
            opt.choices.append("gradient checkpointing: on (activations are recomputed in the backward pass: "
                               "much less activation memory, ~20-30% slower steps)")
        opt.facts["checkpointing"] = True

    def sixteen(opt: _Option) -> None:
        if precision in ("fp16", "bf16", "model"):
            opt.choices.append(f"base weights: {precision} already")
            return
        opt.storage = half
        opt.facts["unet_bytes"] = 2
        opt.choices.append(f"base weights: {denoiser} Linear/Conv weights stored in {half}, upcast per layer to "
                           f"{precision} for compute (half the bytes of the weights)")

    balanced = _Option("balanced")
    checkpointing(balanced)
    sixteen(balanced)
    out["balanced"] = balanced

    low = _Option("low")
    checkpointing(low)
    if fp8_supported(kind):
        low.storage = "fp8"
        low.facts["unet_bytes"] = 1
        low.choices.append(f"base weights: {denoiser} Linear/Conv weights stored in fp8 e4m3, upcast per layer to "
                           f"{'fp16' if precision == 'model' else precision} for compute (a quarter of fp32's "
                           "bytes, half of fp16's)")
    else:
        low.choices.append(f"base weights: fp8 cannot be stored on {kind}; 16-bit instead")
        sixteen(low)
    changes, why = _optimizer_choice(config, kind, bnb=bnb)
    low.changes.update(changes)
    if changes:
        low.facts["optimizer"] = changes["train_optimizer"]
    low.choices.append(why)
    if kind == "cuda":
        if str(config.train_VAE_precision) == "fp32" and bf16:
            low.changes["train_VAE_precision"] = "bf16"
            low.facts["vae_bytes"] = 2
            low.choices.append("VAE: bf16 while it encodes the images (about 0.6x the encoding memory)")
        low.defer_unet = True
        low.facts["unet_after_caching"] = True
        low.facts["vae_in_training"] = False  # every latent is cached before the U-Net arrives
        low.choices.append(f"{denoiser}: moved to the GPU after latents and captions are cached (the VAE and the "
                           "text encoders have left by then)")
    out["low"] = low
    for opt in (balanced, low):
        when = ("before training" if opt.defer_unet else
                "as the first epoch reaches them (where the mode can), so training starts at once")
        opt.choices.append(f"latents and captions: cached {when}; the VAE and untrained text "
                           "encoders are freed after caching")
    return out


def fits(estimate: MemoryEstimate, free: int | None) -> bool:
    """Whether ``estimate`` fits in ``free`` bytes with HEADROOM to spare (True without a figure)."""
    return free is None or estimate.total <= free * (1 - HEADROOM)


def choose(estimates: dict[str, MemoryEstimate], free: int | None) -> tuple[str, str]:
    """(profile, reason) of ``auto``: the fastest profile whose estimate fits in ``free``."""
    from trainer.training.memory.advice import gib

    if free is None:
        return "speed", "speed: no free-memory figure for this device (a CPU)"
    for name in PROFILES:
        if name in estimates and fits(estimates[name], free):
            slower = [p for p in PROFILES[:PROFILES.index(name)] if p in estimates]
            why = "; ".join(f"{p} needs about {gib(estimates[p].total)}" for p in slower)
            return name, (f"{name}: fits in {gib(free)} free ({gib(estimates[name].total)} estimated"
                          + (f"; {why}" if why else "") + f"; {int(HEADROOM * 100)}% kept spare)")
    return "low", (f"low: nothing fits in {gib(free)} free with {int(HEADROOM * 100)}% kept spare; low needs the "
                   f"least ({gib(estimates['low'].total)})")


def plan(config, estimate: MemoryEstimate | None, device: Any, free: int | None, *,
         bf16: bool | None = None, bnb: bool | None = None) -> MemoryPlan:
    """The plan for ``config`` (its ``memory_profile``) given the speed-profile ``estimate``."""
    from trainer.training.memory.estimate import denoiser_name, device_kind

    kind = device_kind(device)
    asked = config.memory_profile
    denoiser = denoiser_name(estimate.facts["family"]) if estimate is not None else "U-Net"
    opts = options(config, kind, bf16=bf16, bnb=bnb, denoiser=denoiser)
    estimates = {name: (estimate.with_facts(**o.facts) if o.facts else estimate)
                 for name, o in opts.items()} if estimate is not None else {}
    reason = None
    if asked == "auto":
        name, reason = choose(estimates, free) if estimates else ("speed", "no memory estimate for this model: speed")
    else:
        name = asked
    opt = opts[name]
    chosen = estimates.get(name)
    choices = ([f"auto chose {reason}"] if reason else []) + list(opt.choices)
    changes = dict(opt.changes)
    if name == "low" and kind == "cuda" and chosen is not None and free is not None and not fits(chosen, free):
        current = changes.get("train_optimizer", str(config.train_optimizer))
        if current in PAGED:
            changes["train_optimizer"] = PAGED[current]
            chosen = chosen.with_facts(offload_optimizer=True, optimizer=PAGED[current])
            choices.append(f"optimizer state: paged to system memory ({PAGED[current]}): the estimate still "
                           f"exceeds the free memory less {int(HEADROOM * 100)}% kept spare")
        else:
            choices.append(f"optimizer state: stays on the GPU ({current} has no paged form)")
    hint = ""
    if chosen is not None and not fits(chosen, free):
        from trainer.training.memory.advice import gib

        better = [p for p in PROFILES[PROFILES.index(name) + 1:] if fits(estimates[p], free)]
        if better:
            hint = (f"memory_profile {better[0]} (or auto) would fit: about {gib(estimates[better[0]].total)} "
                    f"estimated")
    effective = _apply(config, changes)
    return MemoryPlan(asked=asked, profile=name, config=effective, storage=opt.storage, defer_unet=opt.defer_unet,
                      estimate=chosen, free=free, choices=choices, hint=hint, denoiser=denoiser)


def _apply(config, changes: dict):
    """``config`` with ``changes``, in the 2nd pass too (Difference) where it has its own values."""
    if not changes:
        return config
    second = config.second_pass
    if second is not None:
        same = (second.train_optimizer, second.train_optimizer_settings) == \
            (config.train_optimizer, config.train_optimizer_settings)
        # the optimizer swap was worked out for pass 1's optimizer: pass 2 takes it only when it has the same
        own = {k: v for k, v in changes.items() if same or not k.startswith("train_optimizer")}
        return config.replace(second_pass=second.replace(**own), **changes)
    return config.replace(**changes)


# ----------------------------------------------------------------------------- applying a plan
_STORAGE_DTYPES = {"fp8": "float8_e4m3fn", "bf16": "bfloat16", "fp16": "float16"}


def place_unet(unet, device, compute_dtype, memory_plan: MemoryPlan | None,
               place: Callable[[Any, Any, Any], None], log: Callable[[str], None] = lambda m: None) -> None:
    """Put the U-Net where the plan says: its Linear/Conv weights stored in the plan's dtype, on
    ``device`` now or at its first call (``defer_unet``). ``place(module, device, dtype)`` is the
    job's move-and-cast of a frozen module."""
    import torch

    from trainer.network.storage import store_weights

    if memory_plan is None or (memory_plan.storage is None and not memory_plan.defer_unet):
        place(unet, device, compute_dtype)
        return
    here = next(unet.parameters()).device
    place(unet, here, compute_dtype)  # cast where it is: no full-size copy reaches the device
    if memory_plan.storage is not None:
        storage_dtype = getattr(torch, _STORAGE_DTYPES[memory_plan.storage])
        report = store_weights(unet, storage_dtype, compute_dtype)
        log(f"  base weights: {report.layers} {memory_plan.denoiser} layers stored in {memory_plan.storage}, "
            f"{report.bytes_before / 2**20:.0f} -> {report.bytes_after / 2**20:.0f} MiB")
    if memory_plan.defer_unet and here != torch.device(device):
        move_at_first_call(unet, device)
    else:
        unet.to(device=device)


def move_at_first_call(module, device) -> None:
    """Move ``module`` to ``device`` when it is first called (a forward pre-hook that removes itself)."""
    def hook(mod, args):
        handle.remove()
        mod.to(device=device)

    handle = module.register_forward_pre_hook(hook)


# The U-Net processors that AttnProcessor2_0 replaces with the same maths through SDPA.
_CLASSIC_PROCESSORS = {"AttnProcessor", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU"}


def use_sdpa(unet) -> str:
    """Attention through ``torch.nn.functional.scaled_dot_product_attention`` (diffusers'
    ``AttnProcessor2_0``, whose CUDA backends include the memory-efficient kernel); returns what was done."""
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError:  # pragma: no cover - every supported diffusers has it
        return "attention: as the model has it (this diffusers has no AttnProcessor2_0)"
    processors = getattr(unet, "attn_processors", None)
    if not processors:
        return "attention: as the model has it"
    other = {type(p).__name__ for p in processors.values() if not isinstance(p, AttnProcessor2_0)}
    if not other:
        return "attention: SDPA (scaled_dot_product_attention) already"
    if not other <= _CLASSIC_PROCESSORS:  # a model's own processors (Flux, Z-Image) stay as they are
        return f"attention: the model's own ({', '.join(sorted(other))})"
    unet.set_attn_processor(AttnProcessor2_0())
    return f"attention: SDPA (scaled_dot_product_attention) in place of {', '.join(sorted(other))}"
