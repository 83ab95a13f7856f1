"""Model family descriptors: SD1.x, SD2.x (eps and v), SDXL, and the flow-matching transformers
Flux.1 (dev/schnell) and Z-Image (Turbo).

One frozen ``Family`` per family says everything the rest of the trainer must not hard-code:
block ids, kohya key prefixes and naming, latent scaling, prediction type and metadata names.

The second half maps a diffusers U-Net module path to the original LDM ("sgm") path, to its
block id (``IN00``..``IN11``, ``M00``, ``OUT00``..``OUT11``) and to its kohya module name:

- SD1/SD2 kohya names are the diffusers paths (kohya trains those on a diffusers-named U-Net):
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
- SDXL kohya names are LDM paths (kohya trains SDXL on its own LDM-named U-Net):
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``..._in_layers_2``,
  ``lora_unet_input_blocks_3_0_op``, ``lora_unet_output_blocks_2_2_conv``.
- Text encoders: ``lora_te`` (SD1/2) or ``lora_te1``/``lora_te2`` (SDXL) + the transformers-4
  path ``text_model.encoder.layers.N...``; transformers 5 dropped the ``text_model.`` prefix of
  ``CLIPTextModel``, so it is put back. Flux (sd-scripts' ``lora_flux.py``): ``lora_te1`` + the CLIP-L
  path as above, ``lora_te3`` + the T5 encoder's own path (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``),
  the names ComfyUI and Forge map to their CLIP-L and T5-XXL.

Why the diffusers->LDM direction is written here: diffusers ships only the LDM->diffusers converter
(``single_file_utils.convert_ldm_unet_checkpoint``), keyed by the LDM names of a real checkpoint,
and the trainer builds its U-Nets from diffusers configs, so no LDM key list exists to feed it. The
inverse below covers only the block index arithmetic and the ResNet sub-layer names; the top-level
names come from diffusers' own ``DIFFUSERS_TO_LDM_MAPPING``. Every map is checked once per U-Net
config by running diffusers' converter on it: converting our LDM names back must give every
diffusers key exactly (tensor identity is tested with placeholder values), else it raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from trainer.config.choices import BLOCKID26, FLUX_BLOCK_IDS, ZIMAGE_BLOCK_IDS

SDXL_BLOCK_IDS = ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9))


@dataclass(frozen=True)
class Family:
    name: str                       # "sd1" | "sd2" | "sdxl" | "flux" | "zimage"
    title: str                      # for messages
    base_model_version: str         # ss_base_model_version
    is_v2: bool                     # ss_v2
    block_ids: tuple                # ids a user can pick (BASE = text encoder(s))
    te_prefixes: tuple              # kohya prefixes, one per text encoder
    latent_scale: float
    latent_shift: float = 0.0
    default_prediction: str = "epsilon"
    unet_prefix: str = "lora_unet"
    unet_naming: str = "diffusers"  # which module paths kohya files use for the U-Net: "diffusers" | "ldm"
    modelspec_architecture: str = "stable-diffusion-v1"  # without the "/lora" adapter suffix
    modelspec_implementation: str = "diffusers"
    default_resolution: int = 512
    # Flow-matching transformer families (Flux, Z-Image); SD families keep the defaults.
    denoiser: str = "unet"          # config subfolder of the denoiser: "unet" | "transformer"
    flow: bool = False              # trained with the flow-matching objective (training/losses.py)
    latent_channels: int = 4
    output_sign: float = 1.0        # the model predicts output_sign * (noise - x0)
    model_time: str = "sigma"       # what the model is given: "sigma" (Flux) | "one_minus_sigma" (Z-Image)
    file_naming: str = "kohya"      # "kohya" (lora_unet_...) | "diffusion_model" (diffusion_model.<diffusers path>)
    text_encoder_ids: tuple = ()    # block ids of the text encoders of a transformer family, in te order
    te_kinds: tuple = ("clip",)     # the kind of each text encoder: "clip" | "t5" | "qwen3"
    variant: str = ""               # Flux: "dev" | "schnell" (same modules and names; other metadata, schedule)

    @property
    def is_dit(self) -> bool:
        """True for the transformer families (no U-Net, no LDM block layout)."""
        return self.denoiser == "transformer"

    def unet_lora_name(self, diffusers_path: str, ldm_path: str) -> str:
        """kohya module name of a U-Net module, e.g. ``lora_unet_mid_block_attentions_0_proj_in``."""
        path = ldm_path if self.unet_naming == "ldm" else diffusers_path
        return f"{self.unet_prefix}_{path.replace('.', '_')}"

    def te_lora_name(self, index: int, path: str) -> str:
        """kohya module name of text-encoder ``index``'s module at ``path`` (transformers path)."""
        if not 0 <= index < len(self.te_prefixes):
            raise ValueError(f"{self.title} has {len(self.te_prefixes)} text encoder(s); there is no index {index}")
        if self.te_kind(index) == "clip":
            path = te_kohya_path(path)
        return f"{self.te_prefixes[index]}_{path.replace('.', '_')}"

    def te_kind(self, index: int) -> str:
        """"clip", "t5" or "qwen3": the architecture of text encoder ``index`` (every SD one is a CLIP)."""
        return self.te_kinds[index] if index < len(self.te_kinds) else "clip"

    def te_block(self, index: int) -> str:
        """Block id of text encoder ``index``: BASE on the SD families, CLIP/T5/QWEN3 on the transformers."""
        return self.text_encoder_ids[index] if self.text_encoder_ids else "BASE"

    def modelspec_arch(self, v_prediction: bool) -> str:
        """``modelspec.architecture`` of a LoRA for this family (sd-scripts' ids)."""
        arch = self.modelspec_architecture
        if self.name == "sd2":
            arch = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        return f"{arch}/lora"


