"""A web UI's loaded Flux.1 model as a ModelBundle (no web-UI import here: state dicts in, bundle out).

Forge holds a loaded Flux.1 model in the original (BFL) layout: the transformer's
``double_blocks.*`` / ``single_blocks.*`` keys, the 16-channel VAE with LDM names, CLIP-L in
transformers' layout and T5-XXL with transformers' key names (``encoder.block.N.layer.0.SelfAttention.q``).
The adapter (``webui.ForgeAdapter.weights``) collects them into one state dict keyed as Forge's own
all-in-one checkpoint is (``FLUX_PREFIXES``), and this module builds the diffusers transformer with the
converter the file loader uses (``dit_parts.transformer_from_state``: diffusers' single-file converter
and the shipped configs), the VAE and CLIP-L with ``ldm_convert``'s builders and T5 from its shipped
config, so nothing about key mapping is written twice. tests/data/hosts/forge_flux*.json.gz record
what real Forge holds.

Weights Forge keeps packed (bitsandbytes nf4/fp4, GGUF) or in fp8 storage cannot be trained as they
are: ``packed_keys`` names them, and ``flux_from_loaded`` reads the transformer from its file instead
(text encoders held in fp8 are widened to bfloat16, which holds every fp8 value exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.hosts.base import ModelLoadError

TRANSFORMER = "model.diffusion_model."
VAE = "vae."
CLIP_L = "text_encoders.clip_l.transformer."
T5XXL = "text_encoders.t5xxl.transformer."
FLUX_PREFIXES = {"transformer": TRANSFORMER, "vae": VAE, "clip_l": CLIP_L, "t5xxl": T5XXL}
# A float8 weight widens to bfloat16 exactly (fewer exponent and mantissa bits).
_FP8 = ("torch.float8_e4m3fn", "torch.float8_e5m2", "torch.float8_e4m3fnuz", "torch.float8_e5m2fnuz")


def part(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The tensors of ``state`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def packed_keys(state: Mapping[str, Any]) -> list[str]:
    """Keys whose tensors cannot be used as they are: fp8 storage, tensor subclasses, and the packed
    bytes and quant state of bitsandbytes / GGUF weights (integer tensors; a Flux model has none)."""
    from trainer.hosts.dit_parts import PACKED_MARKERS
    from trainer.hosts.webui_weights import unusable_tensors

    bad = set(unusable_tensors(state))
    for key, value in state.items():
        if any(m in key for m in PACKED_MARKERS) or not getattr(value, "is_floating_point", lambda: False)():
            bad.add(key)
    return sorted(bad)


def only_fp8(state: Mapping[str, Any], keys: list[str]) -> bool:
    """Whether every key of ``keys`` is a plain tensor in a float8 dtype (widened exactly)."""
    return all(type(state[k]).__name__ in ("Tensor", "Parameter") and str(state[k].dtype) in _FP8 for k in keys)


def widen_fp8(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with float8 tensors as bfloat16 copies (exact); the others as they are."""
    import torch

    with torch.inference_mode(False):
        return {k: v.to(torch.bfloat16) if str(v.dtype) in _FP8 else v for k, v in state.items()}


def describe_packed(state: Mapping[str, Any], keys: list[str]) -> str:
    """"e.g. <key>, <dtype or tensor class>" of the first of ``keys``, for a message."""
    key = keys[0]
    value = state[key]
    kind = type(value).__name__ if type(value).__name__ not in ("Tensor", "Parameter") else str(value.dtype)
    return f"e.g. {key}, {kind.replace('torch.', '')}"


def flux_from_loaded(adapter: Any, model: Any, *, vae: Any, config_dir: Any, log: Any, source: str,
                     metadata: Mapping[str, Any]) -> Any:
    """Forge's loaded Flux.1 model (``model``, read through the web-UI ``adapter``) as a bundle. A
    transformer that cannot be trained as held (quantised, or carrying a generation's LoRA) is read from
    its checkpoint file; text encoders held in fp8 are widened exactly; packed (nf4/GGUF) text encoders,
    and text encoders carrying a generation's LoRA, are refused with what to do. ``vae`` replaces the
    host's VAE; ``log`` receives what the user should know."""
    from trainer.hosts.webui_weights import normalise_keys

    merged = adapter.lora_merged_in(model)
    if "clip" in merged:
        raise ModelLoadError("the web UI's Flux text encoders carry a LoRA merged in by the last generation, and "
                             "their files are not known here; generate once without a LoRA, then train")
    state, _ = adapter.weights(model, "flux", config_dir)
    state = normalise_keys(state)  # Forge's textual-inversion wrapper out of CLIP-L's key paths
    for name, prefix in (("CLIP-L", CLIP_L), ("T5", T5XXL)):
        own = part(state, prefix)
        bad = packed_keys(own)
        if bad and not only_fp8(own, bad):
            raise ModelLoadError(
                f"the web UI holds its {name} text encoder quantised ({describe_packed(own, bad)}), which cannot be "
                f"used for training; choose an fp16, bf16 or fp8 {name} file in Forge's VAE / Text Encoder "
                "selection, or train from the transformer file with a Text Encoder folder")
        if bad:
            log(f"The web UI holds its {name} text encoder in fp8; it is widened to bfloat16 (exactly).")
            state.update({prefix + k: v for k, v in widen_fp8(own).items()})
    own = part(state, TRANSFORMER)
    bad = packed_keys(own)
    reason = ("its weights carry a LoRA merged in by the last generation" if "unet" in merged else
              f"its transformer is held quantised ({describe_packed(own, bad)})" if bad else None)
    transformer = None
    if reason is not None:
        info = getattr(model, "sd_checkpoint_info", None)
        transformer = transformer_from_file(Path(getattr(info, "filename", "") or ""), reason, config_dir, log)
        state = {k: v for k, v in state.items() if not k.startswith(TRANSFORMER)}
    return flux_bundle_from_host_state(state, tokenizers=adapter.tokenizers(model, "flux"), transformer=transformer,
                                       vae=vae, config_dir=config_dir, source=source, metadata=metadata)


