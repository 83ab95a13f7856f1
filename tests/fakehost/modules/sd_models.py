"""Fake ``modules.sd_models`` for both flavours (Forge's loading calls are stubs there, as in Forge)."""

import hashlib
import os
import re

import torch

from modules import FLAVOUR, devices, lowvram, paths, script_callbacks, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))
checkpoints_list = {}
checkpoint_aliases = {}
load_calls = []


def _sha256(filename):
    digest = hashlib.sha256()
    with open(filename, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(filename):
    """The old short hash: 64 KiB read at 1 MiB."""
    try:
        with open(filename, "rb") as handle:
            handle.seek(0x100000)
            return hashlib.sha256(handle.read(0x10000)).hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        name = abspath.replace(model_path, "") if abspath.startswith(model_path) else os.path.basename(filename)
        name = name.lstrip("/\\")
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = _sha256(filename)
        self.shorthash = self.sha256[0:10]
        self.title = f"{name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]",
                    self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for alias in self.ids:
            checkpoint_aliases[alias] = self

    def calculate_shorthash(self):
        return self.shorthash


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    if not os.path.isdir(model_path):
        return
    for root, _, files in os.walk(model_path):
        for file in sorted(files):
            if os.path.splitext(file)[1].lower() in (".ckpt", ".safetensors"):
                CheckpointInfo(os.path.join(root, file)).register()


def checkpoint_tiles(use_short=False):
    if FLAVOUR == "forge":
        return [x.short_title if use_short else x.name for x in checkpoints_list.values()]
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    bare = re.sub(re_strip_checksum, "", search_string)
    found = sorted([i for i in checkpoints_list.values() if bare in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    return next(iter(checkpoints_list.values()), None)


if FLAVOUR == "a1111":
    class SdModelData:
        def __init__(self):
            self.sd_model = None
            self.loaded_sd_models = []
            self.was_loaded_at_least_once = False

        def get_sd_model(self):
            if self.sd_model is None and not self.was_loaded_at_least_once:
                load_model()
            return self.sd_model

        def set_sd_model(self, v, already_loaded=False):
            self.sd_model = v
            if v in self.loaded_sd_models:
                self.loaded_sd_models.remove(v)
            if v is not None:
                self.loaded_sd_models.insert(0, v)

    model_data = SdModelData()

    def send_model_to_cpu(m):
        if m is not None:
            if m.lowvram:
                lowvram.send_everything_to_cpu()
            else:
                m.to(devices.cpu)
        devices.torch_gc()

    def send_model_to_device(m):
        lowvram.apply(m)
        if not m.lowvram:
            m.to(shared.device)

    def send_model_to_trash(m):
        m.to(device="meta")
        devices.torch_gc()

    def load_model(checkpoint_info=None, already_loaded_state_dict=None):
        import fakehost_models

        checkpoint_info = checkpoint_info or select_checkpoint()
        if model_data.sd_model:
            send_model_to_trash(model_data.sd_model)
            model_data.sd_model = None
        load_calls.append(checkpoint_info.filename)
        sd_model = fakehost_models.a1111_model(checkpoint_info)
        send_model_to_device(sd_model)
        sd_model.eval()
        model_data.set_sd_model(sd_model)
        model_data.was_loaded_at_least_once = True
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
        script_callbacks.model_loaded_callback(sd_model)
        return sd_model

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        checkpoint_info = info or select_checkpoint()
        sd_model = sd_model or model_data.sd_model
        if sd_model is not None and sd_model.sd_checkpoint_info.filename == checkpoint_info.filename \
                and not forced_reload:
            return sd_model
        return load_model(checkpoint_info)

    def unload_model_weights(sd_model=None, info=None):
        send_model_to_cpu(sd_model or shared.sd_model)
        return sd_model

else:
    from backend import memory_management

    class FakeInitialModel:
        def __init__(self):
            self.cond_stage_model = None
            self.chunk_length = 75

    class SdModelData:
        def __init__(self):
            self.sd_model = FakeInitialModel()
            self.forge_loading_parameters = {}
            self.forge_hash = ""

        def get_sd_model(self):
            return self.sd_model

        def set_sd_model(self, v):
            self.sd_model = v

    model_data = SdModelData()

    def send_model_to_cpu(m):
        pass

    def send_model_to_device(m):
        pass

    def load_model(checkpoint_info=None, already_loaded_state_dict=None):
        pass

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        pass

    def unload_model_weights(sd_model=None, info=None):
        memory_management.unload_all_models()

    @torch.inference_mode()
    def forge_model_reload():
        import fakehost_models

        current_hash = str(model_data.forge_loading_parameters)
        if model_data.forge_hash == current_hash:
            return model_data.sd_model, False
        if model_data.sd_model:
            model_data.sd_model = None
            memory_management.unload_all_models()
        checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
        if checkpoint_info is None:
            raise ValueError("You do not have any model!")
        load_calls.append(checkpoint_info.filename)
        sd_model = fakehost_models.forge_model(checkpoint_info)
        model_data.set_sd_model(sd_model)
        script_callbacks.model_loaded_callback(sd_model)
        model_data.forge_hash = current_hash
        return sd_model, True
