"""Fake Forge ``backend.memory_management``: which patchers are on the (recorded) GPU."""

import torch

current_loaded_models = []
soft_empty_cache_calls = 0
cpu = torch.device("cpu")


def get_torch_device():
    from modules import devices

    return devices.device


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def model_load(self):
        self.model.model.to(self.device)
        self.model.refresh_loras()  # a patcher's LoRA patches are merged when it is loaded for sampling

    def model_unload(self, avoid_model_moving=False):
        if not avoid_model_moving:
            self.model.model.to(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for model in models:
        loaded = LoadedModel(model)
        if loaded in current_loaded_models:
            current_loaded_models.remove(loaded)
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def free_memory(memory_required, device, keep_loaded=[], free_all=False):
    for i in range(len(current_loaded_models) - 1, -1, -1):
        loaded = current_loaded_models[i]
        if loaded.device == device and loaded not in keep_loaded:
            current_loaded_models.pop(i).model_unload()
    soft_empty_cache()


def unload_all_models():
    free_memory(1e30, get_torch_device(), free_all=True)


def soft_empty_cache(force=False):
    global soft_empty_cache_calls
    soft_empty_cache_calls += 1
