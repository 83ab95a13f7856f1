"""The module kinds of a network: LoRA (lierla / c3lier) and LoHa.

Each module wraps one Linear or Conv2d of the frozen base model by replacing that layer's
``forward`` with its own, which calls the original and adds the module's contribution:

    y = org(x) + m · (α / r) · Δ(x)

``m`` is the run-time multiplier, read at every call. The base weights are never modified.
A *fused* module wraps several Linear layers that share one input and together make one layer of
the original checkpoint (Flux's ``qkv`` is diffusers' ``to_q``/``to_k``/``to_v``): it holds the
fused layer's parameters (one ``lora_up`` of all the parts' rows) and each part adds its rows. A
second network on the same layer wraps the already-wrapped forward, so two networks can be
active at once (Difference mode); ``restore`` must then run in the reverse order of ``inject``.

LoHa maths (the Hadamard product of two low-rank pairs, Tucker for k×k convs) comes from the
``lycoris-lora`` package (``lycoris.functional.loha``); this file only holds the parameters under
LyCORIS's kohya key names and applies the rebuilt ΔW with the layer's own op.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.compat import LYCORIS, require


def effective_alpha(alpha: float | None, rank: int) -> float:
    """kohya's rule: an alpha of 0 or None means alpha = rank (scale 1)."""
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def is_kxk_conv(module: nn.Module) -> bool:
    """A Conv2d whose kernel is larger than 1×1 (those use the conv rank/alpha)."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


class NetworkModule(nn.Module):
    """Shared part of every module kind: naming, alpha, multiplier and forward wrapping.

    The wrapped layer is kept in a list so that it is not registered as a sub-module: the
    network's ``state_dict``, ``parameters`` and ``.to()`` never touch the base model.
    """

    def __init__(self, lora_name: str, org_module, rank: int, alpha: float | None):
        super().__init__()
        parts = list(org_module) if isinstance(org_module, (list, tuple)) else [org_module]
        if not parts:
            raise ValueError(f"{lora_name}: no layer to wrap")
        for part in parts:
            if not isinstance(part, (nn.Linear, nn.Conv2d)):
                raise TypeError(
                    f"{lora_name}: only Linear and Conv2d layers can be wrapped, got {type(part).__name__}"
                )
        if len(parts) > 1 and (not all(isinstance(p, nn.Linear) for p in parts)
                               or len({p.in_features for p in parts}) != 1):
            raise ValueError(f"{lora_name}: a fused module needs Linear layers with one input width")
        if int(rank) < 1:
            raise ValueError(f"{lora_name}: rank must be at least 1, got {rank}")
        self.lora_name = lora_name
        self.file_name = lora_name  # the module's name in a saved file (network/dit.py may differ)
        self.rank = int(rank)
        alpha_value = effective_alpha(alpha, self.rank)
        self.register_buffer("alpha", torch.tensor(alpha_value, device=parts[0].weight.device))
        self.scale = alpha_value / self.rank
        self.multiplier = 1.0
        self._org = parts
        # Output rows of each part in the fused weight (one part: all rows).
        sizes = [p.out_features if isinstance(p, nn.Linear) else p.weight.shape[0] for p in parts]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._rows = [slice(a, a + n) for a, n in zip(starts, sizes)]
        self._org_forwards: list = [None] * len(parts)
        self._wrappers: list = [None] * len(parts)
        self._had_own_forward = [False] * len(parts)

    @property
    def org_module(self) -> nn.Module:
        """The wrapped base layer (the first part of a fused module)."""
        return self._org[0]

    @property
    def org_modules(self) -> list:
        """Every wrapped base layer; more than one for a fused module (q, k, v of one ``qkv``)."""
        return list(self._org)

    @property
    def weight_shape(self) -> tuple:
        """Shape of the (fused) base weight this module's ΔW has."""
        first = self._org[0]
        if len(self._org) == 1:
            return tuple(first.weight.shape)
        # out/in features, not weight.shape: a quantised Linear may store its weight packed
        return (sum(p.out_features for p in self._org), first.in_features)

    @property
    def injected(self) -> bool:
        """True while this module wraps its layer's forward."""
        return self._org_forwards[0] is not None

    def sync_scale(self) -> None:
        """Recompute α/r after the ``alpha`` buffer was overwritten (loading a file)."""
        self.scale = float(self.alpha.float().item()) / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Keep α/r in step with a loaded alpha (torch's load_state_dict and our file loader).
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.alpha.device.type != "meta":
            self.sync_scale()

    def inject(self) -> None:
        """Replace the wrapped layers' forward with this module's (stacking on any earlier wrapper)."""
        if self.injected:
            raise RuntimeError(f"{self.lora_name} is already applied")
        for i, org in enumerate(self._org):
            self._had_own_forward[i] = "forward" in org.__dict__
            self._org_forwards[i] = org.forward
            wrapper = self.forward if len(self._org) == 1 else functools.partial(self._forward_part, i)
            self._wrappers[i] = wrapper
            org.forward = wrapper

    @property
    def outermost(self) -> bool:
        """True when no later wrapper sits on top of this one (it can be restored now)."""
        return all(org.__dict__.get("forward") == w for org, w in zip(self._org, self._wrappers))

    def restore(self) -> None:
        """Give the wrapped layers back the forward they had before ``inject``."""
        if not self.injected:
            return
        if not self.outermost:
            raise RuntimeError(
                f"{self.lora_name}: another network was applied on top of this one and is still active; "
                "remove networks in the reverse order of applying them"
            )
        for i, org in enumerate(self._org):
            if self._had_own_forward[i]:
                org.forward = self._org_forwards[i]
            else:
                del org.__dict__["forward"]
            self._org_forwards[i] = None
            self._wrappers[i] = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._forward_part(0, x, *args, **kwargs)

    def _forward_part(self, part: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        org_forward = self._org_forwards[part]
        if org_forward is None:
            raise RuntimeError(f"{self.lora_name} is not applied to its layer; call apply_to() first")
        out = org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return out  # exactly the base output, and no work
        rows = None if len(self._org) == 1 else self._rows[part]
        delta = self.delta(x, rows)
        return out + (delta * (self.multiplier * self.scale)).to(out.dtype)

    def delta(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The unscaled contribution Δ(x) (without α/r and the multiplier); ``rows``: the output
        rows of one part of a fused module."""
        raise NotImplementedError

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """This module's tensors under their kohya key suffixes (``lora_up.weight``, ``alpha``...)."""
        raise NotImplementedError


class LoRAModule(NetworkModule):
    """LoRA / LoCon: ``Up(Down(x))``.

    Linear layers get Linear down/up. A Conv2d gets a down conv with the original kernel, stride
    and padding and a 1×1 up conv, so k×k convs (c3lier) and 1×1 convs share one code path.
    Down starts Kaiming-uniform (a = √5), up starts at zero, so a new module changes nothing.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(lora_name, org_module, rank, alpha)
        org_module = self.org_module
        device = org_module.weight.device
        factory = dict(bias=False, device=device, dtype=dtype)
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, self.rank, org_module.kernel_size,
                                       org_module.stride, org_module.padding, **factory)
            self.lora_up = nn.Conv2d(self.rank, org_module.out_channels, 1, 1, **factory)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.rank, **factory)
            self.lora_up = nn.Linear(self.rank, self.weight_shape[0], **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def delta(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if rows is None:
            return self.lora_up(h)
        return F.linear(h, self.lora_up.weight[rows])

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight,
                "alpha": self.alpha}


class LoHaModule(NetworkModule):
    """LoHa (LyCORIS): ΔW = (w1a·w1b) ⊙ (w2a·w2b), applied with the layer's own op.

    k×k convs use LyCORIS's Tucker form (``hada_t1``/``hada_t2`` cores, ``hada_w*_a`` of shape
    rank×out, ``hada_w*_b`` rank×in); Linear and 1×1 convs use plain pairs (``hada_w*_a`` out×rank,
    ``hada_w*_b`` rank×in). Those are the shapes LyCORIS writes and A1111/Forge/ComfyUI read.
    Initialisation is LyCORIS's ``weight_gen`` (w1a = 0, so ΔW starts at zero). Dropout is 0.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(lora_name, org_module, rank, alpha)
        try:
            from lycoris.functional.loha import weight_gen
        except ImportError:
            require(LYCORIS)  # missing or too old: a message that names the install command
            raise

        weight = self.org_module.weight
        self.tucker = is_kxk_conv(self.org_module)
        shape = self.weight_shape if self.tucker else tuple(self.weight_shape[:2])
        w1d, w1u, w2d, w2u, t1, t2 = weight_gen(torch.empty(shape, device="meta"), self.rank, tucker=self.tucker)
        to = dict(device=weight.device, dtype=dtype)
        self.hada_w1_a = nn.Parameter(w1u.to(**to))
        self.hada_w1_b = nn.Parameter(w1d.to(**to))
        self.hada_w2_a = nn.Parameter(w2u.to(**to))
        self.hada_w2_b = nn.Parameter(w2d.to(**to))
        if self.tucker:
            self.hada_t1 = nn.Parameter(t1.to(**to))
            self.hada_t2 = nn.Parameter(t2.to(**to))

    def diff_weight(self) -> torch.Tensor:
        """ΔW (without α/r and multiplier), shaped like the wrapped layer's weight."""
        one = torch.ones((), dtype=self.hada_w1_a.dtype, device=self.hada_w1_a.device)
        t1, t2 = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        dw = _loha_diff_weight()(self.hada_w1_b, self.hada_w1_a, self.hada_w2_b, self.hada_w2_a, t1, t2, gamma=one)
        return dw.reshape(self.weight_shape)

    def delta(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        dw = self.diff_weight().to(x.dtype)
        if rows is not None:
            dw = dw[rows]
        org = self.org_module
        if isinstance(org, nn.Conv2d):
            return F.conv2d(x, dw, None, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, dw)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
               "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b, "alpha": self.alpha}
        if self.tucker:
            out.update(hada_t1=self.hada_t1, hada_t2=self.hada_t2)
        return out


@functools.lru_cache(maxsize=1)
def _loha_diff_weight() -> Callable:
    """LyCORIS's ``diff_weight``. From LyCORIS 4 on it can pick fused GPU kernels; the eager
    reference maths (``backend="torch"``) is pinned so training behaves the same on every device.
    LyCORIS 3 has no ``backend`` argument and is always eager."""
    from lycoris.functional.loha import diff_weight

    if "backend" in inspect.signature(diff_weight).parameters:
        return functools.partial(diff_weight, backend="torch")
    return diff_weight


MODULE_KINDS: dict[str, type[NetworkModule]] = {"lierla": LoRAModule, "c3lier": LoRAModule, "loha": LoHaModule}
