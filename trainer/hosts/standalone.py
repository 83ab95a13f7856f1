"""Standalone host: Stable Diffusion, Flux.1 and Z-Image models read from disk, fully offline.

``load_model`` accepts what users download:

- a single-file checkpoint with LDM keys (``.safetensors``/``.sft``, or ``.ckpt``/``.pt``/``.pth``/
  ``.bin`` read with ``torch.load(weights_only=True)``); the family (SD1.x, SD2.x, SDXL base) is
  detected from the keys and the weights are converted by diffusers' single-file converters
  with the config folders shipped in ``trainer/assets`` (see ``ldm_convert.py``);
- a diffusers model folder (``model_index.json``), loaded with ``from_pretrained(local_files_only=True)``;
- a Flux / Z-Image transformer file (the usual download) with a Text Encoder folder (``te``) and a VAE
  (``hosts/dit_parts.py``).

No hub is ever contacted: configs come from the package (or ``config_dir``), and a missing
config is an error. Everything is loaded on CPU unless ``device`` says otherwise; the caller moves it.

``StandaloneHost`` implements the :class:`~trainer.hosts.base.Host` protocol around it
(SPEC.md §1.4: models under ``<models-dir>/StableDiffusion`` or ``Stable-Diffusion``, VAEs under
``VAE``, Flux / Z-Image text-encoder folders under ``text_encoder`` or ``TextEncoder``, output in
``./output``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.bundle import ModelBundle
from trainer.families import FAMILIES, get_family
from trainer.hosts.base import ModelLoadError, config_value
from trainer.hosts.checkpoint_file import (
    CHECKPOINT_SUFFIXES, UNET_PREFIX, V_PRED_KEY, ZTSNR_KEY, CheckpointFile, describe_non_model, detect_family,
    is_vae_only, require_unet,
)
from trainer.hosts.components import (
    TEXT_ENCODERS, ConfigFolders, decide_prediction, load_tokenizer, noise_scheduler, read_json, yaml_says_v,
)
from trainer.hosts.ldm_convert import build_text_encoder, build_unet, build_vae, text_encoder_class

__all__ = ["load_model", "load_vae", "StandaloneHost", "ModelLoadError"]

_UNSUPPORTED_PIPELINES = {
    "StableDiffusion3Pipeline": "SD3", "StableDiffusionXLImg2ImgPipeline": "SDXL refiner",
}


def load_model(path: str | Path, *, vae_path: str | Path | None = None, v_pred: bool | None = None,
               family: str | None = None, config_dir: str | Path | None = None, te_path: str | Path | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a checkpoint file or diffusers folder as a frozen ModelBundle.

    ``vae_path`` replaces the model's VAE (LDM or diffusers VAE file, or a diffusers VAE folder).
    ``v_pred``: True/False force the prediction type; None detects it (``v_pred`` key, a
    ``parameterization: "v"`` yaml next to the file, a folder's scheduler config; else epsilon).
    ``family`` ("sd1", "sd2", "sdxl", "flux", "zimage") overrides detection; ``config_dir`` is a
    diffusers-format folder of configs used instead of the shipped ones. ``te_path`` (the Text Encoder
    selection) is the folder of a single-file Flux / Z-Image transformer's text encoder(s) and
    tokenizer(s) (see ``dit_parts.load_text_encoders``). Raises ModelLoadError.
    """
    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"model file not found: {source}")
    if family is not None and family not in FAMILIES:
        raise ModelLoadError(f"family must be one of {', '.join(FAMILIES)} (or None to detect), not {family!r}")
    if vae_path is not None and str(vae_path) in ("", "None"):
        vae_path = None
    if source.is_dir():
        bundle = _load_diffusers_folder(source, v_pred=v_pred, family=family, dtype=dtype)
    else:
        bundle = _load_single_file(source, v_pred=v_pred, family=family, config_dir=config_dir, dtype=dtype,
                                   own_vae=not vae_path, te_path=te_path)
    if vae_path:
        # A diffusers folder describes its own VAE; single files use config_dir or the shipped configs.
        folders = ConfigFolders(bundle.family.name, config_dir or (source if source.is_dir() else None))
        bundle.vae = load_vae(vae_path, vae_config=folders.json("vae"), dtype=dtype)
        bundle.metadata["vae"] = str(vae_path)
    target = torch.device(device)
    if target.type != "cpu":
        for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
            module.to(target)
    return bundle.freeze()


