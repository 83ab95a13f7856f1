"""The AUTOMATIC1111 (1.7+) and Forge web-UIs as a Host: the only module that imports the host's ``modules``.

What each host offers is recorded in HOSTS.md; the facts used here:

- Tab: ``script_callbacks.on_ui_tabs(callback)`` called without ``name=`` (A1111 1.8 lacks it);
  the callback returns ``[(blocks, title, elem_id)]``.
- Flavour: Forge has ``sd_models.forge_model_reload``; checked at run time, not at import.
- Lists: ``sd_models.checkpoint_tiles()`` + ``get_closet_checkpoint_match(title)`` (a
  ``CheckpointInfo`` with ``.filename``/``.title``/``.hash``/``.sha256``), ``sd_vae.vae_dict``
  (name -> path); ``list_models()`` / ``refresh_vae_list()`` rescan.
- Loaded model: ``sd_models.model_data.sd_model`` (``shared.sd_model`` loads lazily on A1111).
  A1111: an LDM ``LatentDiffusion``/``DiffusionEngine``; its ``state_dict()`` has the checkpoint's
  keys plus the hijack's ``.wrapped`` segments; flags ``is_sd1/is_sd2/is_sdxl``, v-prediction
  when ``parameterization == "v"``. Forge: ``forge_objects.{unet,clip,vae}``; UNet LDM keys in
  ``unet.model.diffusion_model``, LDM VAE keys in ``vae.first_stage_model``, transformers CLIPs
  in ``clip.cond_stage_model.{clip_l,clip_h,clip_g}``; every tensor an inference tensor (shared
  through ordinary tensors on the same storage); v-prediction from
  ``unet.model.predictor.prediction_type``. Forge's Flux.1 engine
  (``backend.diffusion_engine.flux.Flux``, no family flags): the BFL transformer in
  ``unet.model.diffusion_model``, ``clip_l`` + ``t5xxl`` (``IntegratedT5``, transformers' T5 names under
  ``transformer.``) with their tokenizers in ``clip.tokenizer``, the LDM-named 16-channel VAE; schnell
  has no ``guidance_in`` weights (tests/data/hosts/forge_flux*.json.gz).
- Offload / restore: A1111 ``unload_model_weights()`` (moves the model to the CPU, 1.6+) and
  ``send_model_to_device(model)``; Forge ``unload_model_weights()`` (= ``unload_all_models``),
  ``soft_empty_cache()``, and ``memory_management.load_models_gpu(patchers)`` to put back what
  was loaded; if the engine itself was replaced, ``forge_loading_parameters`` + ``forge_hash =
  None`` + ``forge_model_reload()``.
- Weights that carry a LoRA merged by the last generation (A1111 modules with
  ``network_current_names``; Forge ``lora_loader.backup``) are first put back with the host's
  own loader (``drop_networks``); where that fails, and for quantised weights, the checkpoint
  file is read instead (Flux: its transformer only, ``webui_dit.py``).
- LoRA folder ``shared.cmd_opts.lora_dir`` (default ``<models_path>/Lora``); the host's list is
  refreshed with ``networks.list_available_networks()`` (the built-in Lora extension's module).
- Progress / interrupt: ``shared.state.begin(job=)``/``end()``, ``sampling_step(s)``,
  ``textinfo``; ``state.interrupted`` / ``stopping_generation`` stop the run.
- GPU: ``call_queue.queue_lock`` (a FIFO lock, not re-entrant) is held from ``load`` to
  ``restore``, so generation and training never overlap. Do not call ``load``/``run`` from a
  handler wrapped in ``wrap_gradio_gpu_call`` (it holds the same lock).

Prompts are encoded by the trainer's own text encoders (built from the host's weights), not by
the host's conditioning code, for now. Generating with the host's own txt2img (the check after a
save, the prompt preview) is in ``webui_txt2img.py``.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any, Callable

from trainer.hosts.base import ModelLoadError

TAB_TITLE = "TrainTrain"
TAB_ID = "traintrain_tab"


def register_tab(build: Callable[[], Any]) -> None:
    """Register the tab: ``build()`` returns the gr.Blocks, called when the host builds its UI."""
    from modules import script_callbacks

    def on_ui_tabs():
        return [(build(), TAB_TITLE, TAB_ID)]

    script_callbacks.on_ui_tabs(on_ui_tabs)


def is_forge() -> bool:
    """True on Forge (its ``sd_models`` has ``forge_model_reload``), False on AUTOMATIC1111."""
    from modules import sd_models

    return hasattr(sd_models, "forge_model_reload")


def _device_of(model: Any) -> str:
    device = getattr(model, "device", None)
    if device is None:
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            return "unknown"
    return str(getattr(device, "type", device))


def adapter() -> "A1111Adapter | ForgeAdapter":
    """The adapter for the host this process runs in (decided now, not at import)."""
    return ForgeAdapter() if is_forge() else A1111Adapter()


class _HostCalls:
    """Calls both hosts offer with the same names (HOSTS.md §1 and §3)."""

    def state(self) -> Any:
        from modules import shared

        return shared.state

    def queue_lock(self) -> Any:
        from modules import call_queue

        return call_queue.queue_lock

    def lora_dir(self) -> Path:
        from modules import paths, shared

        configured = getattr(shared.cmd_opts, "lora_dir", None)
        return Path(configured) if configured else Path(paths.models_path) / "Lora"

    def checkpoint_titles(self) -> list[str]:
        from modules import sd_models

        return list(sd_models.checkpoint_tiles())

    def find_checkpoint(self, name: str) -> Any:
        """The host's CheckpointInfo for a title/name/hash, or None."""
        from modules import sd_models

        return sd_models.get_closet_checkpoint_match(name)

    def vae_files(self) -> dict[str, str]:
        from modules import sd_vae

        return dict(sd_vae.vae_dict)

    def rescan(self) -> None:
        from modules import sd_models, sd_vae

        sd_models.list_models()
        sd_vae.refresh_vae_list()

    def text_options(self) -> Any:
        """How the host reads prompts now (its Emphasis and Clip skip settings), so that captions
        and prompts train as they will be generated. AUTOMATIC1111 uses the penultimate layer
        on SDXL whatever Clip skip says; Forge applies it there too."""
        from modules import shared

        from trainer.bundle import EMPHASIS_MODES, TextOptions

        emphasis = str(getattr(shared.opts, "emphasis", "Original"))
        try:
            skip = max(1, int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1)))
        except (TypeError, ValueError):
            skip = 1
        return TextOptions(emphasis=emphasis if emphasis in EMPHASIS_MODES else "Original", clip_skip=skip,
                           clip_skip_sdxl=self.CLIP_SKIP_SDXL,
                           embeddings_dir=str(getattr(shared.cmd_opts, "embeddings_dir", "") or ""))

    def refresh_loras(self) -> bool:
        """Re-read the host's LoRA list (the built-in Lora extension's module); False if absent."""
        networks = sys.modules.get("networks")
        refresh = getattr(networks, "list_available_networks", None)
        if refresh is None:
            return False
        refresh()
        return True


