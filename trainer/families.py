"""Model family descriptors: SD1.x, SD2.x (eps and v) and SDXL.

One frozen ``Family`` per family says everything the rest of the trainer must not hard-code:
block ids, kohya key prefixes, latent scaling, prediction type and metadata names.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.choices import BLOCKID26


@dataclass(frozen=True)
class Family:
    name: str                       # "sd1" | "sd2" | "sdxl"
    title: str                      # for messages
    base_model_version: str         # ss_base_model_version
    is_v2: bool                     # ss_v2
    block_ids: tuple                # ids a user can pick (BASE = text encoder(s))
    te_prefixes: tuple              # kohya prefixes, one per text encoder
    latent_scale: float
    latent_shift: float = 0.0
    default_prediction: str = "epsilon"
    unet_prefix: str = "lora_unet"


SD1 = Family("sd1", "SD1.x", "sd_v1", False, BLOCKID26, ("lora_te",), 0.18215)
SD2 = Family("sd2", "SD2.x", "sd_v2", True, BLOCKID26, ("lora_te",), 0.18215)
SDXL = Family(
    "sdxl", "SDXL", "sdxl_base_v1-0", False,
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9)),
    ("lora_te1", "lora_te2"), 0.13025,
)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