def _load_single_file(path: Path, *, v_pred: bool | None, family: str | None, config_dir: str | Path | None,
                      dtype: torch.dtype, own_vae: bool, te_path: str | Path | None = None) -> ModelBundle:
    ckpt = CheckpointFile(path, "model")
    name = family or detect_family(ckpt)
    fam = get_family(name)
    if fam.is_dit:
        return _load_transformer_file(path, fam, te_path=te_path, config_dir=config_dir, dtype=dtype, own_vae=own_vae)
    if family:  # the user's word wins over the keys (odd merges); the file must still be a model
        require_unet(ckpt)
    folders = ConfigFolders(name, config_dir)
    source = path.name
    if own_vae and not any(k.startswith("first_stage_model.") for k in ckpt.shapes):
        raise ModelLoadError(f"{source} contains no VAE weights (first_stage_model.*); choose a VAE file as well")
    state = ckpt.state_dict(dtype)  # cast while reading: the file's copy never sits beside the cast one
    unet = build_unet(state, folders.json("unet"), dtype=dtype, source=source)
    _drop(state, UNET_PREFIX)  # the UNet holds its own (cast) tensors now; free the file's copy early
    # With a separate VAE the checkpoint's own VAE is not built at all; load_model sets it.
    vae = build_vae(state, folders.json("vae"), dtype=dtype, source=source) if own_vae else None
    encoders, tokenizers = [], []
    for slot in TEXT_ENCODERS[name]:
        encoders.append(build_text_encoder(
            state, folders.folder(slot.subfolder) / "config.json", layout=slot.layout, ldm_prefix=slot.ldm_prefix,
            dtype=dtype, source=source, component=slot.subfolder.replace("_", " ")))
        tokenizers.append(load_tokenizer(folders.folder(slot.tokenizer_subfolder), slot.pad_token))
    ckpt.release()
    prediction, why = decide_prediction(
        v_pred, has_v_key=V_PRED_KEY in ckpt.shapes, yaml_v=yaml_says_v(path), default=fam.default_prediction)
    ztsnr = ZTSNR_KEY in ckpt.shapes
    bundle = ModelBundle(
        family=fam, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
        noise_scheduler=noise_scheduler(folders.json("scheduler", "scheduler_config.json"), prediction, ztsnr),
        prediction_type=prediction, source=str(path),
        metadata={
            "model_name": path.stem, "format": "safetensors" if ckpt.is_safetensors else "torch",
            "family_source": "option" if family else "keys",
            "v_pred_source": why, "ztsnr": ztsnr, "config_dir": folders.describe(),
        },
    )
    return bundle


def _load_transformer_file(path: Path, fam, *, te_path, config_dir, dtype, own_vae: bool) -> ModelBundle:
    """A Flux / Z-Image transformer file with the text encoder(s) of ``te_path``; the VAE is the
    chosen VAE file (load_model sets it) or the ``vae/`` folder next to the text encoders."""
    from diffusers import AutoencoderKL

    from trainer.families import flux_family
    from trainer.hosts.dit_parts import (
        SCHNELL_SCHEDULER, check_text_encoder_path, flow_scheduler, load_text_encoders, load_transformer_file,
    )

    check_text_encoder_path(te_path, fam.name)  # before the transformer is read
    folders = ConfigFolders(fam.name, config_dir)
    transformer = load_transformer_file(path, fam.name, folders.json("transformer"), dtype)
    encoders, tokenizers = load_text_encoders(te_path, fam.name, dtype)
    vae = None
    if own_vae:
        vae_folder = Path(te_path) / "vae"
        if not (vae_folder / "config.json").is_file():
            raise ModelLoadError(f"{path.name} holds only the {fam.title} transformer; choose a VAE file as well "
                                 f"(the 16-channel Flux VAE, ae.safetensors) or put a diffusers vae/ folder in {te_path}")
        vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=dtype, local_files_only=True)
    scheduler_config = folders.json("scheduler", "scheduler_config.json")
    if fam.name == "flux":
        fam = flux_family(bool(transformer.config.guidance_embeds))  # schnell: no guidance_in weights
        if fam.variant == "schnell":
            scheduler_config = {**scheduler_config, **SCHNELL_SCHEDULER}
    scheduler = flow_scheduler(scheduler_config)
    return ModelBundle(family=fam, unet=transformer, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                       noise_scheduler=scheduler, prediction_type="flow", source=path.name,
                       metadata={"family_source": "keys", "te": str(te_path), "config_dir": folders.describe()})


def family_of(path: Path) -> str | None:
    """The family of a checkpoint file (its key names) or diffusers folder (model_index.json), without
    loading weights; None when neither tells it."""
    path = Path(path)
    try:
        if path.is_dir():
            return _folder_family(path, read_json(path / "model_index.json"))
        if path.is_file():
            return detect_family(CheckpointFile(path, "model"))
    except (ModelLoadError, OSError, ValueError):
        return None
    return None


