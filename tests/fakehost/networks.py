"""Fake ``networks``: the built-in Lora extension's module (a top-level module in both hosts).

AUTOMATIC1111 1.8 (``extensions-builtin/Lora/networks.py``): ``load_networks`` reads each named file
(``load_network``), matches every kohya module name to a module of
``sd_model.network_layer_mapping`` (LDM names, dots as underscores) and keeps the matched ones in
``Network.modules``; keys that match nothing are only logged at debug level. The weights change
when a layer runs (``network_apply_weights``: restore the backup, add the loaded networks).

Forge (``extensions-builtin/sd_forge_lora/networks.py``): ``load_networks`` puts clones of the
UNet/CLIP patchers carrying the file's patches into ``forge_objects`` and prints what
``load_lora_for_models`` matched (``[LORA] Loaded <file> for KModel-UNet with N keys at weight w
(skipped K keys) ...``); the patches are merged when the patcher is loaded for sampling.
"""

import logging
import os

import torch

from modules import FLAVOUR, shared

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
refresh_calls = 0


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.alias = name
        self.shorthash = None

    def read_hash(self):
        pass


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None
        self.mentioned_name = None


class NetworkModule:
    def __init__(self, net, weights):
        self.network = net
        self.network_key = weights["network_key"]
        self.sd_key = weights["sd_key"]
        self.sd_module = weights["sd_module"]
        self.w = weights["w"]

    def multiplier(self):
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier


def list_available_networks():
    global refresh_calls
    refresh_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for file in files:
            stem, ext = os.path.splitext(file)
            if ext.lower() in (".pt", ".ckpt", ".safetensors"):
                entry = NetworkOnDisk(stem, os.path.join(root, file))
                available_networks[stem] = entry
                available_network_aliases[stem] = entry


def _on_disk(names):
    found = [available_networks.get(n) if n.lower() in forbidden_network_aliases else available_network_aliases.get(n)
             for n in names]
    if any(x is None for x in found):
        list_available_networks()
        found = [available_networks.get(n) if n.lower() in forbidden_network_aliases
                 else available_network_aliases.get(n) for n in names]
    return found


def _read(filename):
    from safetensors.torch import load_file

    return load_file(filename)


