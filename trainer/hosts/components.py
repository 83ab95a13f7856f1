"""Config folders, tokenizers, the noise scheduler and the prediction-type decision.

The package ships one diffusers-format config folder per family under ``trainer/assets``
(``sd1``, ``sd2``, ``sdxl``: configs only, no weights), written from the public configs of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
stabilityai/stable-diffusion-xl-base-1.0. Every tokenizer uses the CLIP BPE files in
``trainer/assets/clip_tokenizer``; only the pad token differs (``<|endoftext|>`` for CLIP-L,
``!`` for the OpenCLIP encoders). Nothing here ever reaches the network.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.hosts.base import ModelLoadError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_FILES = ASSETS / "clip_tokenizer"


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: its config subfolder, LDM key layout and default pad token."""

    subfolder: str
    tokenizer_subfolder: str
    layout: str          # "clip" (transformers layout) or "open_clip" (OpenCLIP resblocks)
    ldm_prefix: str
    pad_token: str


TEXT_ENCODERS = {
    "sd1": (TextEncoderSlot("text_encoder", "tokenizer", "clip", "cond_stage_model.transformer.", "<|endoftext|>"),),
    "sd2": (TextEncoderSlot("text_encoder", "tokenizer", "open_clip", "cond_stage_model.model.", "!"),),
    "sdxl": (
        TextEncoderSlot("text_encoder", "tokenizer", "clip", "conditioner.embedders.0.transformer.", "<|endoftext|>"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "open_clip", "conditioner.embedders.1.model.", "!"),
    ),
}


def shipped_config_dir(family: str) -> Path:
    """The config folder the package ships for ``family``."""
    folder = ASSETS / family
    if not ((folder / "unet" / "config.json").is_file() or (folder / "transformer" / "config.json").is_file()):
        raise ModelLoadError(f"no shipped configs for model family {family!r} in {ASSETS}")
    return folder


class ConfigFolders:
    """Where each component's config comes from: ``config_dir`` first, else the shipped family folder.

    A user ``config_dir`` must hold at least ``unet/config.json``; other components it lacks are
    taken from the shipped configs of the family.
    """

    def __init__(self, family: str, config_dir: str | Path | None = None) -> None:
        self.family = family
        self.shipped = shipped_config_dir(family)
        self.user = Path(config_dir) if config_dir is not None else None
        if self.user is not None:
            if not self.user.is_dir():
                raise ModelLoadError(f"config_dir not found (or not a folder): {self.user}")
            denoiser = "transformer" if (self.shipped / "transformer").is_dir() else "unet"
            if not (self.user / denoiser / "config.json").is_file():
                raise ModelLoadError(
                    f"config_dir {self.user} has no {denoiser}/config.json; it must be a diffusers-format folder "
                    f"of configs ({denoiser}/, vae/, text_encoder/, ...)")

    def folder(self, subfolder: str) -> Path:
        """The folder holding ``subfolder``'s config."""
        if self.user is not None and (self.user / subfolder).is_dir():
            return self.user / subfolder
        return self.shipped / subfolder

    def json(self, subfolder: str, filename: str = "config.json") -> dict:
        """The parsed ``subfolder/filename`` config."""
        path = self.folder(subfolder) / filename
        return read_json(path)

    def describe(self) -> str:
        """Where the configs come from, for messages and metadata."""
        return str(self.user) if self.user is not None else f"the shipped {self.family} configs"


def read_json(path: Path) -> dict:
    """A JSON config file as a dict; ModelLoadError naming the file if missing or broken."""
    if not path.is_file():
        raise ModelLoadError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"config file {path} could not be read: {error}") from error


def load_tokenizer(folder: Path, default_pad: str) -> Any:
    """A CLIPTokenizer from ``folder``: its own vocabulary files if present, else the shipped CLIP BPE.

    ``tokenizer_config.json`` (optional) sets ``pad_token`` and ``model_max_length``.
    """
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    # Positional vocab/merges paths work on transformers 4.x and 5.x alike.
    return CLIPTokenizer(
        str(TOKENIZER_FILES / "vocab.json"), str(TOKENIZER_FILES / "merges.txt"),
        model_max_length=int(settings.get("model_max_length", 77)),
        pad_token=settings.get("pad_token", default_pad),
    )


def noise_scheduler(config: dict, prediction_type: str, zero_terminal_snr: bool = False) -> Any:
    """The training noise scheduler: DDPM with the betas of ``config`` (any SD scheduler's config).

    SD folders name PNDM, DDIM or Euler schedulers for sampling; training only needs the noise
    schedule, which those configs share (T = 1000, scaled_linear 0.00085..0.012 for SD).
    """
    from diffusers import DDPMScheduler

    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if k in accepted}
    kwargs.update(prediction_type=prediction_type, clip_sample=False)
    if zero_terminal_snr:
        kwargs["rescale_betas_zero_snr"] = True
    return DDPMScheduler(**kwargs)


_YAML_V = re.compile(r"^\s*parameterization\s*:\s*[\"']?v[\"']?\s*$", re.MULTILINE)


def yaml_says_v(checkpoint: Path) -> bool:
    """True if an LDM ``<name>.yaml`` next to the checkpoint sets ``parameterization: "v"``.

    This is how the web-UIs mark SD2 768-v checkpoints by hand.
    """
    for candidate in (checkpoint.with_suffix(".yaml"), checkpoint.with_suffix(".yml")):
        if candidate.is_file():
            try:
                return bool(_YAML_V.search(candidate.read_text(encoding="utf-8", errors="replace")))
            except OSError:
                return False
    return False


def decide_prediction(option: bool | None, *, has_v_key: bool = False, yaml_v: bool = False,
                      folder_prediction: str | None = None, default: str = "epsilon") -> tuple[str, str]:
    """(prediction_type, where the decision came from).

    Order: the user's option; a ``v_pred`` key in the checkpoint; a ``parameterization: "v"``
    yaml next to it; a diffusers folder's scheduler config; else the family default (epsilon,
    as the reference: SD2 768-v needs the option or one of these marks).
    """
    if option is not None:
        return ("v_prediction" if option else "epsilon"), "option"
    if has_v_key:
        return "v_prediction", "checkpoint key 'v_pred'"
    if yaml_v:
        return "v_prediction", "yaml next to the checkpoint"
    if folder_prediction in ("epsilon", "v_prediction"):
        return folder_prediction, "scheduler config"
    return default, "default"