def _drop(state: dict, prefix: str) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _folder_family(folder: Path, index: dict) -> str:
    from trainer.hosts.dit_parts import PIPELINES

    pipeline = str(index.get("_class_name", ""))
    if pipeline in PIPELINES:
        return PIPELINES[pipeline]
    if pipeline in _UNSUPPORTED_PIPELINES or "text_encoder" not in index:
        what = _UNSUPPORTED_PIPELINES.get(pipeline, pipeline or "this pipeline")
        raise ModelLoadError(f"{folder} is a {what} model, which is not supported (supported: SD1.x, SD2.x, SDXL base)")
    if pipeline == "StableDiffusionXLPipeline":
        return "sdxl"
    if pipeline != "StableDiffusionPipeline":
        raise ModelLoadError(
            f"{folder} holds a {pipeline} (model_index.json); only StableDiffusionPipeline and "
            "StableDiffusionXLPipeline folders can be trained")
    unet = read_json(folder / "unet" / "config.json")
    width = unet.get("cross_attention_dim")
    if width in (768, 1024):
        return "sd1" if width == 768 else "sd2"
    te = read_json(folder / "text_encoder" / "config.json")
    return "sd2" if te.get("hidden_act") == "gelu" else "sd1"


def _load_diffusers_folder(folder: Path, *, v_pred: bool | None, family: str | None,
                           dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is a folder without model_index.json; give a checkpoint file or a diffusers model folder")
    detected = _folder_family(folder, read_json(folder / "model_index.json"))
    name = family or detected
    fam = get_family(name)
    if fam.is_dit:
        from trainer.hosts.dit_parts import load_dit_folder

        parts = load_dit_folder(folder, name, dtype)
        if fam.name == "flux":  # the folder's own scheduler config already has schnell's fixed shift
            from trainer.families import flux_family

            fam = flux_family(bool(parts["unet"].config.guidance_embeds))
        return ModelBundle(family=fam, prediction_type="flow", source=str(folder), **parts,
                           metadata={"family_source": "option" if family else "model_index", "config_dir": str(folder)})
    local = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **local)
        encoders, tokenizers = [], []
        for slot in TEXT_ENCODERS[name]:
            where = str(folder / slot.subfolder)
            cls = text_encoder_class(CLIPTextConfig.from_pretrained(where, **local))
            encoders.append(cls.from_pretrained(where, **local).to(dtype))
            tokenizers.append(load_tokenizer(folder / slot.tokenizer_subfolder, slot.pad_token))
    except ModelLoadError:
        raise
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"diffusers folder {folder} could not be loaded: {str(error).splitlines()[0]}") from error
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    prediction, why = decide_prediction(v_pred, folder_prediction=scheduler_config.get("prediction_type"),
                                        default=fam.default_prediction)
    zero_snr = bool(scheduler_config.get("rescale_betas_zero_snr", False))
    return ModelBundle(
        family=fam, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
        noise_scheduler=noise_scheduler(scheduler_config, prediction, zero_snr), prediction_type=prediction,
        source=str(folder),
        metadata={"model_name": folder.name, "format": "diffusers",
                  "family_source": "option" if family else "model_index", "v_pred_source": why, "ztsnr": zero_snr, "config_dir": str(folder)},
    )


