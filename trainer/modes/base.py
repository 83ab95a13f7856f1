"""What every mode shares: the run context, building the network, and the UNet call.

A mode module says what one training step computes. It builds one or more *tasks* (see
trainer/training/loop.py) and never loops itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from trainer.conditioning import Conditioning, PromptEncoder, sdxl_time_ids


@dataclass
class ModeContext:
    """Everything a mode needs besides its settings."""

    bundle: object                     # trainer.bundle.ModelBundle, frozen, on device
    device: torch.device
    model_dtype: torch.dtype           # dtype of the frozen UNet / text encoders
    lora_dtype: torch.dtype            # dtype of the trainable network parameters
    vae_dtype: torch.dtype
    log: Callable[[str], None] = print
    cache_dir: object = None           # folder for on-disk latent caches, or None
    extras: dict = field(default_factory=dict)
    dist: object = None                # trainer.training.distributed.Dist; None = one process

    def __post_init__(self):
        self._encoder = None

    def shard(self, x):
        """This process's share of a full-batch tensor (identity in a single process)."""
        return x if self.dist is None else self.dist.shard(x)

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            self._encoder = PromptEncoder(self.bundle)
            for note in self._encoder.notes:
                self.log(f"warning: {note}")
            if self._encoder.embeddings:
                self.log(f"{len(self._encoder.embeddings)} textual-inversion embedding(s) from "
                         f"{self.bundle.text_options.embeddings_dir}: prompts may name them")
        return self._encoder


class TrainTask:
    """The defaults of the task contract (``trainer.training.loop.Task``) that a mode's task
    inherits: one pass named "main", no epochs, saved at the end, trained, no extra metadata.
    A task class sets ``config`` and ``network`` and defines ``param_groups``, ``compute_loss``,
    ``state_dict`` and ``load_state_dict``; it overrides the rest where its pass differs."""

    name: str = "main"
    epoch: int | None = None
    save_final: bool = True      # save ``<stem>.safetensors`` when the pass ends
    skip_training: bool = False  # the pass only saves (Difference's 1st pass loaded from a file)

    def metadata(self) -> dict[str, str]:
        """Extra ``traintrain_*`` / ``ss_*`` header entries of this pass's saved files."""
        return {}


def trains_text_encoder(cfg) -> bool:
    """Whether a run's network includes the text encoder: its mode allows it (the registry's
    ``text_encoder``) and ``network_blocks`` holds BASE."""
    from trainer.modes import get_mode

    return get_mode(cfg.mode).text_encoder and "BASE" in cfg.network_blocks


def build_network(cfg, ctx: ModeContext, *, from_file: str | None = None):
    """Create the network for ``cfg`` and inject it (on the text encoder too where
    ``trains_text_encoder``).

    With ``network_resume`` (or ``from_file``) the modules, ranks and alphas come from that file
    as SPEC.md §6.4 describes (block and element choices give way to the file's modules).
    """
    from trainer.network.network import create_network, spec_from_config

    spec = spec_from_config(cfg, dtype=ctx.lora_dtype, train_text_encoder=trains_text_encoder(cfg))
    source = from_file or cfg.network_resume
    if source:
        from trainer.network.resume import resume_network

        net = resume_network(ctx.bundle, spec, str(source))
        ctx.log(f"network weights loaded from {source}")
    else:
        net = create_network(ctx.bundle, spec)
    net.to(ctx.device)
    net.apply_to()
    return net


def release_unused(ctx: ModeContext, *, vae: bool = True, text_encoders: bool = False) -> None:
    """Free frozen parts a run no longer needs once its latents / prompts are cached.

    The modules' tensors are swapped for meta tensors: memory the trainer owns is freed, while
    weights shared with a web-UI's own model stay untouched (the host still holds them).
    """
    import gc

    parts = ([ctx.bundle.vae] if vae else []) + (list(ctx.bundle.text_encoders) if text_encoders else [])
    for module in parts:
        if module is not None:
            module.to("meta")
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def unet_forward(bundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                 time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run the UNet; SDXL gets its pooled embedding and size/crop time ids."""
    kwargs = {}
    if bundle.family.name == "sdxl":
        if time_ids is None:
            h, w = noisy.shape[-2] * bundle.vae_scale_factor, noisy.shape[-1] * bundle.vae_scale_factor
            time_ids = sdxl_time_ids((h, w), (0, 0), (h, w))
        time_ids = time_ids.to(noisy.device, noisy.dtype).expand(noisy.shape[0], -1)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(noisy.device), "time_ids": time_ids}
    return bundle.unet(noisy, timesteps, cond.hidden.to(noisy.device), **kwargs).sample


def repeat_cond(cond: Conditioning, n: int) -> Conditioning:
    """Repeat a single-prompt conditioning ``n`` times along the batch."""
    return Conditioning(cond.hidden.expand(n, -1, -1),
                        None if cond.pooled is None else cond.pooled.expand(n, -1))