class A1111Adapter(_HostCalls):
    """AUTOMATIC1111 1.7-1.10: LDM model objects, moved to the CPU and back."""

    CLIP_SKIP_SDXL = False

    name = "AUTOMATIC1111"

    def loaded_model(self, load: bool) -> Any:
        from modules import sd_models, shared

        model = sd_models.model_data.sd_model
        return shared.sd_model if model is None and load else model  # the property loads lazily

    def family(self, model: Any) -> str:
        for flag in ("is_sd3", "is_ssd"):
            if getattr(model, flag, False):
                raise ModelLoadError(f"the loaded model is {flag[3:].upper()}, which cannot be trained "
                                     "(supported: SD1.x, SD2.x, SDXL base); choose another checkpoint")
        if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
            return "sdxl"
        return "sd2" if getattr(model, "is_sd2", False) else "sd1"

    def prediction(self, model: Any) -> str:
        return "v_prediction" if getattr(model, "parameterization", "eps") == "v" else "epsilon"

    def lora_merged(self, model: Any) -> bool:
        if any(getattr(m, "network_current_names", ()) for m in model.modules()):
            return True
        # reForge (and Forge before 2.0) keep A1111's model but merge a prompt's LoRA through their
        # ldm_patched patchers, which keep the original weights in ``backup`` until unpatched.
        objects = getattr(model, "forge_objects", None)
        clip = getattr(objects, "clip", None)
        return any(getattr(patcher, "backup", None)
                   for patcher in (getattr(objects, "unet", None), getattr(clip, "patcher", None)))

    def weights(self, model: Any, family: str, config_dir: Any) -> tuple[dict, dict]:
        """(state dict, text-encoder layouts) of the loaded model; tensors are shared.

        Keys still carry the hijack's wrapper segments; the session removes them for every host.
        """
        # SDXL: the hijack also registers the conditioner as cond_stage_model; take it once.
        text = "conditioner." if family == "sdxl" else "cond_stage_model."
        prefixes = ("model.diffusion_model.", "first_stage_model.", text)
        state = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
        return state, {}

    def remember(self, model: Any) -> dict:
        return {"model": model, "device": _device_of(model) if model is not None else None,
                "lowvram": bool(getattr(model, "lowvram", False))}

    def offload(self, saved: dict) -> None:
        from modules import sd_models

        if saved["model"] is not None:
            sd_models.unload_model_weights(saved["model"])

    def restore(self, saved: dict) -> None:
        from modules import devices, sd_models

        model = saved["model"]
        if model is None:
            return
        if sd_models.model_data.sd_model is not model:
            sd_models.reload_model_weights(info=model.sd_checkpoint_info)
        elif saved["device"] != "cpu" or saved["lowvram"]:
            send = getattr(sd_models, "send_model_to_device", None)
            send(model) if send is not None else model.to(devices.device)