def transformer_from_file(filename: Path, reason: str, config_dir: Any, log: Any) -> Any:
    """The Flux transformer of the loaded checkpoint's file (an fp8 file widened to bfloat16, exactly)."""
    import torch

    from trainer.hosts.components import ConfigFolders
    from trainer.hosts.dit_parts import load_transformer_file

    if not filename.is_file() or filename.suffix.lower() not in (".safetensors", ".sft"):
        what = "is not available" if not filename.is_file() else f"is a {filename.suffix} file the trainer cannot read"
        raise ModelLoadError(f"the web UI's loaded Flux model cannot be trained as held in memory ({reason}), and its "
                             f"checkpoint file {what}; choose a bf16, fp16 or fp8 Flux .safetensors file as the Model, "
                             "with a Text Encoder folder")
    log(f"Reading the transformer of {filename.name} from disk: the loaded model cannot be used as it is ({reason}).")
    transformer = load_transformer_file(filename, "flux", ConfigFolders("flux", config_dir).json("transformer"), None)
    if any(str(p.dtype) in _FP8 for p in transformer.parameters()):
        transformer.to(torch.bfloat16)  # an fp8 file: every value fits bfloat16 exactly
    return transformer


def flux_bundle_from_host_state(state: Mapping[str, Any], *, tokenizers: list, transformer: Any = None,
                                vae: Any = None, config_dir: Any = None,
                                source: str = "the loaded model", metadata: Mapping[str, Any] | None = None) -> Any:
    """A frozen Flux.1 ModelBundle from the state dict of a web UI's loaded Flux model (``FLUX_PREFIXES``).

    ``tokenizers`` are the host's (CLIP-L, T5): the T5 tokenizer is not shipped with the trainer.
    ``transformer`` / ``vae`` replace the state's (read from a file instead). The tensors are shared
    with the host, inference tensors included (``webui_weights.outside_inference``). Flux.1-schnell is told from dev by its missing
    guidance embedding, as in a file.
    """
    from trainer.bundle import ModelBundle
    from trainer.families import flux_family
    from trainer.hosts.components import ConfigFolders
    from trainer.hosts.dit_parts import SCHNELL_SCHEDULER, flow_scheduler, transformer_from_state
    from trainer.hosts.ldm_convert import build_text_encoder, build_vae
    from trainer.hosts.webui_weights import outside_inference

    if len(tokenizers) != 2 or any(t is None for t in tokenizers):
        raise ModelLoadError("the web UI's Flux model has no CLIP-L and T5 tokenizers to hand over; choose the "
                             "transformer file as the Model and a Text Encoder folder with its tokenizers")
    folders = ConfigFolders("flux", config_dir)
    weights = outside_inference(state)
    if transformer is None:
        transformer = transformer_from_state(part(weights, TRANSFORMER), "flux", folders.json("transformer"),
                                             source=source)
    if vae is None:
        vae = build_vae(part(weights, VAE), folders.json("vae"), source=source)
    clip = build_text_encoder(weights, folders.folder("text_encoder") / "config.json", layout="clip",
                              ldm_prefix=CLIP_L, source=source, component="CLIP-L text encoder")
    t5 = _t5(part(weights, T5XXL), folders.folder("text_encoder_2") / "config.json", source)
    fam = flux_family(bool(transformer.config.guidance_embeds))
    scheduler_config = folders.json("scheduler", "scheduler_config.json")
    if fam.variant == "schnell":
        scheduler_config = {**scheduler_config, **SCHNELL_SCHEDULER}
    info = {"model_name": source, "format": "web UI", "family_source": "web UI model (guidance embedding: "
            f"{'yes' if fam.variant != 'schnell' else 'none, schnell'})", "detected_family": "flux",
            "config_dir": folders.describe()}
    info.update(metadata or {})
    bundle = ModelBundle(family=fam, unet=transformer, vae=vae, text_encoders=[clip, t5], tokenizers=list(tokenizers),
                         noise_scheduler=flow_scheduler(scheduler_config), prediction_type="flow", source=source,
                         metadata=info)
    return bundle.freeze()


def _t5(state: dict, config_file: Any, source: str) -> Any:
    """transformers' T5EncoderModel from T5 weights with its own key names (``shared.weight``,
    ``encoder.block.N...``); the token embedding is tied to ``shared``, as in the model."""
    from trainer.hosts.dit_parts import text_encoder_for
    from trainer.hosts.ldm_convert import _empty_weights, _finish, assign_weights

    with _empty_weights():
        model = text_encoder_for(config_file)
    own = dict(state)
    if "encoder.embed_tokens.weight" not in own and "shared.weight" in own \
            and "encoder.embed_tokens.weight" in model.state_dict():
        own["encoder.embed_tokens.weight"] = own["shared.weight"]
    model = assign_weights(model, own, "T5 text encoder", source)
    model.tie_weights()  # one Parameter for both names again (transformers 5 keeps two modules, tied)
    return _finish(model)
