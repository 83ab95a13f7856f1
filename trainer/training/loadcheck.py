"""After a save: does the file load in another program's loader, and does every key find its layer?

``check_file(path, bundle)`` loads the saved file the way diffusers users load a LoRA
(``load_lora_weights``), or, for LoHa files (which diffusers does not read), through LyCORIS's own
loader (``lycoris.kohya.create_network_from_weights``, what sd-scripts and the web-UIs' LyCORIS
support use). It reports how many modules were loaded and which keys found no layer.

The model it loads into is a skeleton of the bundle's U-Net and text encoders built on the meta
device from their configs: no weights are copied or touched (so the host's model and the bundle
stay as they are), and the check costs the same on a full-size model as on a tiny one.

Flux and Z-Image files are loaded by their own diffusers pipeline (``FluxPipeline`` /
``ZImagePipeline``) into a weightless transformer; a module counts as loaded when every diffusers
layer it covers got the LoRA (Flux's fused ``qkv`` is three). diffusers' Flux loader reads no T5 keys,
so a Flux file's ``lora_te3_`` modules are named in the report as not checked rather than as missing.

Where the names differ: LyCORIS names modules by the module tree it is given, which is diffusers'
for the U-Net; SDXL files use the LDM names of sd-scripts' SDXL U-Net (as the web-UIs expect), so
for the LyCORIS check those names are first turned into the diffusers tree's
(``families.ldm_module_paths``). diffusers reads the LDM names itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

_LORA_KEY = re.compile(r"[A-Za-z0-9_.]*lora[A-Za-z0-9_.]*")


@dataclass
class LoadCheck:
    """What another loader made of a saved file."""

    file: Path
    loader: str                 # "diffusers" or "LyCORIS"
    modules: int = 0            # modules the loader built from the file
    file_modules: int = 0       # modules the file holds
    unmatched: list = field(default_factory=list)  # keys (or module names) that found no layer
    error: str = ""             # the loader refused the file
    skipped: str = ""           # why the check could not run here (a loader missing), not a fault of the file
    in_host: bool = False       # the web UI's own loader (``loader`` names the host) in its own txt2img
    said: list = field(default_factory=list)  # the host loader's own report lines (Forge)
    not_read: str = ""          # modules of the file this loader does not read by design (Flux's T5 in diffusers)

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.error and not self.unmatched and self.modules == self.file_modules

    def summary(self) -> str:
        if self.in_host:
            return self._host_summary()
        head = f"load check of {self.file.name} ({self.loader})"
        if self.skipped:
            return f"{head}: skipped, {self.skipped}"
        if self.error:
            return f"{head}: WARNING: it does not load: {self.error}"
        text = f"{head}: loaded: {self.modules} modules, {len(self.unmatched)} keys unmatched"
        if self.unmatched:
            text += f". WARNING: these keys found no layer and would be skipped: {self._shown()}"
        elif self.modules != self.file_modules:
            text += (f". WARNING: the file holds {self.file_modules} modules but only {self.modules} "
                     "were loaded")
        if self.not_read:
            text += f" ({self.not_read})"
        return text

    def _shown(self) -> str:
        """The first unmatched keys, and how many more."""
        more = len(self.unmatched) - 8
        return ", ".join(self.unmatched[:8]) + (f" and {more} more" if more > 0 else "")

    def _host_summary(self) -> str:
        head = f"check of {self.file.name} in {self.loader}'s own txt2img"
        if self.error:
            text = f"{head}: WARNING: {self.error}"
        else:
            text = f"{head}: loaded in {self.loader}: {self.modules} modules, {len(self.unmatched)} keys skipped"
        if self.unmatched:
            text += f". WARNING: {self.loader} found no layer for these keys: {self._shown()}"
        elif not self.error and self.modules != self.file_modules:
            text += (f". WARNING: the file holds {self.file_modules} modules but {self.loader} patched "
                     f"{self.modules}")
        return text


def _file_modules(tensors: dict) -> set[str]:
    return {key.split(".", 1)[0] for key in tensors}


def _skeleton(bundle):
    """(unet or transformer, text encoders) with the bundle's configs on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        denoiser = type(bundle.unet) if bundle.family.is_dit else UNet2DConditionModel
        unet = denoiser.from_config(bundle.unet.config)
        encoders = [type(te)(te.config) for te in bundle.text_encoders]
    return unet, encoders


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured():
    """Collect the warnings diffusers, transformers and PEFT log or warn while loading.

    Meanwhile they reach only this collector (the check's summary says what matters), also where a
    process has set those libraries to show errors only (the CLI keeps their chatter off the console)."""
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    kept = [(logger, logger.level, list(logger.handlers), logger.propagate) for logger in loggers]
    for logger in loggers:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(records)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.messages += [str(w.message) for w in caught]
    finally:
        for logger, level, handlers, propagate in kept:
            logger.removeHandler(records)
            for handler in handlers:
                logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def _unmatched_keys(messages: list[str]) -> list[str]:
    """Key names from the loaders' "unexpected keys" / "missing ... lora" reports. transformers also
    lists the wrapped layers' ``base_layer`` weights as missing on every load; those are not ours."""
    found: list[str] = []
    for message in messages:
        for line in message.splitlines():
            low = line.lower()
            if "unexpected" in low or ("missing" in low and "lora" in low):
                found += [k for k in _LORA_KEY.findall(line.partition(":")[2] or line)
                          if "base_layer" not in k and k not in found and "." in k]
    return found


