"""A web-UI's loaded weights as a ModelBundle (no web-UI import here: plain state dicts in, bundle out).

The web-UI adapters (``webui.py``) collect the weights the host holds into one LDM-keyed
state dict, the key layout of a single-file checkpoint (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.N.*``). This module
turns that dict into diffusers / transformers modules with the same converters the file
loader uses (``ldm_convert.py``: diffusers' single-file utilities, configs shipped in
``trainer/assets``), so nothing about key mapping is written twice.

Tensors are *shared* with the host: the modules are built with empty weights and the host's
tensors are assigned, not copied (ENV-NOTES.md §6), so a CPU-only host does not hold the model
twice during a run. Forge loads under ``torch.inference_mode()``, and autograd cannot save an
inference tensor for the backward; such a tensor is shared through an ordinary tensor made on
the same storage (``outside_inference``), not copied. The trainer never writes into base
weights (low-precision storage and the networks put new tensors beside them), so sharing
leaves the host's model bit-identical; the web-UI tests check that after every run.

The host's text stack is not used to encode prompts: the bundle carries transformers text
encoders built from the host's text-encoder weights, and the trainer encodes with those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.hosts.base import ModelLoadError

# Dtypes the converters can take as they are; anything else (fp8 storage, bnb/GGUF packing)
# means the host holds a quantised model whose weights cannot be trained as they are.
_PLAIN_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


# Wrapper segments the hosts put into module paths of a loaded model (HOSTS.md §2 and §4):
# - AUTOMATIC1111's hijack: ``cond_stage_model.wrapped.transformer`` (FrozenCLIPEmbedderWithCustomWords
#   and its OpenCLIP / SDXL siblings) and ``token_embedding.wrapped`` (EmbeddingsWithFixes);
# - Forge's text-processing engine: ``token_embedding.wrapped`` (CLIPEmbeddingForTextualInversion),
#   which also registers the same weight as its own ``token_embedding.weight``.
# tests/data/hosts holds the key sets recorded from the real hosts that these rules are checked against.
WRAPPER_SEGMENTS = (".wrapped",)


def normalise_keys(state: Mapping[str, Any], drop: tuple[str, ...] = WRAPPER_SEGMENTS) -> dict[str, Any]:
    """The checkpoint's own key names for a loaded model's state dict: wrapper segments removed.

    Two keys that name the same place once unwrapped must hold the same tensor (Forge's
    textual-inversion wrapper registers the embedding twice); anything else is a wrapper this
    trainer does not know, reported instead of guessed at.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = key
        for segment in drop:
            name = name.replace(segment + ".", ".")
        if name in out and not _same_tensor(out[name], value):
            raise ModelLoadError(
                f"the web UI's model holds two different tensors for {name} ({key} and another); this host "
                "wraps its modules in a way TrainTrain does not know yet; choose the checkpoint file as the model")
        out[name] = value
    return out


