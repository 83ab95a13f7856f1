"""Base weights stored in a small dtype (fp8 e4m3, bf16, fp16) and upcast per layer for compute.

``store_weights(module, storage_dtype, compute_dtype)`` walks any ``nn.Module`` (an SD U-Net, a
Flux or other transformer) and, for every frozen ``nn.Linear`` / ``nn.Conv2d`` in it, keeps the
weight in ``storage_dtype``; each call casts that one weight to ``compute_dtype`` for its matmul
or convolution and lets the cast copy go right after. Biases and everything that is not a
Linear/Conv weight (norms, embeddings) keep their dtype: cast the module to the compute dtype
first. This is what kohya's ``--fp8_base`` does with the whole U-Net.

How the layers change: each one's class is swapped for a subclass that overrides ``forward``
only, so it is still an ``nn.Linear`` / ``nn.Conv2d`` to every ``isinstance`` check, and a
network module (``trainer/network/layers.py``) that wraps the layer afterwards calls this forward
as the layer's own. Apply the storage **before** injecting a network: a layer whose forward was
already replaced is refused with an error saying so.

Why not diffusers' ``apply_layerwise_casting``: its hooks cast the layer's weight in place before
the forward and back after it, and autograd keeps the upcast copy of every layer alive until that
layer's backward (a frozen layer still needs its weight for the input's gradient), so a LoRA
training step holds the whole model at the compute dtype again. Here a small autograd function
saves the stored (fp8) weight and upcasts it once more in the backward. Its hooks would also take
the place of the layer's ``forward`` that the network wraps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)
_STORED: dict[type, type] = {}


class _LinearFn(torch.autograd.Function):
    """``F.linear`` with a stored weight: saves the stored weight, not its upcast copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype):
        ctx.save_for_backward(weight)
        ctx.compute_dtype = compute_dtype
        return F.linear(x, weight.to(compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.compute_dtype) @ weight.to(ctx.compute_dtype)
        return grad_x, None, None, None


class _Conv2dFn(torch.autograd.Function):
    """``F.conv2d`` with a stored weight (zero padding): saves the stored weight only."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.compute_dtype = compute_dtype
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(compute_dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(shape, weight.to(ctx.compute_dtype), grad.to(ctx.compute_dtype),
                                                stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    dtype = self.compute_dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    return _LinearFn.apply(x.to(dtype), self.weight, bias, dtype)


def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    dtype = self.compute_dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    return _Conv2dFn.apply(x.to(dtype), self.weight, bias, dtype, self.stride, self.padding, self.dilation,
                           self.groups)


def _stored_class(cls: type) -> type:
    if cls not in _STORED:
        forward = _linear_forward if issubclass(cls, nn.Linear) else _conv_forward
        _STORED[cls] = type(f"Stored{cls.__name__}", (cls,), {"forward": forward, "_stored_base": cls})
    return _STORED[cls]


def is_stored(layer: nn.Module) -> bool:
    """True for a layer ``store_weights`` converted."""
    return "_stored_base" in type(layer).__dict__


@dataclass
class StorageReport:
    """What ``store_weights`` did: layers converted, bytes of their weights before and after, layers left."""

    layers: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    skipped: list = None

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after


def _eligible(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be stored (None when it can)."""
    if type(layer).forward not in (nn.Linear.forward, nn.Conv2d.forward):
        return "its class has its own forward"
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return f"padding_mode {layer.padding_mode}"
    if layer.weight.requires_grad:
        return "its weight trains"
    if "forward" in layer.__dict__:
        return "a network is already applied to it (store the base weights before injecting a network)"
    return None


def store_weights(module: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> StorageReport:
    """Keep the weights of ``module``'s frozen Linear/Conv2d layers in ``storage_dtype``.

    Returns what changed. Raises ``ValueError`` for a storage dtype the installed torch lacks or
    when a network is already applied to one of the layers (store first, then inject).
    """
    if not isinstance(storage_dtype, torch.dtype) or not storage_dtype.is_floating_point:
        raise ValueError(f"weight storage dtype must be a floating torch.dtype, got {storage_dtype!r}")
    report = StorageReport(skipped=[])
    for name, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or is_stored(layer):
            continue
        why = _eligible(layer)
        if why is not None:
            if "network is already applied" in why:
                raise ValueError(f"{name}: {why}")
            report.skipped.append(f"{name} ({why})")
            continue
        weight = layer.weight
        report.bytes_before += weight.numel() * weight.element_size()
        if weight.dtype != storage_dtype:
            layer.weight = nn.Parameter(weight.detach().to(storage_dtype), requires_grad=False)
        report.bytes_after += layer.weight.numel() * layer.weight.element_size()
        layer.__class__ = _stored_class(type(layer))
        layer.compute_dtype = compute_dtype
        report.layers += 1
    return report


def restore_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Undo ``store_weights``: the layers get their class back and their weights in ``dtype``
    (what fp8 rounded stays rounded). Returns the number of layers restored."""
    count = 0
    for layer in module.modules():
        if is_stored(layer):
            layer.__class__ = type(layer).__dict__["_stored_base"]
            layer.weight = nn.Parameter(layer.weight.detach().to(dtype), requires_grad=False)
            del layer.compute_dtype
            count += 1
    return count


def fp8_supported(device: torch.device | str) -> bool:
    """Whether fp8 e4m3 tensors can be stored and cast on ``device`` (CUDA and CPU; not MPS)."""
    kind = str(getattr(device, "type", device)).split(":")[0]
    return FP8 is not None and kind in ("cpu", "cuda")
