"""Fake ``modules.processing``: txt2img as an extension calls it (``StableDiffusionProcessingTxt2Img``
+ ``process_images``), with the fields both hosts' dataclasses have (Forge and A1111 1.9+ add
``scheduler``; Forge ``distilled_cfg_scale``).

``process_images`` does what matters to an extension: the prompt's ``<lora:...>`` tags go through the
host's extra-network path (``extra_networks.parse_prompt`` / ``activate`` -> ``networks.load_networks``),
the loaded networks reach the weights the way each host applies them (A1111: every named layer's
``network_apply_weights`` as it runs; Forge: the patchers' LoRA merged as they are loaded for sampling),
and the "sampler" draws an image from the seed, the prompt and the weights as they are then, so a
network that changed nothing gives the base model's image to the pixel. Nothing is written to disk
with ``do_not_save_samples`` / ``do_not_save_grid``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules import FLAVOUR, shared

generations = []  # (prompt as given, sampler, scheduler, steps, cfg, width, height, seed) of each image


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    sampler_name: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False
    extra_generation_params: dict = None


if FLAVOUR == "forge":
    @dataclass(repr=False)
    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        scheduler: str = None
        distilled_cfg_scale: float = 3.5
        enable_hr: bool = False
        denoising_strength: float = 0.75
else:
    @dataclass(repr=False)
    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        enable_hr: bool = False
        denoising_strength: float = 0.75


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", all_prompts=None, infotexts=None):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.width, self.height = p.width, p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale, self.steps = p.cfg_scale, p.steps
        self.info = info
        self.all_prompts = all_prompts or [p.prompt]
        self.infotexts = infotexts or [info]


def _weights(sd_model) -> list:
    if FLAVOUR == "forge":
        objects = sd_model.forge_objects
        return [*objects.unet.model.diffusion_model.parameters(), *objects.clip.cond_stage_model.parameters()]
    return [*sd_model.model.diffusion_model.parameters(), *sd_model.cond_stage_model.parameters()]


def _sample(sd_model, prompt: str, seed: int, width: int, height: int) -> Image.Image:
    with torch.no_grad():
        signature = sum(float(p.double().square().sum()) for p in _weights(sd_model))
    generator = np.random.default_rng([seed, zlib.crc32(" ".join(prompt.split()).encode())])  # as tokens read it
    noise = generator.random((height, width, 3))
    shift = (signature * 997.0) % 1.0
    return Image.fromarray((((noise + shift) % 1.0) * 255).astype(np.uint8))


def process_images(p: StableDiffusionProcessing) -> Processed:
    # The real hosts generate under torch.no_grad() (A1111 1.8's process_images_inner) or
    # torch.inference_mode() (Forge's): a LoRA merged there is merged in that mode.
    with torch.inference_mode() if FLAVOUR == "forge" else torch.no_grad():
        return _process_images(p)


def _process_images(p: StableDiffusionProcessing) -> Processed:
    from modules import extra_networks

    sd_model = shared.sd_model
    prompt, data = extra_networks.parse_prompt(p.prompt)
    if not p.disable_extra_networks:
        extra_networks.activate(p, data)
    if FLAVOUR == "forge":
        from backend import memory_management

        objects = sd_model.forge_objects
        memory_management.load_models_gpu([objects.unet, objects.clip.patcher])
    else:
        import networks

        networks.apply_to_model(sd_model)
    seed = int(p.seed) if p.seed is not None and int(p.seed) >= 0 else 12345
    images = []
    for index in range(p.batch_size * p.n_iter):
        generations.append((p.prompt, p.sampler_name, getattr(p, "scheduler", None), p.steps, p.cfg_scale,
                            p.width, p.height, seed + index))
        images.append(_sample(sd_model, prompt, seed + index, p.width, p.height))
    info = f"{prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, CFG scale: {p.cfg_scale}, Seed: {seed}"
    return Processed(p, images, seed, info)
