"""The trainable network: which base layers get a module, and the module set as one nn.Module.

Module selection follows kohya's networks (SPEC §6.1):

- every network type: each Linear/Conv2d inside a U-Net ``Transformer2DModel``, and each Linear
  inside the text encoders' CLIP attention and MLP;
- c3lier and loha add each Linear/Conv2d inside ``ResnetBlock2D``, ``Downsample2D`` and
  ``Upsample2D``. conv_in, conv_out and the time embedding are never wrapped (they are in none of
  those containers). lierla skips k×k convs (the SD U-Nets have none in their transformers);
- the element filter keeps only names containing ``attn2`` (CrossAttention) or ``attn1``
  (SelfAttention). The reference applies it to lierla/c3lier only; here it applies to loha too,
  so the same setting means the same thing for every network type;
- the block filter keeps modules of the selected blocks; text-encoder modules (block ``BASE``)
  exist only when ``BASE`` is selected and the spec asks to train the text encoder.

Linear and 1×1 conv modules use rank/alpha; k×k convs use conv_rank/conv_alpha, each falling back
to rank/alpha when 0.

The transformer families (Flux, Z-Image) take their targets, names, block ids and element meaning
from ``network/dit.py``; their networks have only Linear modules (every network type), some of them
fused over several diffusers layers. When none of the selected blocks is a block id of such a family
(a setting saved with the SD block list), every block of the family is trained.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from trainer.config.choices import (
    BLOCKID26, FLUX_BLOCK_IDS, NETWORK_ELEMENTS, NETWORK_TYPES, TEXT_ENCODER_IDS, ZIMAGE_BLOCK_IDS,
)
from trainer.families import (
    QWEN3_NOT_TRAINED, Family, block_id_of, ldm_module_paths, te_classes, unet_attention_classes, unet_conv_classes,
)
from trainer.network.layers import MODULE_KINDS, NetworkModule, is_kxk_conv

_ELEMENT_TOKEN = {"CrossAttention": "attn2", "SelfAttention": "attn1"}
KNOWN_BLOCK_IDS = tuple(dict.fromkeys(BLOCKID26 + FLUX_BLOCK_IDS + ZIMAGE_BLOCK_IDS))


@dataclass
class NetworkSpec:
    """What network to build. ``dtype`` is the dtype of the trainable parameters."""

    network_type: str = "lierla"
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 0
    conv_alpha: float = 0.0
    element: str = "Full"
    blocks: tuple = field(default=BLOCKID26)
    dtype: torch.dtype = torch.float32
    train_text_encoder: bool = False

    def __post_init__(self):
        if self.network_type not in NETWORK_TYPES:
            raise ValueError(f"`network_type` is {self.network_type!r}; allowed: {', '.join(NETWORK_TYPES)}")
        if self.element not in NETWORK_ELEMENTS:
            raise ValueError(f"`network_element` is {self.element!r}; allowed: {', '.join(NETWORK_ELEMENTS)}")
        _check_count("network_rank", self.rank, minimum=1)
        _check_count("network_conv_rank", self.conv_rank, minimum=0)
        for name, value in (("network_alpha", self.alpha), ("network_conv_alpha", self.conv_alpha)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` is {value!r}; it must be a number >= 0 (0 means alpha = rank)")
        if isinstance(self.blocks, str):
            raise ValueError(f"`network_blocks` must be a list of block ids, got the string {self.blocks!r}")
        self.blocks = tuple(self.blocks)
        unknown = [b for b in self.blocks if b not in KNOWN_BLOCK_IDS]
        if unknown:
            raise ValueError(f"`network_blocks` has unknown block id(s) {unknown}; allowed: {' '.join(BLOCKID26)} "
                             f"(Flux: {FLUX_BLOCK_IDS[0]} ... {FLUX_BLOCK_IDS[-1]}, Z-Image: {ZIMAGE_BLOCK_IDS[0]} ... "
                             f"{ZIMAGE_BLOCK_IDS[-1]})")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"network dtype must be a floating torch.dtype, got {self.dtype!r}")

    def rank_alpha(self, layer: nn.Module) -> tuple[int, float]:
        """(rank, alpha) of the module that wraps ``layer``."""
        if is_kxk_conv(layer):
            return (self.conv_rank or self.rank), (self.conv_alpha or self.alpha)
        return self.rank, self.alpha

    @property
    def wants_text_encoder(self) -> bool:
        """Whether any text encoder gets modules: text-encoder training on and a text-encoder id
        selected (BASE on the SD families; CLIP, T5 on Flux)."""
        return self.train_text_encoder and any(b in TEXT_ENCODER_IDS for b in self.blocks)

    def keeps_text_encoder(self, block: str) -> bool:
        """Whether the text encoder whose block id is ``block`` (BASE, CLIP, T5) gets modules. Only an id
        named in ``blocks`` counts: the every-block fallback of a transformer family leaves them out."""
        return self.train_text_encoder and block in self.blocks


def _check_multiplier(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"network multiplier must be a finite number, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` is {value!r}; it must be a whole number >= {minimum}")


@dataclass(frozen=True)
class Target:
    """One base layer that can receive a module."""

    lora_name: str
    path: str           # module path inside its model (diffusers U-Net or transformers CLIP)
    block: str | None   # IN04, M00, OUT02, BASE (text encoders); D00, S12 on transformers
    layer: nn.Module
    is_te: bool
    layers: tuple = ()      # every layer of a fused module (transformers), else empty
    file_name: str = ""     # the name in a saved file when it differs from lora_name
    elements: tuple | None = None  # element tokens of a transformer module (None: read the name)

    @property
    def wrapped(self):
        """What the module wraps: the layer, or the parts of a fused layer."""
        return self.layers if len(self.layers) > 1 else self.layer


def find_targets(family: Family, unet: nn.Module, text_encoders: list, network_type: str) -> list[Target]:
    """Every layer ``network_type`` can wrap, ignoring the block and element filters."""
    if family.is_dit:
        from trainer.network.dit import dit_targets

        found = [Target(t.lora_name, t.paths[0], t.block, t.layers[0], False, t.layers, t.file_name, t.elements)
                 for t in dit_targets(family.name, unet)]
        return found + _te_targets(family, text_encoders)
    classes = unet_attention_classes()
    if network_type != "lierla":
        classes = classes + unet_conv_classes()
    ldm = ldm_module_paths(unet)
    targets: dict[str, Target] = {}
    for path, layer in _layers_inside(unet, classes):
        if network_type == "lierla" and is_kxk_conv(layer):
            continue
        name = family.unet_lora_name(path, ldm[path])
        targets[name] = Target(name, path, block_id_of(ldm[path]), layer, False)
    return list(targets.values()) + _te_targets(family, text_encoders)


def _te_targets(family: Family, text_encoders: list) -> list[Target]:
    """The text encoders' Linear layers (block BASE, or CLIP / T5 on Flux). Z-Image's Qwen3 has none:
    no LoRA loader reads one layout for it (``families.QWEN3_NOT_TRAINED``)."""
    targets: dict[str, Target] = {}
    for index, encoder in enumerate(text_encoders):
        if encoder is None or family.te_kind(index) == "qwen3":
            continue
        for path, layer in _layers_inside(encoder, te_classes(family.te_kind(index)), kinds=(nn.Linear,)):
            name = family.te_lora_name(index, path)
            targets[name] = Target(name, path, family.te_block(index), layer, True)
    return list(targets.values())


def _layers_inside(model: nn.Module, containers: tuple, kinds: tuple = (nn.Linear, nn.Conv2d)) -> Iterator:
    seen = set()
    for name, module in model.named_modules():
        if not isinstance(module, containers):
            continue
        for child_name, child in module.named_modules():
            path = f"{name}.{child_name}" if child_name else name
            if isinstance(child, kinds) and path not in seen:
                seen.add(path)
                yield path, child


def effective_blocks(family: Family, blocks) -> tuple:
    """The blocks a network trains: ``blocks``, or every block of a transformer family when ``blocks``
    names none of that family's ids (a setting saved with the SD block list)."""
    blocks = tuple(blocks)
    if family.is_dit and not set(blocks) & set(family.block_ids):
        return tuple(family.block_ids)
    return blocks


