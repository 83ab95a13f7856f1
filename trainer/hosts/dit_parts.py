"""The parts of the flow-matching transformer families (Flux.1, Z-Image): classes from configs,
and loading the transformer, text encoders, tokenizers and VAE from what users download.

- Flux: ``FluxTransformer2DModel``, CLIP-L (``CLIPTextModel``) + T5-XXL (``T5EncoderModel``),
  16-channel ``AutoencoderKL``. Z-Image: ``ZImageTransformer2DModel``, Qwen3-4B (``Qwen3Model``:
  the pipeline reads its second-to-last hidden layer), the same VAE.
- Single-file transformers (the usual download: BFL keys ``double_blocks.*`` for Flux, the original
  ``layers.*.attention.qkv`` keys for Z-Image, with or without ``model.diffusion_model.``) are
  converted with diffusers' own single-file converters (``convert_flux_transformer_checkpoint_to_
  diffusers``, ``convert_z_image_transformer_checkpoint_to_diffusers``) and the shipped configs.
- Text encoders and tokenizers come with the user's files: a diffusers model folder
  (``text_encoder*/``, ``tokenizer*/``), or a text-encoder folder in transformers' format (config,
  weights and tokenizer files, as ``save_pretrained`` writes them). The T5 and Qwen3 tokenizers are
  several MB each, so the package does not ship them; the CLIP-L tokenizer of Flux is the shipped
  CLIP BPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.hosts.base import ModelLoadError

_TRANSFORMERS = {"FluxTransformer2DModel": "flux", "ZImageTransformer2DModel": "zimage"}


def library_class(library: str, name: str) -> Any:
    """``library.name``, or a ModelLoadError saying the installed release is too old for these families.

    Looked up by name, not imported at module level: the SD families run on older releases
    (A1111's diffusers 0.31 / transformers 4.30) that lack some of these classes."""
    import importlib

    module = importlib.import_module(library)
    found = getattr(module, name, None)
    if found is None:
        raise ModelLoadError(f"{library} {getattr(module, '__version__', '?')} has no {name}, which Flux.1 / Z-Image "
                             f"need; update {library} (Z-Image needs diffusers >= 0.36 and transformers >= 4.51)")
    return found


def transformer_class(config: dict) -> Any:
    """The diffusers transformer class a ``transformer/config.json`` names."""
    name = config.get("_class_name")
    if name not in _TRANSFORMERS:
        raise ModelLoadError(f"transformer config names {name!r}; supported: {', '.join(_TRANSFORMERS)}")
    return library_class("diffusers", name)


def family_of_transformer(config: dict) -> str:
    """``"flux"`` or ``"zimage"`` from a transformer config."""
    transformer_class(config)
    return _TRANSFORMERS[config["_class_name"]]


def text_encoder_for(config_file: Path) -> Any:
    """A text-encoder module (no weights loaded) from its transformers config file."""
    config = library_class("transformers", "AutoConfig").from_pretrained(str(config_file))
    return _text_encoder_class(config.model_type, config_file)(config)


def _text_encoder_class(kind: str, where: Path) -> Any:
    names = {"clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel", "qwen3": "Qwen3Model"}
    if kind not in names:
        raise ModelLoadError(f"{where}: text encoder type {kind!r} is not one of CLIP, T5, Qwen3")
    return library_class("transformers", names[kind])


PIPELINES = {"FluxPipeline": "flux", "ZImagePipeline": "zimage"}
_TEXT_FOLDERS = {"flux": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
                 "zimage": (("text_encoder", "tokenizer"),)}


def flow_scheduler(config: dict) -> Any:
    """diffusers' FlowMatchEulerDiscreteScheduler from a scheduler config (its shift settings are
    what training samples with, training/losses.py)."""
    return library_class("diffusers", "FlowMatchEulerDiscreteScheduler").from_config(config)


def load_tokenizer_folder(folder: Path, what: str) -> Any:
    """A tokenizer saved with a text encoder (``save_pretrained`` files), read offline."""
    if not folder.is_dir() or not any((folder / n).is_file() for n in
                                      ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")):
        raise ModelLoadError(f"no tokenizer files for the {what} in {folder}; the tokenizer comes with the text "
                             "encoder's files (tokenizer.json / tokenizer_config.json), which the trainer does not ship")
    try:
        return library_class("transformers", "AutoTokenizer").from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises several types for broken tokenizer files
        raise ModelLoadError(f"the {what} tokenizer in {folder} could not be read: {error}") from error


def load_text_encoder_folder(folder: Path, dtype: Any, what: str) -> Any:
    """A text encoder saved in transformers' format (config.json + weights), read offline."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json for the {what} in {folder}")
    kind = library_class("transformers", "AutoConfig").from_pretrained(str(folder), local_files_only=True).model_type
    cls = _text_encoder_class(kind, folder)
    try:
        return cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"the {what} in {folder} could not be loaded: {error}") from error


def load_dit_folder(folder: Path, family_name: str, dtype: Any) -> dict:
    """transformer, vae, text encoders, tokenizers and scheduler of a Flux / Z-Image diffusers folder."""
    from diffusers import AutoencoderKL

    from trainer.hosts.components import read_json

    config = read_json(folder / "transformer" / "config.json")
    found = family_of_transformer(config)
    if found != family_name:
        raise ModelLoadError(f"{folder}: its transformer is a {found} model, not {family_name}")
    local = dict(local_files_only=True)
    try:
        transformer = transformer_class(config).from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                                **local)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **local)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder} could not be loaded: {error}") from error
    encoders, tokenizers = [], []
    for te_name, tok_name in _TEXT_FOLDERS[family_name]:
        encoders.append(load_text_encoder_folder(folder / te_name, dtype, te_name))
        tokenizers.append(load_tokenizer_folder(folder / tok_name, te_name))
    scheduler = flow_scheduler(read_json(folder / "scheduler" / "scheduler_config.json"))
    return dict(unet=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers, noise_scheduler=scheduler)


# Flux.1-schnell's scheduler differs from dev's (the shipped config): a fixed shift of 1, no
# resolution-dependent shift (diffusers' FLUX.1-schnell scheduler_config.json).
SCHNELL_SCHEDULER = {"use_dynamic_shifting": False, "shift": 1.0}
_GUIDANCE_KEYS = ("guidance_in.", "time_text_embed.guidance_embedder.")


def has_guidance_embedding(keys) -> bool:
    """Whether a Flux transformer's keys hold the guidance embedding (Flux.1-dev; schnell has none)."""
    return any(k.startswith(_GUIDANCE_KEYS) for k in keys)


_CONVERTERS = {"flux": "convert_flux_transformer_checkpoint_to_diffusers",
               "zimage": "convert_z_image_transformer_checkpoint_to_diffusers"}
# A key only a diffusers-named transformer file has (then it is loaded as it is).
_DIFFUSERS_MARKER = {"flux": "x_embedder.weight", "zimage": "layers.0.attention.to_q.weight"}
_LDM_PREFIX = "model.diffusion_model."


def load_transformer_file(path: Path, family_name: str, config: dict, dtype: Any) -> Any:
    """A transformer from a single file: original keys (BFL Flux, Z-Image's fused ``qkv``; with or
    without ``model.diffusion_model.``) through diffusers' converter, or diffusers-named keys as they are.
    An all-in-one file (the transformer under ``model.diffusion_model.`` beside ``vae.*`` and
    ``text_encoders.*``, as Forge saves and reads Flux) gives its transformer only; the rest is not read."""
    from trainer.hosts.checkpoint_file import CheckpointFile, read_safetensors

    ckpt = CheckpointFile(path, "model")
    _refuse_packed(ckpt.shapes, path.name)
    if ckpt.is_safetensors and ckpt.has_prefix(_LDM_PREFIX):
        try:
            state = read_safetensors(path, dtype, keep=lambda key: key.startswith(_LDM_PREFIX))
        except Exception as error:
            raise ckpt._unreadable(error) from error
    else:
        state = ckpt.state_dict(dtype)
    ckpt.release()
    return transformer_from_state(state, family_name, config, dtype=dtype, source=path.name)


# Keys that only packed (quantised) files have: bitsandbytes' nf4/fp4 quant state, fp8 "scaled" weights
# (the web UI's loaded Flux model is checked with the same list: webui_dit.packed_keys).
PACKED_MARKERS = (".quant_state.", "bitsandbytes__", ".absmax", ".quant_map", "scale_weight")


def _refuse_packed(keys, name: str) -> None:
    packed = next((k for k in keys if any(m in k for m in PACKED_MARKERS)), None)
    if packed is not None:
        raise ModelLoadError(f"{name} holds quantised weights (e.g. {packed}: bitsandbytes nf4/fp4 or scaled fp8), "
                             "which cannot be trained; choose a bf16, fp16 or plain fp8 version of the model")


def transformer_from_state(state: dict, family_name: str, config: dict, *, dtype: Any = None,
                           source: str = "the transformer") -> Any:
    """A diffusers transformer from a state dict in the original layout (BFL Flux / Z-Image's, with or
    without ``model.diffusion_model.``; other keys ignored) or with diffusers names. The converter splits
    fused tensors into views, so the module shares the given tensors where the layout allows."""
    from trainer.hosts.ldm_convert import _cast, _empty_weights, _finish, assign_weights

    if any(k.startswith(_LDM_PREFIX) for k in state):
        state = {k[len(_LDM_PREFIX):]: v for k, v in state.items() if k.startswith(_LDM_PREFIX)}
    if family_name == "flux" and not has_guidance_embedding(state):  # Flux.1-schnell
        config = {**config, "guidance_embeds": False}
    if _DIFFUSERS_MARKER[family_name] not in state:
        convert = library_class("diffusers.loaders.single_file_utils", _CONVERTERS[family_name])
        try:
            state = _flux_narrow_linear1(convert, state, config) if family_name == "flux" else convert(dict(state))
        except (IndexError, KeyError, ValueError, RuntimeError) as error:  # diffusers' converter on a partial file
            raise ModelLoadError(f"{source} is not a complete {family_name} transformer: diffusers' converter "
                                 f"failed ({type(error).__name__}: {error}); the file may be incomplete") from error
    with _empty_weights():
        model = transformer_class(config).from_config(config)
    return _finish(assign_weights(model, _cast(state, dtype), "transformer", source))


_FLUX_WIDTH = 3072  # diffusers' Flux converter fixes the width (inner_dim) at Flux.1's


def _flux_narrow_linear1(convert: Any, state: dict, config: dict) -> dict:
    """diffusers' Flux converter on a transformer of any width. It splits each single block's fused
    ``linear1`` at Flux.1's fixed width (3072), so for another width (the tests' tiny models) it is
    handed a shape-only stand-in of the full-width tensor, and the real one is split by the same rule
    (q, k, v of the width, then the MLP) into the names the converter gave the stand-in's parts."""
    import torch

    width = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
    if width == _FLUX_WIDTH:
        return convert(dict(state))
    fused = {k: v for k, v in state.items() if k.startswith("single_blocks.") and ".linear1." in k}
    stand_in = {k: torch.empty((3 * _FLUX_WIDTH + 4 * _FLUX_WIDTH, *v.shape[1:]), device="meta")
                for k, v in fused.items()}
    out = convert({**state, **stand_in})
    for key, tensor in fused.items():
        block, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        parts = torch.split(tensor, [width, width, width, tensor.shape[0] - 3 * width], dim=0)
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        for name, piece in zip(names, parts):
            out[f"single_transformer_blocks.{block}.{name}.{kind}"] = piece
    return out


def check_text_encoder_path(te_path: Path | None, family_name: str) -> Path:
    """``te_path`` as a folder, or a ModelLoadError saying what the Text Encoder selection must hold."""
    title = "Flux.1" if family_name == "flux" else "Z-Image"
    needs = " + ".join(te for te, _ in _TEXT_FOLDERS[family_name])
    if te_path is None:
        raise ModelLoadError(f"a single-file {title} transformer needs its text encoder(s): choose a Text Encoder "
                             f"folder (te) holding {needs} with their tokenizers, e.g. the model's diffusers folder")
    te_path = Path(te_path)
    if not te_path.is_dir():
        raise ModelLoadError(f"Text Encoder {te_path} is not a folder; give the folder holding {needs} and "
                             "their tokenizer folders (a diffusers model folder, or a text-encoder folder)")
    return te_path


def load_text_encoders(te_path: Path | None, family_name: str, dtype: Any) -> tuple[list, list]:
    """The text encoder(s) and tokenizer(s) of ``family_name`` from the Text Encoder selection: a folder
    holding ``text_encoder/`` + ``tokenizer/`` (Flux also ``text_encoder_2/`` + ``tokenizer_2/``), as a
    diffusers model folder does; for Z-Image also a Qwen3 folder itself (config, weights, tokenizer)."""
    te_path = check_text_encoder_path(te_path, family_name)
    if family_name == "zimage" and (te_path / "config.json").is_file():
        return ([load_text_encoder_folder(te_path, dtype, "text encoder")],
                [load_tokenizer_folder(te_path, "text encoder")])
    encoders, tokenizers = [], []
    for te_name, tok_name in _TEXT_FOLDERS[family_name]:
        encoders.append(load_text_encoder_folder(te_path / te_name, dtype, te_name))
        tokenizers.append(load_tokenizer_folder(te_path / tok_name, te_name))
    return encoders, tokenizers
