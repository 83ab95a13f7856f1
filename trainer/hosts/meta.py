"""Full-size model architectures with no weights: what ``python -m trainer layout`` lists the
trained modules of, and what the memory estimate counts parameters on.

The family's real architecture (from the configs shipped in trainer/assets) is built on the
meta device, so no weights are needed and it takes seconds.
"""

from __future__ import annotations


def meta_parts(family_name: str) -> dict:
    """The full-size ``family_name`` architecture (unet, vae, text_encoders) with meta tensors,
    from the configs shipped in trainer/assets: no weights, built in seconds."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from trainer.hosts.components import read_json, shipped_config_dir
    from trainer.hosts.ldm_convert import text_encoder_class

    folder = shipped_config_dir(family_name)
    if (folder / "transformer").is_dir():
        from trainer.hosts.dit_parts import transformer_class, text_encoder_for

        with torch.device("meta"):
            config = read_json(folder / "transformer" / "config.json")
            parts = {"unet": transformer_class(config).from_config(config),
                     "vae": AutoencoderKL.from_config(read_json(folder / "vae" / "config.json")),
                     "text_encoders": []}
            for name in ("text_encoder", "text_encoder_2"):
                if (folder / name).is_dir():
                    parts["text_encoders"].append(text_encoder_for(folder / name / "config.json"))
        return parts
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json")),
                 "vae": AutoencoderKL.from_config(read_json(folder / "vae" / "config.json")),
                 "text_encoders": []}
        for name in ("text_encoder", "text_encoder_2"):
            if (folder / name).is_dir():
                config = CLIPTextConfig.from_json_file(str(folder / name / "config.json"))
                parts["text_encoders"].append(text_encoder_class(config)(config))
    return parts


def meta_bundle(family_name: str):
    """A ModelBundle of the full-size ``family_name`` architecture with meta tensors."""
    from trainer.bundle import ModelBundle
    from trainer.families import get_family

    parts = meta_parts(family_name)
    return ModelBundle(family=get_family(family_name), unet=parts["unet"], vae=parts["vae"],
                       text_encoders=parts["text_encoders"], tokenizers=[], noise_scheduler=None)
