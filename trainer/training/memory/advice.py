"""What to tell the user about a memory estimate: the summary, the warning, what to switch on.

Every suggestion is priced by re-running the estimate of ``trainer/training/memory/estimate.py`` with that one
setting changed; only changes that apply to the run and save a noticeable amount are offered,
largest saving first.
"""

from __future__ import annotations

from typing import Any

from trainer.training.memory.estimate import GiB, MiB, MemoryEstimate

_WORTH = 64 * MiB  # smaller savings are not worth a setting change
_HALF_SAVING_OPTIMIZERS = {"AdamW", "Adam", "PagedAdamW", "PagedAdamW32bit", "Prodigy", "DadaptAdam",
                           "DAdaptAdan", "DAdaptAdaGrad", "DAdaptSGD"}


def gib(n: float) -> str:
    """Bytes as GiB with one decimal (MiB below 1 GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _candidates(est: MemoryEstimate) -> list[tuple[str, dict]]:
    f = est.facts
    out = []
    if not f["checkpointing"]:
        out.append(("turn on use_gradient_checkpointing (recomputes activations: less memory, ~20-30% slower steps)",
                    {"checkpointing": True}))
    if f["model_bytes"] == 4:
        if f["device"] == "cuda":
            out.append(("set train_model_precision to fp16 (or bf16 on RTX 30xx and newer)",
                        {"model_bytes": 2, "unet_bytes": min(2, f.get("unet_bytes", 4)), "model_precision": "fp16"}))
        else:
            out.append(("set train_model_precision to bf16 (fast only on CPUs with AVX512-BF16/AMX)",
                        {"model_bytes": 2, "unet_bytes": min(2, f.get("unet_bytes", 4)), "model_precision": "bf16"}))
    if f["optimizer"] in _HALF_SAVING_OPTIMIZERS and f["device"] == "cuda":
        out.append((f"use the AdamW8bit optimizer instead of {f['optimizer']} (8-bit optimizer state)",
                    {"optimizer": "AdamW8bit"}))
    if f["batch"] > 1:
        out.append((f"lower train_batch_size to 1 and set gradient_accumulation_steps to {f['batch']} "
                    "(same effective batch)", {"batch": 1}))
    if f["device"] == "cuda" and f.get("unet_bytes", f["model_bytes"]) > 1:
        out.append(("set memory_profile to low (or auto): among its savings, the base weights stored in fp8 and "
                    "moved to the GPU only after caching", {"unet_bytes": 1, "unet_after_caching": True,
                                                            "vae_in_training": False}))
    if f["train_te"]:
        named = " / ".join(f.get("te_trained") or ("BASE",))
        out.append((f"remove {named} from network_blocks (do not train the text encoder; its outputs are then "
                    "cached and it leaves the device)", {"train_te": False}))
    if not f["free_after_caching"] and f["vae_bytes"] == 4 and f["device"] == "cuda":
        out.append(("set train_VAE_precision to fp16 or bf16", {"vae_bytes": 2}))
    side = max(f["height"], f["width"])
    if side > 512:
        scale = 0.75
        h, w = _round64(f["height"] * scale), _round64(f["width"] * scale)
        out.append((f"train at a smaller image_size, e.g. {h},{w}",
                    {"height": h, "width": w, "cells": (h // 8) * (w // 8)}))
    return out


def _round64(v: float) -> int:
    return max(64, int(v) // 64 * 64)


def suggestions(est: MemoryEstimate, free: int | None = None) -> list[tuple[int, str]]:
    """(saving in bytes, text) of every change that applies and helps, largest saving first."""
    priced = []
    for text, change in _candidates(est):
        after = est.with_facts(**change).total
        saving = est.total - after
        if saving < _WORTH:
            continue
        fits = "" if free is None or after > free else " (enough on its own)"
        priced.append((saving, f"{text}: saves about {gib(saving)}{fits}"))
    priced.sort(key=lambda item: -item[0])
    return priced


def suggestion_texts(est: MemoryEstimate, free: int | None = None) -> list[str]:
    """Setting changes that would lower the peak, largest saving first; with ``free``, whether each fits."""
    return [text for _, text in suggestions(est, free)]


def plan_to_fit(est: MemoryEstimate, free: int) -> tuple[list[str], int]:
    """Changes to make, largest saving first, until the run fits in ``free`` (or nothing is left)."""
    chosen, changes, current = [], {}, est
    for text, change in sorted(_candidates(est), key=lambda c: est.with_facts(**c[1]).total):
        if current.total <= free:
            break
        trial = est.with_facts(**changes, **change)
        if current.total - trial.total >= _WORTH:
            chosen.append(text.split(" (")[0])
            changes.update(change)
            current = trial
    return chosen, current.total


def format_estimate(est: MemoryEstimate, free: int | None = None) -> str:
    """A few lines for the CLI / UI: the estimate, its largest items and, when it will not fit, a warning."""
    where = {"cpu": "RAM", "cuda": "GPU memory"}.get(est.device, f"{est.device} memory")
    items = sorted(est.breakdown.items(), key=lambda kv: -kv[1])
    lines = [f"Estimated peak {where}: {gib(est.total)} ({est.phase}; "
             + ", ".join(f"{name} {gib(size)}" for name, size in items[:5]) + ")"]
    if free is not None:
        lines.append(f"Free {where} now: {gib(free)}")
    if free is not None and est.total > free:
        lines.append(
            f"WARNING: this run needs about {gib(est.total)} but only {gib(free)} is free. On Windows the "
            "driver then spills into shared system memory and training runs 10-100x slower; elsewhere it "
            "stops with an out-of-memory error.")
        tips = suggestion_texts(est, free)
        if tips:
            lines.append("Each of these lowers it: " + "; ".join(tips))
        plan, after = plan_to_fit(est, free)
        if len(plan) > 1 and after <= free:
            lines.append(f"Together these fit ({gib(after)}): " + "; ".join(plan))
        elif plan and after > free:
            lines.append(f"Even with all of them it needs about {gib(after)}; use a GPU with more memory.")
    return "\n".join(lines)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch / CUDA / MPS / host allocation failures."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text \
        or "failed to allocate" in text


def oom_message(exc: BaseException, estimate: MemoryEstimate | None, *, saved: Any = None,
                free: int | None = None) -> str:
    """The message for an out-of-memory error: what ran out, the estimate and what to switch on."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    where = "GPU memory" if estimate is not None and estimate.device == "cuda" else "memory"
    parts = [f"Out of {where}: {first}"]
    tips = []
    if estimate is not None:
        budget = f" with {gib(free)} free" if free is not None else ""
        parts.append(f"The run was estimated to need about {gib(estimate.total)}{budget}.")
        tips = suggestion_texts(estimate, free)
    if tips:
        parts.append("To need less: " + "; ".join(tips) + ".")
    else:
        parts.append("To need less: turn on use_gradient_checkpointing, use fp16/bf16 model precision, "
                     "an 8-bit optimizer (AdamW8bit) or a smaller batch / image_size.")
    if saved:
        parts.append(f"What was learned so far is saved in {saved}.")
    return " ".join(parts)