def load_vae(path: str | Path, *, vae_config: dict, dtype: torch.dtype = torch.float32) -> Any:
    """An AutoencoderKL from a VAE file (LDM or diffusers keys, or a full checkpoint's VAE) or folder.

    ``vae_config`` (the family's ``vae/config.json``) describes the architecture of single files.
    """
    from diffusers import AutoencoderKL

    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"VAE file not found: {source}")
    if source.is_dir():
        sub = None if (source / "config.json").is_file() else "vae"
        if sub and not (source / sub / "config.json").is_file():
            raise ModelLoadError(f"VAE folder {source} has no config.json (nor vae/config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder=sub, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"VAE folder {source} could not be loaded: {str(error).splitlines()[0]}") from error
        return vae.eval()
    ckpt = CheckpointFile(source, "VAE")
    full_model_vae = any(k.startswith("first_stage_model.") for k in ckpt.shapes)
    if not (is_vae_only(ckpt) or full_model_vae):
        raise ModelLoadError(f"{source.name} cannot be used as the VAE: {describe_non_model(ckpt)}")
    vae = build_vae(ckpt.state_dict(), vae_config, dtype=dtype, source=source.name)
    ckpt.release()
    return vae


class StandaloneHost:
    """The Host protocol for the standalone program: models from folders on disk.

    ``models_dir`` is the root of SPEC.md §1.4 (checkpoints under ``StableDiffusion`` or
    ``Stable-Diffusion``, VAEs under ``VAE``); ``ckpt_dir`` / ``vae_dir`` override it.
    ``output_dir`` (default ``./output``) is where networks are saved. Models load to
    ``device``/``dtype`` (default CPU, fp32). It has no progress display or Interrupt of its
    own: the caller's ``TrainControl`` carries those.
    """

    def __init__(self, models_dir: str | Path | None = None, *, ckpt_dir: str | Path | None = None,
                 vae_dir: str | Path | None = None, output_dir: str | Path | None = None,
                 config_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        root = Path(models_dir) if models_dir is not None else None
        self.ckpt_dirs = [Path(ckpt_dir)] if ckpt_dir else (
            [root / "StableDiffusion", root / "Stable-Diffusion"] if root else [])
        self.vae_dirs = [Path(vae_dir)] if vae_dir else ([root / "VAE"] if root else [])
        self.te_dirs = [root / "text_encoder", root / "TextEncoder"] if root else []
        self.output_dir = Path(output_dir) if output_dir is not None else Path.cwd() / "output"
        self.config_dir = config_dir
        self.device, self.dtype = device, dtype

    def check(self, config: Any) -> None:
        """ModelLoadError when the model or VAE ``config`` names cannot be found (nothing is read)."""
        self._paths(config)

    def load(self, config: Any) -> ModelBundle:
        """Load ``config.model`` (+ ``config.vae``); a ticked ``model_v_pred`` forces v-prediction."""
        model_path, vae_path = self._paths(config)
        ticked = bool(config_value(config, "model_v_pred", False))
        te = config_value(config, "te")
        te_path = self.resolve(te, self.te_dirs, "Text Encoder") if te and str(te) != "None" else None
        return load_model(model_path, vae_path=vae_path, v_pred=True if ticked else None, te_path=te_path,
                          config_dir=self.config_dir, device=self.device, dtype=self.dtype)

    def _paths(self, config: Any) -> tuple[Path, Path | None]:
        model = config_value(config, "model")
        if not model or str(model) == "None":
            raise ModelLoadError("No Model Selected. Choose a checkpoint file or a diffusers folder as the model.")
        vae = config_value(config, "vae")
        vae_path = self.resolve(vae, self.vae_dirs, "VAE") if vae and str(vae) != "None" else None
        return self.resolve(model, self.ckpt_dirs, "model"), vae_path

    @staticmethod
    def resolve(name: str | Path, folders: list[Path], what: str) -> Path:
        """A full path as given; a relative one in the first of ``folders`` that holds it, else from the cwd."""
        given = Path(name)
        if given.is_absolute():
            return given
        for folder in folders:
            if (folder / given).exists():
                return folder / given
        if given.exists():
            return given
        searched = ", ".join(str(f) for f in folders) or "no model folders configured"
        raise ModelLoadError(f"{what} file not found: {name} (searched: {searched})")

    def model_family(self, name: str) -> str | None:
        """The family of the model ``name`` names ("sd1" ... "flux", "zimage"), read from its keys or
        model_index.json without loading it; None when it cannot be told (not found, unreadable)."""
        try:
            return family_of(self.resolve(name, self.ckpt_dirs, "model"))
        except ModelLoadError:
            return None

    def restore(self) -> None:
        """Nothing to restore: the standalone program holds no model of its own."""

    def lora_dir(self) -> Path:
        """The output folder (``./output`` unless given)."""
        return self.output_dir

    def list_models(self) -> list[str]:
        """Checkpoint files and diffusers folders under the checkpoint folders, as relative paths."""
        return _list_files(self.ckpt_dirs, with_diffusers_folders=True)

    def list_vaes(self) -> list[str]:
        """VAE files under the VAE folder, as relative paths."""
        return _list_files(self.vae_dirs, with_diffusers_folders=False)


def _list_files(folders: list[Path], *, with_diffusers_folders: bool) -> list[str]:
    """Checkpoint files (and diffusers folders) under ``folders``, relative, sorted case-insensitively."""
    found: set[str] = set()
    for folder in folders:
        if not folder.is_dir():
            continue
        diffusers_roots = {index.parent for index in folder.rglob("model_index.json")}
        for item in folder.rglob("*"):
            if not (item.is_file() and item.suffix.lower() in CHECKPOINT_SUFFIXES):
                continue
            if diffusers_roots.intersection(item.parents):
                continue  # weights inside a diffusers folder are not models of their own
            found.add(item.relative_to(folder).as_posix())
        if with_diffusers_folders:
            found.update(root.relative_to(folder).as_posix() for root in diffusers_roots if root != folder)
    return sorted(found, key=str.lower)