SD1 = Family("sd1", "SD1.x", "sd_v1", False, BLOCKID26, ("lora_te",), 0.18215)
SD2 = Family(
    "sd2", "SD2.x", "sd_v2", True, BLOCKID26, ("lora_te",), 0.18215,
    modelspec_architecture="stable-diffusion-v2-512",
)
SDXL = Family(
    "sdxl", "SDXL", "sdxl_base_v1-0", False, SDXL_BLOCK_IDS, ("lora_te1", "lora_te2"), 0.13025,
    unet_naming="ldm", modelspec_architecture="stable-diffusion-xl-v1-base",
    modelspec_implementation="https://github.com/Stability-AI/generative-models", default_resolution=1024,
)

# Flux.1: kohya's Flux layout (sd-scripts' networks/lora_flux.py names the BFL module tree:
# lora_unet_double_blocks_<i>_img_attn_qkv ...); ss_base_model_version and modelspec as sd-scripts writes them.
FLUX = Family(
    "flux", "Flux.1", "flux1", False, FLUX_BLOCK_IDS, ("lora_te1", "lora_te3"), 0.3611, latent_shift=0.1159,
    default_prediction="flow", modelspec_architecture="flux-1-dev",
    modelspec_implementation="https://github.com/black-forest-labs/flux", default_resolution=1024,
    denoiser="transformer", flow=True, latent_channels=16, text_encoder_ids=("CLIP", "T5"), te_kinds=("clip", "t5"),
    variant="dev",
)
# Flux.1-schnell: the same family (name "flux": modules, names, calls) without the guidance embedding
# (no ``guidance_in`` weights), sampled with a fixed shift of 1; sd-scripts' modelspec id for it.
FLUX_SCHNELL = replace(FLUX, title="Flux.1-schnell", modelspec_architecture="flux-1-schnell", variant="schnell")


def flux_family(guidance_embeds: bool) -> "Family":
    """Flux.1-dev (a guidance embedding: ``guidance_in`` / ``guidance_embeds``) or Flux.1-schnell (none)."""
    return FLUX if guidance_embeds else FLUX_SCHNELL
