"""Diffusers / transformers modules from an LDM-keyed state dict and diffusers-format configs.

The LDM -> diffusers key mapping is diffusers' own single-file machinery
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``; the same functions ``from_single_file`` uses, with the same
names and arguments from diffusers 0.31 to 0.42). Each module is built with empty weights and the
converted tensors are *assigned*, not copied, so a module shares memory with the loaded file (or
with a web-UI's loaded weights) when the dtype already matches. Every weight must be found: a
missing, surplus or wrongly shaped tensor is a :class:`ModelLoadError` naming the component.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.hosts.base import ModelLoadError

_HINT = "if the model has a non-standard architecture, pass config_dir= with its diffusers configs"


@contextmanager
def _empty_weights():
    """Create parameters on the meta device (buffers stay real), as diffusers does."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency
        import torch

        with torch.device("meta"):
            yield
        return
    with init_empty_weights():
        yield


def assign_weights(model: Any, weights: Mapping[str, Any], component: str, source: str) -> Any:
    """Put ``weights`` into ``model`` (built with empty weights); every parameter must be covered.

    Weights may themselves be on the meta device (a shape-only check of a config against a key set).
    """
    try:
        result = model.load_state_dict(dict(weights), strict=False, assign=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's first line only names the model; the cause is on the lines after it
        detail = next((line for line in lines if "size mismatch" in line), " ".join(lines[:2])[:400])
        raise ModelLoadError(
            f"the {component} weights of {source} do not fit its config ({detail}); {_HINT}") from error
    # Buffers the model computes itself (CLIP position ids in older transformers) may be absent.
    kept_buffers = {name for name, buf in model.named_buffers() if not buf.is_meta}
    missing = [k for k in result.missing_keys if k not in kept_buffers]
    surplus = list(result.unexpected_keys)
    if missing:
        raise ModelLoadError(
            f"{source} lacks {len(missing)} {component} weight(s) (e.g. {', '.join(missing[:3])}); the file may be "
            f"incomplete (re-download it) or of another architecture; {_HINT}")
    if surplus:
        raise ModelLoadError(
            f"{source} has {len(surplus)} {component} weight(s) its config does not expect "
            f"(e.g. {', '.join(surplus[:3])}); {_HINT}")
    return model


def _finish(model: Any) -> Any:
    model.eval()
    return model


def _cast(weights: Mapping[str, Any], dtype: Any) -> dict:
    """Weights in ``dtype`` (floating tensors only); tensors already in it are kept, not copied."""
    if dtype is None:
        return dict(weights)
    return {k: v.to(dtype) if getattr(v, "is_floating_point", lambda: False)() else v for k, v in weights.items()}


def build_unet(state: Mapping[str, Any], config: dict, *, dtype: Any = None, source: str = "the checkpoint") -> Any:
    """UNet2DConditionModel from the ``model.diffusion_model.*`` keys of ``state``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with _empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    converted = convert_ldm_unet_checkpoint(state, dict(unet.config))
    return _finish(assign_weights(unet, _cast(converted, dtype), "UNet", source))


def build_vae(state: Mapping[str, Any], config: dict, *, dtype: Any = None, source: str = "the checkpoint") -> Any:
    """AutoencoderKL from LDM VAE keys (bare, or under ``first_stage_model.`` / ``vae.``).

    Files that already use diffusers names (``encoder.down_blocks...``) are loaded as they are.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with _empty_weights():
        vae = AutoencoderKL.from_config(config)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:
        converted = dict(state)
    else:
        converted = convert_ldm_vae_checkpoint(state, dict(vae.config))
    return _finish(assign_weights(vae, _cast(converted, dtype), "VAE", source))


def text_encoder_class(config: Any) -> Any:
    """CLIPTextModelWithProjection when the config's architectures say so, else CLIPTextModel."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    names = list(getattr(config, "architectures", None) or [])
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in names else CLIPTextModel


def build_text_encoder(state: Mapping[str, Any], config_file: Path, *, layout: str, ldm_prefix: str,
                       dtype: Any = None, source: str = "the checkpoint", component: str = "text encoder") -> Any:
    """A transformers CLIP text model from the LDM keys under ``ldm_prefix``.

    ``layout`` is ``"clip"`` (keys in transformers' own layout, SD1 and SDXL's first encoder) or
    ``"open_clip"`` (OpenCLIP resblocks with fused q/k/v, SD2 and SDXL's second encoder).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_json_file(str(config_file))
    with _empty_weights():
        model = text_encoder_class(config)(config)
    if layout == "open_clip":
        converted = convert_open_clip_checkpoint(model, state, prefix=ldm_prefix)
    else:
        own = {k: v for k, v in state.items() if k.startswith(ldm_prefix)}
        converted = convert_ldm_clip_checkpoint(own, remove_prefix=ldm_prefix)
    # Position ids are a buffer the model makes itself; some merged files store damaged copies.
    converted = {k: v for k, v in _match_text_model_prefix(model, converted).items() if not k.endswith("position_ids")}
    return _finish(assign_weights(model, _cast(converted, dtype), component, source))


def _match_text_model_prefix(model: Any, weights: Mapping[str, Any]) -> dict:
    """Give keys the ``text_model.`` prefix exactly when the model has that submodule.

    transformers >= 5 flattened ``CLIPTextModel`` (no ``text_model.``), while
    ``CLIPTextModelWithProjection`` and older versions keep it; some old SD1 files also lack it.
    """
    wrapped = hasattr(model, "text_model")
    out = {}
    for key, value in weights.items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        keep_bare = not wrapped or bare.startswith("text_projection.")
        out[bare if keep_bare else "text_model." + bare] = value
    return out