def _vae_skeleton(bundle):
    """A weightless VAE of the bundle's width (meta device). The check never decodes, but the
    pipelines of diffusers before 0.32 (the web UIs' own, e.g. Forge's 0.31) read ``vae.config``
    in their constructor and fail on ``vae=None``."""
    import torch
    from diffusers import AutoencoderKL

    config = getattr(bundle.vae, "config", None)
    channels = tuple(getattr(config, "block_out_channels", None) or (128, 256, 512, 512))
    with torch.device("meta"):
        return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels,
                             down_block_types=("DownEncoderBlock2D",) * len(channels),
                             up_block_types=("UpDecoderBlock2D",) * len(channels),
                             latent_channels=int(getattr(config, "latent_channels", 4) or 4), norm_num_groups=8)


def _pipeline(bundle, unet, encoders):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from trainer.hosts.dit_parts import library_class

    # a copy: the pipeline rewrites some scheduler settings it finds outdated (steps_offset)
    scheduler = type(bundle.noise_scheduler).from_config(bundle.noise_scheduler.config)
    vae = _vae_skeleton(bundle)
    if bundle.family.name == "flux":
        flux_pipeline = library_class("diffusers", "FluxPipeline")  # newer than A1111's diffusers
        return flux_pipeline(scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=bundle.tokenizers[0],
                            text_encoder_2=encoders[1], tokenizer_2=bundle.tokenizers[1], transformer=unet)
    if bundle.family.name == "zimage":
        zimage_pipeline = library_class("diffusers", "ZImagePipeline")
        return zimage_pipeline(scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=bundle.tokenizers[0],
                              transformer=unet)
    if bundle.family.name == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1],
                                         unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=bundle.tokenizers[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _no_peft_backend() -> str:
    """Why this diffusers has no PEFT backend (it loads LoRAs only through it), by its own rule:
    peft and transformers each at least diffusers' minimum (AUTOMATIC1111 1.7-1.10 pin
    transformers 4.30.2, below the 4.34 diffusers asks, so the check cannot run there)."""
    import importlib.metadata

    from diffusers.utils import constants
    from packaging.version import Version

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    wants = {"peft": getattr(constants, "MIN_PEFT_VERSION", "?"),
             "transformers": getattr(constants, "MIN_TRANSFORMERS_VERSION", "?")}
    missing = []
    for name, least in wants.items():
        have = version(name)
        if have is None:
            missing.append(f"{name} is not installed")
        elif least != "?" and Version(Version(have).base_version) < Version(least):
            missing.append(f"{name} is {have}, below the {least} it needs")
    why = "; ".join(missing) or "its PEFT backend is off"
    return f"diffusers loads LoRAs only through its PEFT backend, and here {why}"


def _check_diffusers(path: Path, bundle, tensors: dict) -> LoadCheck:
    from diffusers.utils import USE_PEFT_BACKEND

    result = LoadCheck(path, "diffusers", file_modules=len(_file_modules(tensors)))
    if not USE_PEFT_BACKEND:
        result.skipped = _no_peft_backend()
        return result
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet, encoders = _skeleton(bundle)
    if bundle.family.is_dit:
        return _check_dit(path, bundle, tensors, result, unet, encoders)
    with _captured() as records:
        pipe = _pipeline(bundle, unet, encoders)
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="check",
                                   low_cpu_mem_usage=True)
        except (TypeError, NotImplementedError) as error:
            # older diffusers/PEFT (a web UI's own, e.g. Forge's 0.31 / 0.13) cannot load into a
            # model on the meta device: that says nothing about the file
            if "low_cpu_mem_usage" not in str(error) and "meta tensor" not in str(error):
                raise
            result.skipped = f"this diffusers cannot load into a weightless model ({error})"[:600]
            return result
        except Exception as error:  # the loader's own words are the report
            result.error = f"{type(error).__name__}: {error}"[:600]
    result.modules = sum(isinstance(m, BaseTunerLayer) for model in (unet, *encoders) for m in model.modules())
    result.unmatched = _unmatched_keys(records.messages)
    return result


# Flux's T5 modules (lora_te3_): ComfyUI and Forge load them; diffusers' Flux loader reads no T5 keys.
_DIFFUSERS_SKIPS = {"flux": ("lora_te3_", "its Flux loader reads no T5 keys (ComfyUI and Forge load them)")}