# Z-Image (Turbo): files keyed by the diffusers module path under ``diffusion_model.`` (split q/k/v),
# the layout diffusers' ZImage loader and ComfyUI's Lumina2/Z-Image key map both read. The model's output
# is the negative velocity and it is given 1 - sigma (see training/losses.py).
ZIMAGE = Family(
    "zimage", "Z-Image", "zimage", False, ZIMAGE_BLOCK_IDS, ("lora_te",), 0.3611, latent_shift=0.1159,
    default_prediction="flow", modelspec_architecture="z-image",
    modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image", default_resolution=1024,
    denoiser="transformer", flow=True, latent_channels=16, output_sign=-1.0, model_time="one_minus_sigma",
    file_naming="diffusion_model", text_encoder_ids=("QWEN3",), te_kinds=("qwen3",),
)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, FLUX, ZIMAGE)}

# Why Z-Image's text encoder gets no modules. ComfyUI and Forge Neo read Qwen3 LoRA keys only in their
# generic "text_encoders.<their own module path>" form, and those paths differ (ComfyUI:
# text_encoders.qwen3_4b.transformer.model.layers.N..., Forge Neo: text_encoders.qwen3.model.layers.N...);
# diffusers' Z-Image loader reads the transformer only. A file cannot hold keys every one of them loads.
QWEN3_NOT_TRAINED = (
    "network_blocks has QWEN3, but the Z-Image text encoder (Qwen3) cannot be trained: no LoRA loader reads "
    "one key layout for it (ComfyUI and Forge Neo each expect their own internal module names, diffusers none), "
    "so its part of the file would not load; remove QWEN3 from network_blocks (the transformer blocks "
    "S00-S29 train as before)"
)


def get_family(name: str) -> Family:
    """The family descriptor called ``name`` ("sd1", "sd2", "sdxl", "flux", "zimage")."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


# ----------------------------------------------------------------------------- module classes

def unet_attention_classes() -> tuple[type, ...]:
    """U-Net container classes whose Linear/Conv2d get modules in every network type (kohya lierla)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return (Transformer2DModel,)


def unet_conv_classes() -> tuple[type, ...]:
    """Extra U-Net containers of c3lier/loha (kohya's LoCon targets)."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    return (ResnetBlock2D, Downsample2D, Upsample2D)


def te_classes(kind: str = "clip") -> tuple[type, ...]:
    """Text-encoder containers whose Linears get modules: CLIP attention and MLP; for T5 (Flux's
    second encoder) its attention and gated MLP, the containers sd-scripts' ``lora_flux.py`` wraps.

    transformers 5 has one ``CLIPAttention`` class (the SDPA/flash variants of 4.x are gone), so
    the 4.x ``CLIPSdpaAttention``/``CLIPFlashAttention2`` are added only where they exist.
    """
    if kind == "t5":
        from transformers.models.t5 import modeling_t5

        return (modeling_t5.T5Attention, modeling_t5.T5DenseGatedActDense)
    if kind != "clip":
        raise ValueError(f"no LoRA layout for a {kind} text encoder")
    from transformers.models.clip import modeling_clip

    names = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
    return tuple(getattr(modeling_clip, n) for n in names if hasattr(modeling_clip, n))


def te_kohya_path(path: str) -> str:
    """transformers-4 style path of a CLIP text-encoder module: add ``text_model.`` when missing."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


# ----------------------------------------------------------------------------- diffusers -> LDM

# ResNet sub-layers: diffusers name -> LDM name (the inverse of diffusers' resnet rename).
_RESNET_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}


def _config_dict(unet: Any) -> dict:
    config = getattr(unet, "config", None)
    if config is None:
        raise ValueError(f"expected a diffusers UNet2DConditionModel with a `config`, got {type(unet).__name__}")
    return dict(config)


