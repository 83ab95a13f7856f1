"""Start a fake web UI in a folder: models on disk, lists scanned, a checkpoint loaded.

Import only after ``FAKEHOST_FLAVOUR`` / ``FAKEHOST_ROOT`` are set and ``tests/fakehost`` is first
on ``sys.path``. ``start()`` does what a web UI does at launch: scan the model folders, import
the built-in Lora extension's ``networks`` module, load the selected checkpoint and (Forge) run
it once so its parts sit on the GPU.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ldm import write_config_dir, write_single_file, vae_to_ldm, save_state_dict


@dataclass
class Assets:
    """Files a fake web UI starts with, written once and copied into each web-UI folder."""

    folder: Path
    parts: dict         # diffusers components: "base" (seed 0), "other" (seed 1), "vae" (seed 2), "xl" (SDXL),
                        # "sd2" (SD2, OpenCLIP text encoder)


def make_assets(folder: Path) -> Assets:
    """Two tiny SD1 checkpoints, a tiny SD2 and a tiny SDXL one, a VAE file and the tiny architectures' configs."""
    from tiny import tiny_components

    folder.mkdir(parents=True, exist_ok=True)
    parts = {"base": write_single_file("sd1", folder / "base.safetensors", seed=0),
             "other": write_single_file("sd1", folder / "other.safetensors", seed=1),
             "vae": tiny_components("sd1", 2), "xl": write_single_file("sdxl", folder / "xl.safetensors", seed=3),
             "sd2": write_single_file("sd2", folder / "sd2.safetensors", seed=4)}
    save_state_dict(vae_to_ldm(parts["vae"]["vae"], prefix=""), folder / "tiny.vae.safetensors")
    write_config_dir("sd1", folder / "configs", parts["base"])
    write_config_dir("sdxl", folder / "configs_xl", parts["xl"])
    write_config_dir("sd2", folder / "configs_sd2", parts["sd2"])
    return Assets(folder, parts)


@dataclass
class FakeWebUI:
    root: Path
    flavour: str
    base: Path          # the checkpoint loaded at start (tiny SD1, seed 0)
    other: Path         # a second checkpoint (tiny SD1, seed 1)
    vae: Path           # a VAE file (the VAE of seed 2)
    config_dir: Path    # diffusers configs of the tiny SD1 architecture
    xl: Path            # a tiny SDXL checkpoint (seed 3), configs in config_dir_xl
    config_dir_xl: Path
    sd2: Path           # a tiny SD2 checkpoint (seed 4), configs in config_dir_sd2
    config_dir_sd2: Path
    parts: dict         # diffusers components per file stem

    @property
    def lora_dir(self) -> Path:
        return self.root / "models" / "Lora"


def start(root: Path, assets: Assets) -> FakeWebUI:
    """Lay out ``root`` like a web-UI folder with ``assets`` and start the fake host there."""
    import networks  # noqa: F401  (imported by the built-in Lora extension at start-up)
    from modules import sd_models, sd_vae, shared
    from fakehost_models import generate

    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    (models / "VAE").mkdir(parents=True, exist_ok=True)
    base = models / "Stable-diffusion" / "base.safetensors"
    other = models / "Stable-diffusion" / "other.safetensors"
    vae = models / "VAE" / "tiny.vae.safetensors"
    xl = models / "Stable-diffusion" / "xl.safetensors"
    sd2 = models / "Stable-diffusion" / "sd2.safetensors"
    for source, target in ((assets.folder / base.name, base), (assets.folder / other.name, other),
                           (assets.folder / vae.name, vae), (assets.folder / xl.name, xl),
                           (assets.folder / sd2.name, sd2)):
        shutil.copyfile(source, target)
    sd_models.list_models()
    sd_vae.refresh_vae_list()
    info = sd_models.get_closet_checkpoint_match("base.safetensors")
    shared.opts.data["sd_model_checkpoint"] = info.title
    if shared.flavour == "forge":
        sd_models.model_data.forge_loading_parameters = dict(
            checkpoint_info=info, additional_modules=shared.opts.forge_additional_modules, unet_storage_dtype=None)
        sd_models.forge_model_reload()
    generate(shared.sd_model)  # A1111 loads lazily here; Forge moves its parts to the GPU
    return FakeWebUI(root, shared.flavour, base, other, vae, assets.folder / "configs", xl,
                     assets.folder / "configs_xl", sd2, assets.folder / "configs_sd2", assets.parts)


def write_flux_file(path: Path, seed: int = 0, *, schnell: bool = False, fp8: bool = False) -> dict:
    """A tiny Flux.1 all-in-one file as Forge reads one (BFL transformer under ``model.diffusion_model.``,
    LDM VAE under ``vae.``, CLIP-L and T5 under ``text_encoders.<name>.transformer.``); ``schnell`` leaves
    out the guidance embedding, ``fp8`` stores the transformer in float8_e4m3fn (its RMSNorm scales in
    bfloat16, so most tensors are fp8 and Forge keeps fp8 storage). Returns the
    diffusers components it was written from."""
    import torch

    from ldm import clip_to_ldm
    from tiny_dit import flux_to_bfl, t5_state, tiny_dit_components

    parts = tiny_dit_components("flux", seed)
    if schnell:
        torch.manual_seed(seed)
        parts["unet"] = type(parts["unet"]).from_config({**parts["unet"].config, "guidance_embeds": False})
    transformer = flux_to_bfl(parts["unet"])
    if fp8:
        transformer = {k: v.to(torch.bfloat16 if k.endswith(".scale") else torch.float8_e4m3fn)
                       for k, v in transformer.items()}
    sd = {f"model.diffusion_model.{k}": v for k, v in transformer.items()}
    sd.update(vae_to_ldm(parts["vae"], prefix="vae."))
    clip, t5 = parts["text_encoders"]
    sd.update(clip_to_ldm(clip, "text_encoders.clip_l.transformer."))
    sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_state(t5).items()})
    save_state_dict(sd, path)
    return parts


def write_flux_configs(folder: Path, parts: dict) -> Path:
    """The diffusers-format config folder of a tiny Flux model (configs only; the tokenizers come from the host)."""
    folder = Path(folder)
    parts["unet"].save_config(folder / "transformer")
    parts["vae"].save_config(folder / "vae")
    parts["noise_scheduler"].save_config(folder / "scheduler")
    for name, te in zip(("text_encoder", "text_encoder_2"), parts["text_encoders"]):
        te.config.save_pretrained(folder / name)
    return folder