if FLAVOUR == "a1111":
    import re

    from fakehost_lora import compvis_to_diffusers, delta, module_kind, split_modules

    re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")

    def assign_network_names_to_compvis_modules(sd_model):
        mapping = {}
        if sd_model.is_sdxl:
            # a ModuleList in the host; the fake's tree holds the same children by index
            embedders = sorted(sd_model.conditioner.embedders.named_children(), key=lambda item: int(item[0]))
            for i, embedder in ((int(n), e) for n, e in embedders):
                if not hasattr(embedder, "wrapped"):
                    continue
                for name, module in embedder.wrapped.named_modules():
                    mapping[f'{i}_{name.replace(".", "_")}'] = module
                    module.network_layer_name = f'{i}_{name.replace(".", "_")}'
        else:
            for name, module in sd_model.cond_stage_model.wrapped.named_modules():
                mapping[name.replace(".", "_")] = module
                module.network_layer_name = name.replace(".", "_")
        for name, module in sd_model.model.named_modules():
            mapping[name.replace(".", "_")] = module
            module.network_layer_name = name.replace(".", "_")
        sd_model.network_layer_mapping = mapping

    def convert_diffusers_name_to_compvis(key, is_sd2):
        """A1111's conversion, by table: diffusers-style kohya names to the LDM module names."""
        if key.startswith("lora_unet_"):
            for name in shared.sd_model.network_layer_mapping:
                if name.startswith("diffusion_model_") and \
                        compvis_to_diffusers(name[len("diffusion_model_"):]) == key[len("lora_unet_"):]:
                    return name
            return key
        match = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
        if match and not is_sd2:
            return f"transformer_text_model_encoder_layers_{match.group(1)}_{match.group(2)}"
        return key

    def load_network(name, network_on_disk):
        net = Network(name, network_on_disk)
        net.mtime = os.path.getmtime(network_on_disk.filename)
        sd = _read(network_on_disk.filename)
        if not hasattr(shared.sd_model, "network_layer_mapping"):
            assign_network_names_to_compvis_modules(shared.sd_model)
        mapping = shared.sd_model.network_layer_mapping
        keys_failed_to_match = {}
        matched = {}
        for key_network, weight in sd.items():
            without, _, part = key_network.partition(".")
            key = convert_diffusers_name_to_compvis(without, False)
            sd_module = mapping.get(key)
            if sd_module is None:
                m = re_x_proj.match(key)
                if m:
                    sd_module = mapping.get(m.group(1))
            if sd_module is None and "lora_unet" in without:
                key = without.replace("lora_unet", "diffusion_model")
                sd_module = mapping.get(key)
            elif sd_module is None and "lora_te1_text_model" in without:
                key = without.replace("lora_te1_text_model", "0_transformer_text_model")
                sd_module = mapping.get(key)
                if sd_module is None:
                    key = without.replace("lora_te1_text_model", "transformer_text_model")
                    sd_module = mapping.get(key)
            if sd_module is None:
                keys_failed_to_match[key_network] = key
                continue
            if key not in matched:
                matched[key] = {"network_key": key_network, "sd_key": key, "w": {}, "sd_module": sd_module}
            matched[key]["w"][part] = weight
        for key, weights in matched.items():
            if module_kind(weights["w"]) is None:
                raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights['w'])}")
            net.modules[key] = NetworkModule(net, weights)
        if keys_failed_to_match:
            logging.debug(f"Network {network_on_disk.filename} didn't match keys: {keys_failed_to_match}")
        return net

    def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        already_loaded = {net.name: net for net in loaded_networks if net.name in names}
        loaded_networks.clear()
        for i, (network_on_disk, name) in enumerate(zip(_on_disk(names), names)):
            net = already_loaded.get(name)
            if network_on_disk is not None:
                if net is None:
                    net = networks_in_memory.get(name)
                if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                    try:
                        net = load_network(name, network_on_disk)
                        networks_in_memory.pop(name, None)
                        networks_in_memory[name] = net
                    except Exception as e:
                        print(f"*** Error loading network {network_on_disk.filename}: {e}")
                        continue
                net.mentioned_name = name
            if net is None:
                logging.info(f"Couldn't find network with name {name}")
                continue
            net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
            net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
            net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
            loaded_networks.append(net)

    def network_restore_weights_from_backup(self):
        # in place and without no_grad of its own, as A1111 1.8's: the caller's grad mode decides
        # (a generation's forward runs under no_grad; anyone else must do so too, since the U-Net's
        # parameters require grad)
        backup = getattr(self, "network_weights_backup", None)
        if backup is not None:
            self.weight.copy_(backup)

    def network_reset_cached_weight(self):
        self.network_current_names = ()
        self.network_weights_backup = None
        self.network_bias_backup = None

    def network_apply_weights(self):
        """What a layer's forward does first: the loaded networks' change on the original weight."""
        name = getattr(self, "network_layer_name", None)
        if name is None or not isinstance(getattr(self, "weight", None), torch.Tensor):
            return
        current = getattr(self, "network_current_names", ())
        wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
        backup = getattr(self, "network_weights_backup", None)
        if backup is None and wanted != ():
            backup = self.weight.detach().to("cpu", copy=True)
            self.network_weights_backup = backup
        if current == wanted:
            return
        network_restore_weights_from_backup(self)
        with torch.no_grad():
            for net in loaded_networks:
                module = net.modules.get(name)
                if module is not None:
                    self.weight += delta(module.w, self.weight, module.multiplier())
        self.network_current_names = wanted

    def apply_to_model(sd_model):
        """The forward pass of a generation: every named layer runs ``network_apply_weights``."""
        if not hasattr(sd_model, "network_layer_mapping"):
            assign_network_names_to_compvis_modules(sd_model)
        for module in sd_model.network_layer_mapping.values():
            network_apply_weights(module)