def _top_level_map(config: dict) -> dict[str, str]:
    """diffusers key -> LDM key for the layers outside the blocks, from diffusers' own table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        table.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        table.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    return table


def _block_key(parts: list[str], config: dict) -> str | None:
    """LDM name of one diffusers key inside down/mid/up blocks, or None when it is elsewhere."""
    per = config["layers_per_block"] + 1  # LDM slots per down block: resnets + the downsampler
    up_has_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    kind = parts[0]
    if kind == "down_blocks":
        b, sub, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if sub == "downsamplers":
            return ".".join([f"input_blocks.{(b + 1) * per}.0.op"] + rest[1:])
        return ".".join([f"input_blocks.{1 + b * per + j}.{0 if sub == 'resnets' else 1}"] + _inner(sub, rest))
    if kind == "mid_block":
        sub, j, rest = parts[1], int(parts[2]), parts[3:]
        slot = 1 if sub == "attentions" else 2 * j
        return ".".join([f"middle_block.{slot}"] + _inner(sub, rest))
    if kind == "up_blocks":
        b, sub, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if sub == "upsamplers":
            return ".".join([f"output_blocks.{b * per + per - 1}.{2 if up_has_attn[b] else 1}"] + rest)
        return ".".join([f"output_blocks.{b * per + j}.{0 if sub == 'resnets' else 1}"] + _inner(sub, rest))
    return None


def _inner(sub: str, rest: list[str]) -> list[str]:
    if sub == "resnets":
        return [_RESNET_LDM.get(rest[0], rest[0])] + rest[1:]
    return rest


def _ldm_key_map(config: dict, keys: list[str]) -> dict[str, str]:
    if not isinstance(config.get("layers_per_block"), int):
        raise ValueError(
            f"U-Net config `layers_per_block` = {config.get('layers_per_block')!r}: only one int for every "
            "block has an LDM layout (SD1, SD2, SDXL)"
        )
    top = _top_level_map(config)
    mapping = {}
    for key in keys:
        ldm = top.get(key) or _block_key(key.split("."), config)
        if ldm is None:
            raise ValueError(f"U-Net parameter {key!r} has no LDM name; is this an SD1/SD2/SDXL U-Net?")
        mapping[key] = ldm
    return mapping


def _check_with_diffusers(config: dict, mapping: dict[str, str]) -> None:
    """Convert our LDM names back with diffusers' converter; every key must come back as itself."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    fake = {LDM_UNET_KEY + ldm: key for key, ldm in mapping.items()}
    back = convert_ldm_unet_checkpoint(fake, config)
    wrong = [k for k in mapping if back.get(k) != k]
    if wrong or len(back) != len(mapping):
        raise RuntimeError(
            "the diffusers->LDM U-Net name map disagrees with diffusers' LDM converter for "
            f"{len(wrong)} key(s), e.g. {wrong[:3]}; this U-Net layout is not supported"
        )


@lru_cache(maxsize=16)
def _ldm_module_map_cached(config_json: str, keys: tuple[str, ...]) -> dict[str, str]:
    config = json.loads(config_json)
    key_map = _ldm_key_map(config, list(keys))
    _check_with_diffusers(config, key_map)
    modules = {}
    for key, ldm in key_map.items():
        path, _, _ = key.rpartition(".")
        modules[path] = ldm.rpartition(".")[0]
    return modules


def ldm_module_paths(unet: Any) -> dict[str, str]:
    """diffusers module path -> LDM module path, for every U-Net module that holds parameters.

    Example: ``down_blocks.0.resnets.0.conv1`` -> ``input_blocks.1.0.in_layers.2``.
    Checked against diffusers' LDM converter (see the module docstring); cached per config.
    """
    config = _config_dict(unet)
    keys = tuple(unet.state_dict().keys())
    return dict(_ldm_module_map_cached(json.dumps(config, sort_keys=True, default=str), keys))


def block_id_of(ldm_path: str) -> str | None:
    """Block id of an LDM module path: ``IN04``, ``M00``, ``OUT02``; None outside the blocks
    (time embedding, ``out`` = final norm and conv_out, ``label_emb``)."""
    parts = ldm_path.split(".")
    if parts[0] == "input_blocks":
        return f"IN{int(parts[1]):02d}"
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] == "output_blocks":
        return f"OUT{int(parts[1]):02d}"
    return None
