"""ModelBundle: the one object every mode trains on, whoever loaded it.

A host (standalone files, or a web-UI's loaded model) builds a bundle of diffusers /
transformers modules; modes, the network and the loop only ever see this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from trainer.families import Family


EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass(frozen=True)
class TextOptions:
    """How prompts are read, as the host that will generate with the network reads them.

    ``emphasis``: the web-UIs' option of that name: "Original" weights ``(word:1.2)``/``[word]``
    and restores the chunk's mean, "No norm" weights without restoring, "Ignore" parses the syntax
    but weights nothing, "None" reads brackets as plain text. ``clip_skip``: 1 = the last CLIP
    layer (SD1; the hosts' "Clip skip"). ``clip_skip_sdxl``: whether ``clip_skip`` above 2 picks
    an earlier layer on SDXL too (Forge and the standalone program) or SDXL always uses the
    penultimate layer (AUTOMATIC1111). ``embeddings_dir``: the folder of textual-inversion
    embeddings (the web UI's ``--embeddings-dir``) whose file names a prompt may use as words.
    """

    emphasis: str = "Original"
    clip_skip: int = 1
    clip_skip_sdxl: bool = True
    embeddings_dir: str = ""  # textual-inversion embeddings a prompt may name ("" = none)

    def __post_init__(self):
        if self.emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis {self.emphasis!r} is not one of {', '.join(EMPHASIS_MODES)}")
        if not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise ValueError(f"clip skip {self.clip_skip!r} must be a whole number >= 1")


@dataclass
class ModelBundle:
    """Frozen base model parts, ready to train a network on.

    ``text_encoders`` / ``tokenizers`` hold one entry for SD1/SD2 (CLIP-L or OpenCLIP-H as
    transformers' ``CLIPTextModel``) and two for SDXL (``CLIPTextModel`` and
    ``CLIPTextModelWithProjection``), in the order kohya names them (te1, te2).
    ``prediction_type`` is ``"epsilon"`` or ``"v_prediction"``; ``"flow"`` for the flow-matching
    transformers (Flux: ``unet`` is a ``FluxTransformer2DModel``, text encoders CLIP-L and T5;
    Z-Image: a ``ZImageTransformer2DModel`` and Qwen3), whose ``noise_scheduler`` is diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (its config gives the timestep shift).
    """

    family: "Family"
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    prediction_type: str = "epsilon"
    source: str = ""
    metadata: dict = field(default_factory=dict)
    text_options: TextOptions = field(default_factory=TextOptions)

    @property
    def device(self) -> "torch.device":
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for every SD family)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the denoiser works on (4 for SD, 16 for Flux and Z-Image)."""
        if self.family.is_dit:
            return self.family.latent_channels
        return int(self.unet.config.in_channels)

    @property
    def is_v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    def to(self, device=None, dtype=None) -> "ModelBundle":
        """Move the frozen modules (unet, vae, text encoders) to ``device``/``dtype``."""
        for module in [self.unet, self.vae, *self.text_encoders]:
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> "ModelBundle":
        """Turn off gradients for every base weight; only the network trains."""
        for module in [self.unet, self.vae, *self.text_encoders]:
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        return self
