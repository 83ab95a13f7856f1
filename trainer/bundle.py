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


@dataclass
class ModelBundle:
    """Frozen base model parts, ready to train a network on.

    ``text_encoders`` / ``tokenizers`` hold one entry for SD1/SD2 (CLIP-L or OpenCLIP-H as
    transformers' ``CLIPTextModel``) and two for SDXL (``CLIPTextModel`` and
    ``CLIPTextModelWithProjection``), in the order kohya names them (te1, te2).
    ``prediction_type`` is ``"epsilon"`` or ``"v_prediction"``.
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

    @property
    def device(self) -> "torch.device":
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for every SD family)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

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
