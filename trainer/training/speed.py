"""Step-speed switches of a run, each applied once at the start and logged with what it did.

- **channels-last** memory format for a U-Net on CUDA, where cuDNN's convolutions run faster in
  NHWC; on other devices it is left alone (the CPU kernels gain nothing from it) and the log says so.
  The flow-matching transformers have no convolutions to speak of and keep their layout.
- **pinned-memory batch transfer** on CUDA: ``modes.base.to_device`` copies each batch through
  page-locked memory with a non-blocking copy.
- **torch.compile of the denoiser** (the ``compile_unet`` setting, off by default): its
  ``forward`` is replaced by a compiled one. Inductor keeps what it compiled in
  ``<logs>/compile`` (``TORCHINDUCTOR_CACHE_DIR``, unless the environment already names a
  folder), so a second run of the same model reuses the kernels instead of compiling again.
  Compilation happens at the first call; when it fails (no compiler, an unsupported operation,
  an old GPU) the forward goes back to the uncompiled one for the rest of the run, the call is
  repeated uncompiled and the reason is logged. Running out of memory is not a compile failure
  and is raised as it is.

The optimizer's fused / multi-tensor step is chosen where the optimizer is built
(``optim/optimizers.py``), and the loop reads losses back only at log intervals (``loop.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

_OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def channels_last(unet, device: torch.device, *, transformer: bool = False) -> str:
    """Put ``unet`` in channels-last memory format on CUDA; returns what was done, for the log."""
    if transformer:
        return "channels-last: not used (a transformer has no convolutions to gain from it)"
    if torch.device(device).type != "cuda":
        return f"channels-last: not used on {torch.device(device).type} (it speeds up CUDA convolutions only)"
    try:
        unet.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError) as error:  # a weight storage without that layout (fp8 on an old torch)
        return f"channels-last: not used ({_reason(error)})"
    return "channels-last: the U-Net's convolution weights are in channels-last (NHWC) format"


def pinned_transfer(device: torch.device) -> str:
    """What the batch transfer does on ``device``, for the log."""
    if torch.device(device).type == "cuda":
        return "batches: copied to the GPU from pinned memory, without waiting"
    return f"batches: plain copies (pinned memory only helps a transfer to CUDA; the device is {torch.device(device).type})"


def compile_forward(model, cache_dir: Path, log: Callable[[str], None]) -> Callable[[], None]:
    """Compile ``model``'s forward with ``torch.compile`` (falls back as the module docstring says).

    Returns a function that puts the original forward back."""
    cache_dir = Path(cache_dir)
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    where = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    had_own = "forward" in vars(model)
    eager = model.forward
    try:
        compiled = torch.compile(eager)
    except Exception as error:  # torch.compile itself refuses (an old torch, a Python it does not support)
        log(f"compile: torch.compile is not available here ({_reason(error)}); training goes on uncompiled")
        return lambda: None
    state = {"compiled": True}

    def forward(*args, **kwargs):
        if state["compiled"]:
            try:
                return compiled(*args, **kwargs)
            except _OOM:
                raise
            except Exception as error:
                state["compiled"] = False
                model.forward = eager
                log(f"compile: torch.compile failed ({_reason(error)}); training goes on uncompiled")
        return eager(*args, **kwargs)

    model.forward = forward
    log(f"compile: torch.compile of the {type(model).__name__} (compiled at its first call; kernels kept in "
        f"{where}, so a second run reuses them)")

    def undo() -> None:
        if had_own:
            model.forward = eager
        else:
            vars(model).pop("forward", None)

    return undo


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__