class ForgeAdapter(_HostCalls):
    """Forge (gradio 4): diffusion engines with patchers; memory handled by backend.memory_management."""

    CLIP_SKIP_SDXL = True

    name = "Forge"
    _CLIP_SLOTS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}

    def loaded_model(self, load: bool) -> Any:
        from modules import sd_models

        model = sd_models.model_data.sd_model
        if not hasattr(model, "forge_objects") and load:
            if not (sd_models.model_data.forge_loading_parameters or {}).get("checkpoint_info"):
                raise ModelLoadError("the web UI has no model loaded; choose a checkpoint as the model")
            model, _ = sd_models.forge_model_reload()
        return model if hasattr(model, "forge_objects") else None

    def family(self, model: Any) -> str:
        for flag, name in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
            if getattr(model, flag, False):
                return name
        kind = type(model).__name__
        if kind == "Flux":  # backend.diffusion_engine.flux.Flux: Flux.1-dev and -schnell (no guidance_in)
            return "flux"
        if any(word in kind.lower() for word in ("zimage", "z_image", "lumina")):
            raise ModelLoadError(
                f"the loaded model is a {kind}, which cannot be handed over for training (Forge has no Z-Image; a "
                "Forge Neo fork's is not read yet); choose its transformer file as the Model and the folder of its "
                "text encoder as the Text Encoder (it is then read from disk), or train it from the standalone page "
                "or the CLI")
        raise ModelLoadError(f"the loaded model is a {kind}, which cannot be trained "
                             "(supported: SD1.x, SD2.x, SDXL base, Flux.1); choose another checkpoint")

    def prediction(self, model: Any) -> str:
        predictor = getattr(model.forge_objects.unet.model, "predictor", None)
        return "v_prediction" if getattr(predictor, "prediction_type", "") == "v_prediction" else "epsilon"

    def lora_merged(self, model: Any) -> bool:
        return bool(self.lora_merged_in(model))

    def lora_merged_in(self, model: Any) -> list[str]:
        """The parts ("unet", "clip") whose weights carry a LoRA merged in by the last generation."""
        objects = model.forge_objects
        found = []
        for name, patcher in (("unet", objects.unet), ("clip", getattr(objects.clip, "patcher", None))):
            loader = getattr(patcher, "lora_loader", None)
            if loader is not None and (getattr(loader, "backup", None) or getattr(loader, "online_backup", None)):
                found.append(name)
        return found

    def weights(self, model: Any, family: str, config_dir: Any) -> tuple[dict, dict]:
        """(state dict, text-encoder layouts) of the loaded model: inference tensors, shared as
        ordinary tensors on the same storage when the bundle is built."""
        from trainer.hosts.components import TEXT_ENCODERS
        from trainer.hosts.webui_weights import hf_text_encoder_state, prefixed, text_encoder_has_projection

        objects = model.forge_objects
        if family == "flux":
            return self._flux_weights(objects), {}
        state = prefixed("model.diffusion_model.", objects.unet.model.diffusion_model.state_dict())
        state.update(prefixed("first_stage_model.", objects.vae.first_stage_model.state_dict()))
        layouts = {}
        for index, (slot, key) in enumerate(zip(TEXT_ENCODERS[family], self._CLIP_SLOTS[family])):
            encoder = getattr(objects.clip.cond_stage_model, key, None)
            if encoder is None:
                raise ModelLoadError(f"the loaded {family} model has no {key} text encoder in the web UI")
            hf = hf_text_encoder_state(encoder.state_dict(),
                                       with_projection=text_encoder_has_projection(family, index, config_dir))
            state.update(prefixed(slot.ldm_prefix, hf))
            layouts[index] = "clip"  # Forge holds OpenCLIP encoders in transformers layout
        return state, layouts

    @staticmethod
    def _flux_weights(objects: Any) -> dict:
        """Forge's Flux engine as its all-in-one checkpoint keys it (``webui_dit.FLUX_PREFIXES``): the
        transformer in BFL names, the VAE in LDM names, CLIP-L and T5 in transformers' names."""
        from trainer.hosts.webui_dit import CLIP_L, T5XXL, TRANSFORMER, VAE, part
        from trainer.hosts.webui_weights import hf_text_encoder_state, prefixed

        state = prefixed(TRANSFORMER, objects.unet.model.diffusion_model.state_dict())
        state.update(prefixed(VAE, objects.vae.first_stage_model.state_dict()))
        encoders = objects.clip.cond_stage_model
        for key, prefix in (("clip_l", CLIP_L), ("t5xxl", T5XXL)):
            encoder = getattr(encoders, key, None)
            if encoder is None:
                raise ModelLoadError(f"the loaded Flux model has no {key} text encoder in the web UI; choose one in "
                                     "its VAE / Text Encoder selection")
            if key == "clip_l":
                state.update(prefixed(prefix, hf_text_encoder_state(encoder.state_dict(), with_projection=False)))
            else:  # IntegratedT5: transformers' T5 names under transformer., beside a logit_scale
                state.update(prefixed(prefix, part(encoder.state_dict(), "transformer.")))
        return state

    def tokenizers(self, model: Any, family: str) -> list:
        """The tokenizers the host holds for ``family``'s text encoders (Flux: CLIP-L, T5), None where absent."""
        holder = getattr(model.forge_objects.clip, "tokenizer", None)
        return [getattr(holder, key, None) for key in ("clip_l", "t5xxl")]

    def remember(self, model: Any) -> dict:
        from backend import memory_management
        from modules import sd_models

        data = sd_models.model_data
        return {"model": model, "hash": data.forge_hash, "parameters": dict(data.forge_loading_parameters or {}),
                "on_gpu": [loaded.model for loaded in memory_management.current_loaded_models]}

    def offload(self, saved: dict) -> None:
        from backend import memory_management
        from modules import sd_models

        sd_models.unload_model_weights()
        gc.collect()
        memory_management.soft_empty_cache()

    def restore(self, saved: dict) -> None:
        from backend import memory_management
        from modules import sd_models

        data = sd_models.model_data
        if saved["model"] is not None and data.sd_model is not saved["model"]:
            data.forge_loading_parameters = saved["parameters"]
            data.forge_hash = None
            sd_models.forge_model_reload()
        elif saved["on_gpu"]:
            memory_management.load_models_gpu(saved["on_gpu"])


__all__ = ["A1111Adapter", "ForgeAdapter", "adapter", "register_tab", "is_forge", "TAB_TITLE", "TAB_ID"]