def select_targets(targets: list[Target], spec: NetworkSpec, family: Family | None = None) -> list[Target]:
    """Apply the block and element filters of ``spec``."""
    token = _ELEMENT_TOKEN.get(spec.element)
    blocks = effective_blocks(family, spec.blocks) if family is not None else spec.blocks
    kept = []
    for t in targets:
        if t.is_te and not spec.keeps_text_encoder(t.block):
            continue
        if not t.is_te and t.block not in blocks:
            continue
        if token is not None and token not in (t.lora_name if t.elements is None else t.elements):
            continue
        kept.append(t)
    return kept


class Network(nn.Module):
    """A set of modules on one base model. Each module is registered under its kohya name, so
    ``state_dict()`` has kohya keys. Nothing is injected until ``apply_to()``."""

    def __init__(self, family: Family, spec: NetworkSpec, targets: list[Target],
                 ranks: dict[str, tuple[int, float]] | None = None):
        super().__init__()
        self.family = family
        self.spec = spec
        kind = MODULE_KINDS[spec.network_type]
        self.unet_modules: list[NetworkModule] = []
        self.te_modules: list[NetworkModule] = []
        for t in targets:
            rank, alpha = (ranks or {}).get(t.lora_name) or spec.rank_alpha(t.layer)
            module = kind(t.lora_name, t.wrapped, rank, alpha, dtype=spec.dtype)
            module.file_name = t.file_name or t.lora_name
            module.block = t.block
            self.add_module(t.lora_name, module)
            (self.te_modules if t.is_te else self.unet_modules).append(module)
        self._multiplier = 1.0
        self._applied = False
        self.skipped_modules: list[str] = []  # file modules a resume did not use (resume.py)

    @property
    def all_modules(self) -> list[NetworkModule]:
        """Text-encoder modules, then U-Net modules (the order of apply_to)."""
        return self.te_modules + self.unet_modules

    @property
    def applied(self) -> bool:
        """True between apply_to() and remove()."""
        return self._applied

    def apply_to(self) -> "Network":
        """Wrap every base layer's forward (on top of any network already applied)."""
        if self._applied:
            raise RuntimeError("this network is already applied; call remove() first")
        for module in self.all_modules:
            module.inject()
        self._applied = True
        return self

    def remove(self) -> None:
        """Give every base layer back its previous forward (reverse order of apply_to).

        Raises RuntimeError, changing nothing, while a network applied later still wraps a layer."""
        covered = [m.lora_name for m in self.all_modules if m.injected and not m.outermost]
        if covered:
            raise RuntimeError(
                f"{len(covered)} module(s) of this network (e.g. {covered[0]}) are wrapped by a network applied "
                "later; remove networks in the reverse order of applying them"
            )
        for module in reversed(self.all_modules):
            module.restore()
        self._applied = False

    @property
    def multiplier(self) -> float:
        """The run-time multiplier m of y = W·x + m·(α/r)·Δ(x); setting it affects every module at once."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        value = _check_multiplier(value)
        self.set_multiplier(unet=value, te=value)
        self._multiplier = value

    def set_multiplier(self, unet: float | None = None, te: float | None = None) -> None:
        """Set the run-time multiplier of the U-Net and/or text-encoder modules (any finite float)."""
        for value, modules in ((unet, self.unet_modules), (te, self.te_modules)):
            if value is None:
                continue
            value = _check_multiplier(value)
            for module in modules:
                module.multiplier = value

    @contextlib.contextmanager
    def multiplier_as(self, value: float) -> Iterator["Network"]:
        """Temporarily use ``value`` as the multiplier (e.g. 0 for a "network off" prediction)."""
        old = [m.multiplier for m in self.all_modules]
        previous = self._multiplier
        self.multiplier = value
        try:
            yield self
        finally:
            for module, m in zip(self.all_modules, old):
                module.multiplier = m
            self._multiplier = previous

    def param_groups(self, unet_lr: float, te_lr: float | None = None) -> list[dict]:
        """Optimizer groups: text encoder first (when it has modules), then U-Net.
        A ``te_lr`` of None or 0 means the U-Net learning rate."""
        groups = []
        if self.te_modules:
            groups.append({"params": [p for m in self.te_modules for p in m.parameters()],
                           "lr": te_lr or unet_lr, "name": "text_encoder"})
        if self.unet_modules:
            groups.append({"params": [p for m in self.unet_modules for p in m.parameters()],
                           "lr": unet_lr, "name": "unet"})
        return groups

    def num_parameters(self) -> int:
        """Number of trainable values."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """One line for the log: kind, module counts and trainable parameters."""
        return (f"{self.spec.network_type} network for {self.family.title}: {len(self.unet_modules)} U-Net modules, "
                f"{len(self.te_modules)} text-encoder modules, {self.num_parameters():,} trainable parameters")


def create_network(bundle: Any, spec: NetworkSpec) -> Network:
    """Build (not apply) the network ``spec`` on ``bundle`` (a ModelBundle: unet, text_encoders, family).

    Raises ValueError when the filters leave no module at all.
    """
    if bundle.family.te_kinds == ("qwen3",) and spec.keeps_text_encoder("QWEN3"):
        raise ValueError(QWEN3_NOT_TRAINED)
    targets = find_targets(bundle.family, bundle.unet, list(bundle.text_encoders or []), spec.network_type)
    chosen = select_targets(targets, spec, bundle.family)
    if not chosen:
        raise ValueError(
            f"no layer of this {bundle.family.title} model gets a module with network_type={spec.network_type}, "
            f"network_element={spec.element}, network_blocks={' '.join(spec.blocks) or '(none)'}; "
            "select more blocks (lierla needs attention blocks) or another element"
        )
    return Network(bundle.family, spec, chosen)


def spec_from_config(cfg: Any, *, dtype: torch.dtype = torch.float32, train_text_encoder: bool,
                     blocks: tuple | None = None) -> NetworkSpec:
    """The NetworkSpec of a run's settings (a TrainConfig: typed, already checked): the one place
    the network settings become a spec. ``blocks`` replaces ``network_blocks`` when given."""
    return NetworkSpec(
        network_type=cfg.network_type, rank=cfg.network_rank, alpha=cfg.network_alpha,
        conv_rank=cfg.network_conv_rank, conv_alpha=cfg.network_conv_alpha, element=cfg.network_element,
        blocks=tuple(cfg.network_blocks if blocks is None else blocks), dtype=dtype,
        train_text_encoder=train_text_encoder,
    )