def _same_tensor(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.device.type == "meta":
            return True  # no storage to compare; shapes and dtypes agree
        return a.data_ptr() == b.data_ptr()
    except AttributeError:
        return False


def prefixed(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with ``prefix`` in front of every key."""
    return {prefix + key: value for key, value in state.items()}


def unusable_tensors(state: Mapping[str, Any]) -> list[str]:
    """Keys whose tensors are quantised or packed (fp8 storage, bnb / GGUF tensor subclasses)."""
    bad = []
    for key, value in state.items():
        if type(value).__name__ not in ("Tensor", "Parameter"):
            bad.append(key)
        elif value.is_floating_point() and str(value.dtype) not in _PLAIN_DTYPES:
            bad.append(key)
    return bad


def outside_inference(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every inference tensor replaced by an ordinary tensor on the same storage.

    An inference tensor has no version counter, so autograd refuses to save it for the backward
    (a frozen layer's weight is needed for its input's gradient). An ordinary tensor ``set_`` on
    the same storage is allowed there and costs no memory: on a CPU-only host, copying instead
    would put a second SDXL U-Net (10 GB in fp32) beside the host's. Where this torch refuses
    the aliasing, the tensor is copied.
    """
    import torch

    out: dict[str, Any] = {}
    with torch.inference_mode(False):
        for key, value in state.items():
            if not getattr(value, "is_inference", lambda: False)():
                out[key] = value
                continue
            out[key] = _ordinary_view(value)
    return out


def _ordinary_view(tensor: Any) -> Any:
    """An ordinary tensor sharing ``tensor``'s storage, shape and strides (a copy if refused)."""
    import torch

    try:
        view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
        if not view.is_inference() and view.data_ptr() == tensor.data_ptr():
            return view
    except (RuntimeError, TypeError, AttributeError):
        pass
    return tensor.clone()


def hf_text_encoder_state(state: Mapping[str, Any], *, with_projection: bool) -> dict[str, Any]:
    """A transformers-layout CLIP state dict with the projection kept only if the model has one.

    Forge holds every CLIP as ``IntegratedCLIP``: ``transformer.*`` is a transformers
    ``CLIPTextModel`` (plus an added ``text_projection``), next to a ``logit_scale``.
    """
    out = {}
    for key, value in state.items():
        if not key.startswith("transformer."):
            continue  # logit_scale and other siblings of the text model
        name = key[len("transformer."):]
        if name.startswith("text_projection.") and not with_projection:
            continue
        if name.endswith("position_ids"):
            continue
        out[name] = value
    return out


def bundle_from_host_state(state: Mapping[str, Any], *, family: str, host_prediction: str | None,
                           v_pred_option: bool | None = None, config_dir: Any = None,
                           te_layouts: Mapping[int, str] | None = None, vae: Any = None,
                           source: str = "the loaded model", metadata: Mapping[str, Any] | None = None) -> Any:
    """A frozen ModelBundle from an LDM-keyed state dict of a web-UI's loaded model.

    ``family`` is "sd1", "sd2" or "sdxl" (the host's model flags say which). ``host_prediction``
    is the prediction type the host uses ("epsilon" / "v_prediction", None if unknown);
    ``v_pred_option`` True forces v-prediction (the ``model_v_pred`` tick). ``te_layouts`` maps a
    text-encoder index to "clip" where the host holds it in transformers layout rather than the
    checkpoint's (Forge converts OpenCLIP encoders at load). ``vae`` replaces the state's VAE.
    The tensors are shared with the host, inference tensors included (``outside_inference``).
    """
    from trainer.bundle import ModelBundle
    from trainer.families import get_family
    from trainer.hosts.components import (
        TEXT_ENCODERS, ConfigFolders, load_tokenizer, noise_scheduler,
    )
    from trainer.hosts.ldm_convert import build_text_encoder, build_unet, build_vae

    fam = get_family(family)
    folders = ConfigFolders(family, config_dir)
    weights = outside_inference(state)
    unet = build_unet(weights, folders.json("unet"), source=source)
    if vae is None:
        vae = build_vae(weights, folders.json("vae"), source=source)
    encoders, tokenizers = [], []
    for index, slot in enumerate(TEXT_ENCODERS[family]):
        layout = (te_layouts or {}).get(index, slot.layout)
        encoders.append(build_text_encoder(
            weights, folders.folder(slot.subfolder) / "config.json", layout=layout, ldm_prefix=slot.ldm_prefix,
            source=source, component=slot.subfolder.replace("_", " ")))
        tokenizers.append(load_tokenizer(folders.folder(slot.tokenizer_subfolder), slot.pad_token))
    prediction, why = _prediction(v_pred_option, host_prediction, fam.default_prediction)
    info = {"model_name": source, "format": "web UI", "family_source": "web UI model flags",
            "detected_family": family, "v_pred_source": why, "ztsnr": False, "config_dir": folders.describe()}
    info.update(metadata or {})
    bundle = ModelBundle(
        family=fam, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
        noise_scheduler=noise_scheduler(folders.json("scheduler", "scheduler_config.json"), prediction),
        prediction_type=prediction, source=source, metadata=info,
    )
    return bundle.freeze()


def _prediction(option: bool | None, host: str | None, default: str) -> tuple[str, str]:
    """(prediction type, where it came from): the tick first, then the host's model, then the family."""
    if option:
        return "v_prediction", "option"
    if host in ("epsilon", "v_prediction"):
        return host, "web UI model"
    return default, "default"


def text_encoder_has_projection(family: str, index: int, config_dir: Any = None) -> bool:
    """True when the family's text encoder ``index`` is a CLIPTextModelWithProjection."""
    from trainer.hosts.components import TEXT_ENCODERS, ConfigFolders

    slot = TEXT_ENCODERS[family][index]
    config = ConfigFolders(family, config_dir).json(slot.subfolder)
    return "CLIPTextModelWithProjection" in list(config.get("architectures") or [])


def require_plain(state: Mapping[str, Any], what: str) -> None:
    """ModelLoadError naming the first quantised tensor, if any."""
    bad = unusable_tensors(state)
    if bad:
        raise ModelLoadError(
            f"{what} holds quantised weights (e.g. {bad[0]}), which cannot be trained; load an fp16/fp32 "
            "version of the checkpoint in the web UI, or choose the checkpoint file as the model")