def _check_dit(path: Path, bundle, tensors: dict, result: LoadCheck, model, encoders) -> LoadCheck:
    """Flux / Z-Image: the family's diffusers pipeline loads the file into the weightless transformer and
    text encoders. A module counts as loaded when every diffusers layer it covers (the parts of a fused
    ``qkv``/``linear1``) became a LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.network.io import internal_keys
    from trainer.network.network import find_targets

    names = {id(m): n for n, m in model.named_modules()}
    te_names = [{id(m): n for n, m in te.named_modules()} for te in encoders]
    covered = {}  # module name -> (model, [paths])
    for t in find_targets(bundle.family, model, encoders, "lierla"):
        layers = t.layers or (t.layer,)
        if t.is_te:
            index = bundle.family.text_encoder_ids.index(t.block)
            covered[t.lora_name] = (encoders[index], [te_names[index][id(layer)] for layer in layers])
        else:
            covered[t.lora_name] = (model, [names[id(layer)] for layer in layers])
    held = sorted(_file_modules(internal_keys(tensors)))
    skip_prefix, why = _DIFFUSERS_SKIPS.get(bundle.family.name, (None, ""))
    skipped = [m for m in held if skip_prefix and m.startswith(skip_prefix)]
    if skipped:
        result.not_read = f"{len(skipped)} module(s) not checked: diffusers skips them, {why}"
    result.file_modules = len(held) - len(skipped)
    with _captured() as records:
        pipe = _pipeline(bundle, model, encoders)
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="check",
                                   low_cpu_mem_usage=True)
        except Exception as error:  # the loader's own words are the report
            result.error = f"{type(error).__name__}: {error}"[:600]
            return result
    for name in held:
        if name in skipped:
            continue
        where = covered.get(name)
        if where is None:
            result.unmatched.append(name)
            continue
        owner, paths = where
        if all(isinstance(owner.get_submodule(p), BaseTunerLayer) for p in paths):
            result.modules += 1
    result.unmatched += [k for k in _unmatched_keys(records.messages) if k not in result.unmatched]
    return result


def _ldm_to_diffusers_names(bundle) -> dict[str, str]:
    from trainer.families import ldm_module_paths

    return {"lora_unet_" + ldm.replace(".", "_"): "lora_unet_" + path.replace(".", "_")
            for path, ldm in ldm_module_paths(bundle.unet).items()}


def _check_lycoris(path: Path, bundle, tensors: dict) -> LoadCheck:
    result = LoadCheck(path, "LyCORIS", file_modules=len(_file_modules(tensors)))
    try:
        from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    except ImportError:
        result.skipped = "LyCORIS (lycoris-lora) is not installed here"
        return result
    import torch

    weights = dict(tensors)
    if bundle.family.unet_naming == "ldm":
        names = _ldm_to_diffusers_names(bundle)
        weights = {}
        for key, value in tensors.items():
            module, _, rest = key.partition(".")
            weights[f"{names.get(module, module)}.{rest}"] = value
    unet, encoders = _skeleton(bundle)
    # sd-scripts hands LyCORIS CLIPs whose layers sit under ``text_model`` (transformers 4's tree,
    # the kohya names); transformers 5 dropped that level, so each encoder is hung under that name.
    holders = []
    for te in encoders:
        holder = te if hasattr(te, "text_model") else torch.nn.Module()
        if holder is not te:
            holder.text_model = te
        holders.append(holder)
    # LyCORIS first builds (and drops) a default network whose by-name targets are met twice on a
    # diffusers U-Net and trip its duplicate check; only that throw-away network is affected.
    saved = LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME
    LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = []
    try:
        with _captured():
            network, _ = create_network_from_weights(1.0, str(path), None, holders if len(holders) > 1 else holders[0],
                                                     unet, weights_sd=weights, for_inference=True)
    except Exception as error:
        result.error = f"{type(error).__name__}: {error}"[:600]
        return result
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = saved
    built = {m.lora_name for m in [*network.unet_loras, *network.text_encoder_loras]}
    result.modules = len(built)
    back = {v: k for k, v in _ldm_to_diffusers_names(bundle).items()} if bundle.family.unet_naming == "ldm" else {}
    result.unmatched = sorted(back.get(m, m) for m in _file_modules(weights) - built)
    return result


def check_file(path: str | Path, bundle) -> LoadCheck:
    """Load ``path`` into a weightless copy of ``bundle``'s model with diffusers (LoRA, LoCon) or
    LyCORIS (LoHa) and report what loaded; never raises for a file that does not load."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        return LoadCheck(path, "safetensors", error=f"{type(error).__name__}: {error}"[:600])
    loha = any(".hada_" in key for key in tensors)
    try:
        return (_check_lycoris if loha else _check_diffusers)(path, bundle, tensors)
    except ImportError as error:
        return LoadCheck(path, "LyCORIS" if loha else "diffusers", skipped=f"a loader is missing here ({error})")