else:
    import functools

    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
        model_flag = type(model.model).__name__ if model is not None else "default"
        unet_keys = model_lora_keys_unet(model.model) if model is not None else {}
        clip_keys = model_lora_keys_clip(clip.cond_stage_model) if clip is not None else {}
        lora_unmatch = lora
        lora_unet, lora_unmatch = load_lora(lora_unmatch, unet_keys)
        lora_clip, lora_unmatch = load_lora(lora_unmatch, clip_keys)
        if len(lora_unmatch) > 12:
            print(f"[LORA] LoRA version mismatch for {model_flag}: {filename}")
            return model, clip
        if len(lora_unmatch) > 0:
            print(f"[LORA] Loading {filename} for {model_flag} with unmatched keys {list(lora_unmatch.keys())}")
        new_model = model.clone() if model is not None else None
        new_clip = clip.clone() if clip is not None else None
        if new_model is not None and len(lora_unet) > 0:
            loaded_keys = new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model,
                                                online_mode=online_mode)
            skipped_keys = [item for item in lora_unet if item not in loaded_keys]
            if len(skipped_keys) > 12:
                print(f"[LORA] Mismatch {filename} for {model_flag}-UNet with {len(skipped_keys)} keys mismatched in {len(loaded_keys)} keys")
            else:
                print(f"[LORA] Loaded {filename} for {model_flag}-UNet with {len(loaded_keys)} keys at weight {strength_model} (skipped {len(skipped_keys)} keys) with on_the_fly = {online_mode}")
                model = new_model
        if new_clip is not None and len(lora_clip) > 0:
            loaded_keys = new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip,
                                               online_mode=online_mode)
            skipped_keys = [item for item in lora_clip if item not in loaded_keys]
            if len(skipped_keys) > 12:
                print(f"[LORA] Mismatch {filename} for {model_flag}-CLIP with {len(skipped_keys)} keys mismatched in {len(loaded_keys)} keys")
            else:
                print(f"[LORA] Loaded {filename} for {model_flag}-CLIP with {len(loaded_keys)} keys at weight {strength_clip} (skipped {len(skipped_keys)} keys) with on_the_fly = {online_mode}")
                clip = new_clip
        return model, clip

    @functools.lru_cache(maxsize=5)
    def load_lora_state_dict(filename):
        return _read(filename)

    def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        from modules import sd_models

        current_sd = sd_models.model_data.get_sd_model()
        if current_sd is None:
            return
        loaded_networks.clear()
        networks_on_disk = _on_disk(names)
        for network_on_disk, name in zip(networks_on_disk, names):
            net = Network(name, network_on_disk)
            net.mentioned_name = name
            loaded_networks.append(net)
        compiled = [[a.filename, b, c, False] for a, b, c in zip(networks_on_disk, unet_multipliers, te_multipliers)]
        if current_sd.current_lora_hash == str(compiled):
            return
        current_sd.current_lora_hash = str(compiled)
        current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
        current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
        for filename, strength_model, strength_clip, online_mode in compiled:
            lora_sd = load_lora_state_dict(filename)
            current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
                current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
                filename=filename, online_mode=online_mode)
        current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()


class ExtraNetworkLora:
    """``extra_networks_lora.ExtraNetworkLora``: ``<lora:name:te[:unet]>`` -> ``load_networks``."""

    name = "lora"

    def activate(self, p, params_list):
        names, te_multipliers, unet_multipliers, dyn_dims = [], [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            te_multipliers.append(te)
            unet_multipliers.append(unet)
            dyn_dims.append(None)
        load_networks(names, te_multipliers, unet_multipliers, dyn_dims)

    def deactivate(self, p):
        pass


def _register():
    from modules import extra_networks

    extra_networks.register_extra_network(ExtraNetworkLora())


_register()
