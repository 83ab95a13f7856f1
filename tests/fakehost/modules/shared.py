"""Fake ``modules.shared``: options, command-line options, job state and the ``sd_model`` property."""

import os
import sys
from types import SimpleNamespace

from modules import FLAVOUR, devices, paths, shared_state


class Options:
    """``opts.<name>`` reads ``opts.data[name]``, as the hosts' Options do."""

    def __init__(self, data):
        object.__setattr__(self, "data", dict(data))

    def __getattr__(self, item):
        try:
            return self.data[item]
        except KeyError:
            raise AttributeError(item) from None

    def __setattr__(self, key, value):
        self.data[key] = value


# lora_dir is added by the built-in Lora extension's preload.py, default <models_path>/Lora.
cmd_opts = SimpleNamespace(
    lora_dir=os.path.join(paths.models_path, "Lora"), ckpt_dir=None, vae_dir=None, ckpt=None,
    embeddings_dir=os.path.join(paths.data_path, "embeddings"),
    ui_config_file=os.path.join(paths.data_path, "ui-config.json"),
    lowvram=False, medvram=False, no_half=True, skip_install=False,
)
opts = Options({
    "sd_model_checkpoint": None, "sd_vae": "Automatic", "sd_checkpoints_limit": 1,
    "sd_checkpoints_keep_in_cpu": True, "CLIP_stop_at_last_layers": 1, "emphasis": "Original",
    "forge_additional_modules": [], "forge_unet_storage_dtype": "Automatic",
})
if FLAVOUR == "forge":  # the txt2img defaults of Forge's UI presets (modules_forge/main_entry.py, processing_scripts/sampler.py)
    opts.data.update({"forge_preset": "sd", "sd_t2i_sampler": "Euler a", "sd_t2i_scheduler": "Automatic",
                      "sd_t2i_cfg": 7, "sd_t2i_width": 512, "sd_t2i_height": 640,
                      "xl_t2i_sampler": "DPM++ 2M SDE", "xl_t2i_scheduler": "Karras", "xl_t2i_cfg": 5,
                      "xl_t2i_width": 896, "xl_t2i_height": 1152})
state = shared_state.State()
device = devices.device
flavour = FLAVOUR
sd_model = None


class Shared(sys.modules[__name__].__class__):
    """``shared.sd_model`` as a property (A1111 loads the model lazily on first access)."""

    @property
    def sd_model(self):
        import modules.sd_models

        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models

        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
