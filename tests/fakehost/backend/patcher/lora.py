"""Fake Forge ``backend.patcher.lora``: the key maps and the loader of ``sd_forge_lora``.

``model_lora_keys_unet(model)`` maps every LoRA name a file may use for a U-Net weight (kohya LDM
spelling ``lora_unet_input_blocks_1_1_proj_in``, kohya diffusers spelling
``lora_unet_down_blocks_0_attentions_0_proj_in``, bare ``diffusion_model.<...>``) to the model key
(``diffusion_model.input_blocks.1.1.proj_in.weight``); ``model_lora_keys_clip`` does the same for the
text encoders (``lora_te_`` / ``lora_te1_`` for clip_l, ``lora_te2_`` for clip_g, ``lora_te3_`` (and
``lora_te2_``) for Flux's t5xxl). ``load_lora(lora,
to_load)`` returns the patches it built and the file keys it did not use. ``LoraLoader.refresh``
merges a patcher's patches into the weights (fp32), keeping the originals in ``backup``.
"""

import torch

from fakehost_lora import compvis_to_diffusers, delta, module_kind


def model_lora_keys_unet(model, key_map=None):
    key_map = {} if key_map is None else key_map
    for key in model.state_dict():
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            compvis = key[len("diffusion_model."):-len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{compvis}"] = key
            key_map[key[:-len(".weight")]] = key
            diffusers = compvis_to_diffusers(compvis)
            if diffusers is not None:
                key_map[f"lora_unet_{diffusers}"] = key
    return key_map


def model_lora_keys_clip(model, key_map=None):
    key_map = {} if key_map is None else key_map
    prefixes = {"clip_l": ("lora_te", "lora_te1"), "clip_h": ("lora_te",), "clip_g": ("lora_te2",)}
    for key in model.state_dict():
        slot, _, rest = key.partition(".")
        inner = "transformer.text_model.encoder.layers."
        if rest.startswith(inner) and key.endswith(".weight"):
            name = rest[len("transformer."):-len(".weight")].replace(".", "_")
            for prefix in prefixes.get(slot, ()):
                key_map[f"{prefix}_{name}"] = key
        if key.startswith("t5xxl.transformer.") and key.endswith(".weight"):  # Flux / SD3 T5 (lora_te3_)
            name = key[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            key_map[f"lora_te3_{name}"] = key
            key_map[f"lora_te2_{name}"] = key  # OneTrainer's Flux files, as Forge maps them
    return key_map


def load_lora(lora, to_load):
    patch_dict = {}
    loaded_keys = set()
    for x, target in to_load.items():
        parts = {k[len(x) + 1:]: v for k, v in lora.items() if k.startswith(x + ".")}
        if module_kind(parts) is None:
            continue
        patch_dict[target] = ("lora", parts)
        loaded_keys.update(f"{x}.{k}" for k in parts)
    remaining_dict = {x: y for x, y in lora.items() if x not in loaded_keys}
    return patch_dict, remaining_dict


def _get_attr_with_parent(obj, key):
    *path, leaf = key.split(".")
    for part in path:
        obj = getattr(obj, part)
    return obj, leaf, getattr(obj, leaf)


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[key] = all_patches.get(key, []) + current
        for key, weight in self.backup.items():
            parent, child, _ = _get_attr_with_parent(self.model, key)
            setattr(parent, child, weight)
        self.backup = {}
        for key, current in all_patches.items():
            parent, child, weight = _get_attr_with_parent(self.model, key)
            if key not in self.backup:
                self.backup[key] = weight
            merged = weight.float()
            for strength, (_, parts), _strength_model, _offset, _function in current:
                merged = merged + delta(parts, merged, strength)
            setattr(parent, child, torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes
