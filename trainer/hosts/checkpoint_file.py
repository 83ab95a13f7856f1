"""Reading single-file checkpoints (.safetensors / .ckpt / .pt / .pth / .bin) and telling what they hold.

``CheckpointFile`` opens a file, lists its keys and shapes without loading every tensor
(safetensors header; a memory-mapped ``torch.load``), and loads the state dict when asked.
``.ckpt``-style files are read with ``torch.load(weights_only=True)``: no code in a download
ever runs. Original Stable Diffusion ``.ckpt`` files also pickle PyTorch-Lightning training
state next to the weights; those objects are replaced by inert placeholders (never imported or
executed) so that such files still load.

``detect_family`` names the model family from the keys (SPEC.md §1.2: SD1/SD2/SDXL, and the Flux and
Z-Image transformers, as BFL/original or diffusers-named files) or raises :class:`ModelLoadError`
saying what the file looks like instead (a LoRA, a VAE, SD3...).
The key patterns are facts of the public LDM / kohya / diffusers formats; diffusers offers no
function that answers "what is this file, and if not a model, what then", hence this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trainer.hosts.base import ModelLoadError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES

UNET_PREFIX = "model.diffusion_model."
# Cross-attention key width of this key decides the family (SPEC.md §1.2).
WIDTH_KEY = UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
REFINER_WIDTH = 1280
TE_PREFIXES = {
    "sdxl": "conditioner.embedders.1.model.",       # OpenCLIP-bigG next to CLIP-L
    "sd2": "cond_stage_model.model.",               # OpenCLIP-H
    "sd1": "cond_stage_model.transformer.",         # CLIP-L (transformers layout)
}
REFINER_TE_PREFIX = "conditioner.embedders.0.model."  # the refiner has only OpenCLIP-bigG
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Marker keys that some v-prediction checkpoints carry (NoobAI-XL, sd-scripts' saves).
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"

_DIT_MARKERS = {  # family name -> key suffixes (with or without the LDM prefix)
    "SD3 / SD3.5": ("joint_blocks.0.context_block.adaLN_modulation.1.bias",),
    # original (BFL) keys, then diffusers' names of a transformer saved on its own
    "Flux": ("double_blocks.0.img_attn.norm.key_norm.scale", "single_transformer_blocks.0.proj_mlp.weight"),
    "Z-Image": ("context_refiner.0.attention.k_norm.weight", "context_refiner.0.attention.norm_k.weight"),
}
# The transformer families the trainer supports, by marker name.
DIT_FAMILIES = {"Flux": "flux", "Z-Image": "zimage"}
_NETWORK_KEY = re.compile(
    r"(lora_down|lora_up|lora_A\.|lora_B\.|lora\.down|lora\.up|hada_w1|hada_w2|lokr_w1|lokr_w2|"
    r"^lora_unet_|^lora_te\d?_|\.diff_b$|\.oft_)"
)
_PLACEHOLDER_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "numpy")


class CheckpointFile:
    """A single-file checkpoint on disk: its keys and shapes, and its tensors on demand."""

    def __init__(self, path: Path, what: str = "model") -> None:
        self.path = Path(path)
        self.what = what
        if not self.path.is_file():
            raise ModelLoadError(f"{what} file not found: {self.path}")
        self.is_safetensors = self.path.suffix.lower() in SAFETENSORS_SUFFIXES
        self.metadata: dict[str, str] = {}
        self._state: dict[str, Any] | None = None
        self.shapes = self._read_shapes()

    # -- reading --------------------------------------------------------------------------
    def _unreadable(self, error: Exception) -> ModelLoadError:
        return ModelLoadError(
            f"{self.what} file {self.path} could not be read; the file may be incomplete (re-download it) "
            f"or not a {'safetensors' if self.is_safetensors else 'PyTorch checkpoint'} file at all "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        )

    def _read_shapes(self) -> dict[str, tuple]:
        if self.is_safetensors:
            from safetensors import safe_open

            try:
                with safe_open(str(self.path), framework="pt") as handle:
                    self.metadata = dict(handle.metadata() or {})
                    return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            except Exception as error:  # safetensors raises its own error types per version
                raise self._unreadable(error) from error
        self._state = _unwrap(self._torch_load())
        return {k: tuple(v.shape) for k, v in self._state.items() if hasattr(v, "shape")}

    def _torch_load(self) -> Any:
        import torch

        try:
            try:
                return torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Files in the legacy (non-zip) format cannot be memory-mapped.
                return torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as error:
            if type(error).__name__ == "UnpicklingError" and "Weights only load failed" in str(error):
                return self._torch_load_with_placeholders(error)
            raise self._unreadable(error) from error

    def _torch_load_with_placeholders(self, first_error: Exception) -> Any:
        """Load a .ckpt that pickles training-framework objects next to its weights.

        Only globals from the training frameworks SD was trained with (and numpy scalars) are
        allowed, each replaced by an inert placeholder class; anything else is refused.
        """
        import torch

        serialization = torch.serialization
        if not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):
            raise self._refused(first_error, [])
        names = serialization.get_unsafe_globals_in_checkpoint(str(self.path))
        foreign = [n for n in names if n.split(".")[0] not in _PLACEHOLDER_MODULES]
        if foreign:
            raise self._refused(first_error, foreign)
        stubs = [_placeholder(n) for n in names]
        try:
            with serialization.safe_globals(stubs):
                return torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise self._unreadable(error) from error

    def _refused(self, error: Exception, names: list[str]) -> ModelLoadError:
        listed = f" ({', '.join(names[:5])})" if names else ""
        return ModelLoadError(
            f"{self.what} file {self.path} contains Python objects other than tensors{listed}; "
            "they are not loaded because loading them could run code from the file. Use a .safetensors "
            f"version of this model. ({str(error).splitlines()[0]})"
        )

    def state_dict(self, dtype: Any = None) -> dict[str, Any]:
        """All tensors of the file, keyed as stored (a ``state_dict`` nesting is removed).

        With ``dtype``, floating tensors of a safetensors file are cast as they are read.
        """
        if self._state is None and not self.is_safetensors:
            self._state = _unwrap(self._torch_load())
        if self._state is None:
            try:
                self._state = read_safetensors(self.path, dtype)
            except Exception as error:
                raise self._unreadable(error) from error
        return self._state

    def release(self) -> None:
        """Drop the loaded tensors (the built modules keep what they use)."""
        self._state = None

    # -- questions ------------------------------------------------------------------------
    def has_prefix(self, prefix: str) -> bool:
        """True if any key starts with ``prefix``."""
        return any(k.startswith(prefix) for k in self.shapes)

    def unet_in_channels(self) -> int | None:
        """Input channels of the LDM UNet's first conv (4 for text-to-image, 9 for inpainting)."""
        shape = self.shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
        return int(shape[1]) if shape and len(shape) == 4 else None

    def cross_attention_width(self) -> int | None:
        """Width of the context the UNet's cross-attention reads (SPEC.md §1.2), if the key exists."""
        shape = self.shapes.get(WIDTH_KEY)
        return int(shape[1]) if shape and len(shape) == 2 else None


def _unwrap(loaded: Any) -> dict[str, Any]:
    """The weights of a torch checkpoint: ``{"state_dict": {...}}`` nestings are opened."""
    state = loaded
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"the checkpoint holds a {type(state).__name__}, not a dict of tensors")
    return state


class _Placeholder:
    """Stands in for a pickled training-framework object; accepts and ignores everything."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _placeholder(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (_Placeholder,), {"__module__": module, "__qualname__": name})


def _dit_family(ckpt: CheckpointFile) -> str | None:
    for name, suffixes in _DIT_MARKERS.items():
        for suffix in suffixes:
            if suffix in ckpt.shapes or UNET_PREFIX + suffix in ckpt.shapes:
                return name
    return None


def transformer_family(ckpt: CheckpointFile) -> str | None:
    """``"flux"`` or ``"zimage"`` when the file holds that transformer (SPEC.md §1.2 keys), else None."""
    return DIT_FAMILIES.get(_dit_family(ckpt) or "")


def describe_non_model(ckpt: CheckpointFile) -> str:
    """What a file without SD1/SD2/SDXL base-model keys looks like, in words for a message."""
    keys = list(ckpt.shapes)
    if not keys:
        return "it contains no tensors"
    dit = _dit_family(ckpt)
    if dit in DIT_FAMILIES:
        return f"it is a {dit} transformer, which is trained from its own family's files, not as an SD checkpoint"
    if dit:
        return f"it is a {dit} model, which is not supported (supported: SD1.x, SD2.x, SDXL base, Flux.1, Z-Image)"
    if any(_NETWORK_KEY.search(k) for k in keys) or "ss_network_module" in ckpt.metadata:
        return ("it looks like a LoRA / LyCORIS network file (keys like "
                f"{_first(k for k in keys if _NETWORK_KEY.search(k))!r}), not a base model; "
                "use it as a network to resume from, or pick the checkpoint it was trained on")
    if is_vae_only(ckpt):
        return "it looks like a VAE file (only encoder/decoder weights); select it as the VAE instead"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys) or any(
            k.startswith("string_to_param") for k in keys):
        return "it looks like a textual-inversion embedding, not a base model"
    if "conv_in.weight" in ckpt.shapes and any(k.startswith("down_blocks.") for k in keys):
        return ("it holds diffusers-format UNet weights only; give the whole diffusers model folder "
                "(the one with model_index.json) instead")
    return ("it is not a Stable Diffusion checkpoint: it has no UNet weights (keys starting with "
            f"{UNET_PREFIX!r}); first keys: {', '.join(keys[:3])}")


def is_vae_only(ckpt: CheckpointFile) -> bool:
    """True for a file of LDM- or diffusers-named VAE weights and nothing else."""
    parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    stripped = [_strip_vae_prefix(k) for k in ckpt.shapes]
    return bool(stripped) and all(k.startswith(parts) for k in stripped) and any(
        k.startswith("decoder.") for k in stripped)


def _strip_vae_prefix(key: str) -> str:
    for prefix in VAE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _first(items) -> str:
    return next(iter(items), "")


def require_unet(ckpt: CheckpointFile) -> None:
    """ModelLoadError saying what the file is when it holds no SD-style UNet (a LoRA, a VAE, Flux...)."""
    if _dit_family(ckpt) or not ckpt.has_prefix(UNET_PREFIX):
        raise ModelLoadError(f"{ckpt.path.name} cannot be used as the model: {describe_non_model(ckpt)}")


def detect_family(ckpt: CheckpointFile) -> str:
    """``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"flux"`` or ``"zimage"`` from the keys; ModelLoadError
    naming the problem otherwise."""
    name = ckpt.path.name
    dit = transformer_family(ckpt)
    if dit is not None:
        return dit
    require_unet(ckpt)
    channels = ckpt.unet_in_channels()
    if channels is not None and channels != 4:
        raise ModelLoadError(
            f"{name} is an inpainting or instruct-pix2pix model (its UNet takes {channels} input channels); "
            "only plain text-to-image models (4 channels) can be trained")
    width = ckpt.cross_attention_width()
    if width == REFINER_WIDTH or (ckpt.has_prefix(REFINER_TE_PREFIX) and not ckpt.has_prefix(TE_PREFIXES["sdxl"])):
        raise ModelLoadError(f"{name} is an SDXL refiner, which is not supported (use an SDXL base model)")
    by_keys = next((fam for fam, prefix in TE_PREFIXES.items() if ckpt.has_prefix(prefix)), None)
    by_width = WIDTH_FAMILY.get(width) if width is not None else None
    if by_keys is None:
        found = f" (its UNet looks like {by_width})" if by_width else ""
        raise ModelLoadError(
            f"{name} has UNet weights but no text encoder weights{found}; a full checkpoint with its "
            "text encoder(s) is needed")
    if by_width is not None and by_width != by_keys:
        raise ModelLoadError(
            f"{name} is inconsistent: its text encoder keys say {by_keys} but its cross-attention width "
            f"{width} says {by_width}; pass family= (and config_dir= for a non-standard architecture)")
    return by_keys


def read_safetensors(path: Path, dtype: Any = None, keep: Any = None) -> dict[str, Any]:
    """Read a safetensors file tensor by tensor with plain reads, casting floating tensors to
    ``dtype`` on the way; ``keep(key)`` False leaves a tensor unread (a part of an all-in-one file).

    safetensors' own ``load_file`` memory-maps the file, and the mapped pages stay resident
    for as long as any tensor from it lives; reading each tensor into its own buffer and
    casting it at once keeps the peak at the cast weights plus one tensor (about 2 GB less
    for SD1.5 and 6.5 GB less for SDXL). The format (8-byte header length, JSON header, raw
    little-endian data) is the library's public specification.
    """
    import json
    import struct

    import torch

    out: dict[str, Any] = {}
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        base = 8 + length
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__" and (keep is None or keep(k))),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for key, info in entries:
            start, end = info["data_offsets"]
            fh.seek(base + start)
            buf = bytearray(end - start)
            if fh.readinto(buf) != len(buf):
                raise OSError(f"tensor {key} is cut short (the file ends early)")
            src = getattr(torch, _ST_DTYPES[info["dtype"]])
            shape = info["shape"]
            t = torch.frombuffer(buf, dtype=src) if buf else torch.empty(0, dtype=src)
            t = t.reshape(shape)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)  # the read buffer is dropped with this loop's references
            out[key] = t  # otherwise the tensor keeps its own buffer alive
    return out
