"""What both fake hosts' LoRA loaders share: kohya module names -> the host's module names, and a
file's weights -> the change of one layer's weight.

Naming (HOSTS.md §2): the hosts name U-Net modules after the LDM (compvis) tree. A1111's
``convert_diffusers_name_to_compvis`` turns kohya's diffusers-style names into those; Forge builds a
map from its model's keys to both spellings (``model_lora_keys_unet`` with ``unet_to_diffusers``).
Here one function gives the diffusers spelling of an LDM module name, so each fake loader can list or
look up both spellings the way its host does.

Maths (the network_lora / network_hada modules both hosts use): LoRA ``up @ down * alpha / rank``
(a 3x3 LoCon's down convolution flattened), LoHa ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``,
times the multiplier, added to the weight.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "in_layers_0": "norm1", "out_layers_0": "norm2",
           "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}


def _resnet(rest: str) -> str:
    for ldm, diffusers in _RESNET.items():
        if rest == ldm:
            return diffusers
    return rest


def compvis_to_diffusers(name: str) -> str | None:
    """``input_blocks_1_1_proj_in`` -> ``down_blocks_0_attentions_0_proj_in`` (SD-shaped U-Nets with two
    layers per block, as A1111's conversion assumes); None for a name with no diffusers spelling."""
    if name == "input_blocks_0_0":
        return "conv_in"
    if name == "out_2":
        return "conv_out"
    match = re.fullmatch(r"time_embed_([02])", name)
    if match:
        return f"time_embedding_linear_{1 if match.group(1) == '0' else 2}"
    match = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name)
    if match:
        n, k, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        block, j = divmod(n - 1, 3)
        if j == 2:
            return f"down_blocks_{block}_downsamplers_0_conv" if rest == "op" else None
        if k == 1:
            return f"down_blocks_{block}_attentions_{j}_{rest}"
        return f"down_blocks_{block}_resnets_{j}_{_resnet(rest)}"
    match = re.fullmatch(r"middle_block_(\d)_(.+)", name)
    if match:
        k, rest = int(match.group(1)), match.group(2)
        if k == 1:
            return f"mid_block_attentions_0_{rest}"
        return f"mid_block_resnets_{k // 2}_{_resnet(rest)}"
    match = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name)
    if match:
        n, k, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        block, j = divmod(n, 3)
        if k == 0:
            return f"up_blocks_{block}_resnets_{j}_{_resnet(rest)}"
        if k == 2 or (k == 1 and rest == "conv"):
            return f"up_blocks_{block}_upsamplers_0_conv" if rest == "conv" else None
        return f"up_blocks_{block}_attentions_{j}_{rest}"
    return None


def module_kind(parts: dict) -> str | None:
    """Which network module type accepts a module's tensors (None: none does)."""
    if "lora_up.weight" in parts and "lora_down.weight" in parts:
        return "lora"
    if all(f"hada_w{i}_{s}" in parts for i in (1, 2) for s in "ab"):
        return "hada"
    return None


def _hada_factor(parts: dict, i: int) -> torch.Tensor:
    """``w_a @ w_b``, or with a CP core ``t`` (3x3 convolutions) the core contracted with both (lyco_helpers.make_weight_cp)."""
    wa, wb = parts[f"hada_w{i}_a"].float(), parts[f"hada_w{i}_b"].float()
    if f"hada_t{i}" in parts:
        return torch.einsum("ijkl,ip,jr->prkl", parts[f"hada_t{i}"].float(), wa, wb)
    return wa @ wb


def delta(parts: dict, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The change a module's tensors make to ``weight`` at ``multiplier``."""
    kind = module_kind(parts)
    if kind == "lora":
        up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
        rank = down.shape[0]
        change = up.flatten(1) @ down.flatten(1)
    elif kind == "hada":
        w1, w2 = (_hada_factor(parts, i) for i in (1, 2))
        rank = parts["hada_w1_b"].shape[0]
        change = w1 * w2
    else:
        raise ValueError(f"no module type accepts {sorted(parts)}")
    alpha = float(parts["alpha"]) if "alpha" in parts else rank
    return (change.reshape(weight.shape) * (alpha / rank) * multiplier).to(weight.dtype)


def split_modules(state: dict) -> dict[str, dict]:
    """A LoRA file's tensors grouped by module name (the part before the first dot)."""
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        module, _, part = key.partition(".")
        modules.setdefault(module, {})[part] = tensor
    return modules
