"""Network files: kohya-layout state dict, safetensors save/load, hashes, atomic writes.

Key layout (SPEC §6.2): ``<lora_name>.lora_down.weight``, ``<lora_name>.lora_up.weight`` and a 0-d
``<lora_name>.alpha`` for LoRA kinds; ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``
(+ ``hada_t1``, ``hada_t2`` for Tucker convs) and ``alpha`` for LoHa. Every tensor is written in
the save dtype.

Hashes (sd-scripts' ``precalculate_safetensors_hashes``, read by A1111's additional-networks and
civitai): ``sshs_model_hash`` is the SHA-256 of the safetensors data section (everything after
the header); ``sshs_legacy_hash`` is the first 8 hex digits of the SHA-256 of bytes
0x100000..0x110000 of the same tensors serialised with only the ``ss_*`` metadata.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from trainer.atomic import write_bytes
from trainer.network.layers import LoHaModule
from trainer.network.metadata import build_metadata  # noqa: F401  (part of this module's API)

def _strength_factor(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"`network_strength` is {strength!r}; it must be a finite number")
    return float(strength)


def network_state_dict(net: Any, dtype: torch.dtype, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The network's tensors in kohya layout, on the CPU, in ``dtype``.

    ``strength`` scales the saved effect: LoRA kinds fold √strength into both up and down (so a
    negative strength is refused: it has no real square root); LoHa folds the
    whole strength into ``hada_w1_a`` (ΔW is linear in it), so any finite strength works there.
    The reference ignores the strength for LoHa; folding it makes the setting mean the same thing.
    """
    strength = _strength_factor(strength)
    is_loha = any(isinstance(m, LoHaModule) for m in net.all_modules)
    if strength < 0 and not is_loha:
        raise ValueError(
            f"`network_strength` is {strength}: a LoRA file can only be scaled by a strength >= 0 "
            "(√strength goes into both up and down weights); use a positive strength"
        )
    out: dict[str, torch.Tensor] = {}
    for module in net.all_modules:
        for suffix, tensor in module.kohya_tensors().items():
            value = tensor.detach().float()
            if strength != 1.0 and suffix in ("lora_up.weight", "lora_down.weight"):
                value = value * math.sqrt(strength)
            elif strength != 1.0 and suffix == "hada_w1_a":
                value = value * strength
            out[f"{getattr(module, 'file_name', module.lora_name)}.{suffix}"] = value.to(device="cpu", dtype=dtype).contiguous()
    return out


def internal_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors under the network's own module names (Z-Image files are keyed by
    ``diffusion_model.<path>``, see network/dit.py; every other layout already matches)."""
    from trainer.network.dit import internal_key

    return {internal_key(k): v for k, v in state.items()}


def _data_offset(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of ``tensors`` as sd-scripts computes them."""
    from safetensors.torch import save


    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(memoryview(blob)[_data_offset(blob):]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata values must be strings; not a string: {bad[:5]}")
    return dict(metadata)


def save_network(net: Any, path: str | os.PathLike, *, metadata: Mapping[str, str], dtype: torch.dtype,
                 strength: float = 1.0, overwrite: bool = False) -> Path:
    """Write ``net`` to ``path`` (safetensors), with ``metadata`` plus the two ``sshs_*`` hashes.

    The file appears at once or not at all: it is written to a temporary file in the same folder
    and moved into place with ``os.replace``. An existing file is refused unless ``overwrite``.
    Returns the path written.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"network file {path} must end in .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; turn on `save_overwrite` or choose another `save_lora_name`"
        )
    meta = _check_metadata(metadata)
    tensors = network_state_dict(net, dtype, strength)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
    blob = save(tensors, meta)
    write_bytes(path, blob)
    return path


def read_network_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a network file. ``.safetensors`` is read with safetensors; ``.pt``/``.ckpt``
    with ``torch.load(weights_only=True)`` (no metadata). Clear errors for missing or broken files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network file {path} does not exist")
    if path.suffix.lower() in (".pt", ".ckpt", ".bin"):
        return _read_torch_file(path), {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as error:  # safetensors raises its own error types, and OSError for short files
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated, still being written, or another format): {error}"
        ) from error
    return tensors, metadata


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch weights file: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors, so it is not a network file")
    return data


def _examples(keys: list[str], count: int = 3) -> list[str]:
    """A few distinct module names of ``keys`` for messages."""
    return list(dict.fromkeys(k.split(".", 1)[0] for k in keys))[:count]


def _layout_hint(net: Any, unexpected: list[str]) -> str:
    names = " ".join(unexpected)
    if "input_blocks" in names and net.family.unet_naming != "ldm":
        return f" The file uses LDM U-Net names (an SDXL network?), this is a {net.family.title} network."
    if "down_blocks" in names and net.family.unet_naming == "ldm":
        return f" The file uses diffusers U-Net names (an SD1/SD2 network?), this is a {net.family.title} network."
    if "hada_" in names and net.spec.network_type != "loha":
        return " The file is a LoHa network; set network_type to loha."
    if ".lora_down." in names and net.spec.network_type == "loha":
        return " The file is a LoRA network; set network_type to lierla or c3lier."
    return " Were it saved for another model family, network type, block selection or element?"


def load_network_weights(net: Any, source: str | os.PathLike | Mapping[str, torch.Tensor],
                         strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy weights from a file or state dict into ``net``. Returns (missing, unexpected) keys.

    ``strict`` raises when any key is missing or unexpected (naming a few of them). A tensor whose
    shape differs (another rank) always raises.
    """
    state = read_network_file(source)[0] if isinstance(source, (str, os.PathLike)) else dict(source)
    state = internal_keys(state)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        where = source if isinstance(source, (str, os.PathLike)) else "the given state dict"
        raise ValueError(
            f"network weights from {where} do not fit this {net.spec.network_type} network: "
            f"{len(missing)} missing key(s) (modules {_examples(missing)}), "
            f"{len(unexpected)} unexpected key(s) (modules {_examples(unexpected)})."
            + _layout_hint(net, unexpected)
        )
    for key in own:
        if key in state and tuple(state[key].shape) != tuple(own[key].shape):
            raise ValueError(
                f"network weight {key} has shape {tuple(state[key].shape)} in the file but "
                f"{tuple(own[key].shape)} in this network; set network_rank / network_conv_rank to the file's ranks"
            )
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected
