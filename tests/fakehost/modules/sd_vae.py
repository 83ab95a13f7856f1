"""Fake ``modules.sd_vae``: the VAE list (name -> path)."""

import glob
import os

from modules import paths

vae_path = os.path.abspath(os.path.join(paths.models_path, "VAE"))
vae_dict = {}


def refresh_vae_list():
    vae_dict.clear()
    for pattern in ("**/*.ckpt", "**/*.pt", "**/*.safetensors"):
        for filepath in glob.iglob(os.path.join(vae_path, pattern), recursive=True):
            vae_dict[os.path.basename(filepath)] = filepath
