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
    latents_on_first_use: bool = False  # encode a latent when a batch first needs it (the job decides)

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
    """Whether a run's network may include text encoders: its mode allows it (the registry's
    ``text_encoder``) and ``network_blocks`` holds a text-encoder id (BASE; Flux's CLIP, T5). Which
    encoders get modules is the spec's ``keeps_text_encoder``: only those whose id is selected."""
    from trainer.config.choices import TEXT_ENCODER_IDS
    from trainer.modes import get_mode

    return get_mode(cfg.mode).text_encoder and any(b in TEXT_ENCODER_IDS for b in cfg.network_blocks)


def build_network(cfg, ctx: ModeContext, *, from_file: str | None = None):
    """Create the network for ``cfg`` and inject it (on the text encoder too where
    ``trains_text_encoder``).

    With ``network_resume`` (or ``from_file``) the modules, ranks and alphas come from that file
    as SPEC.md §6.4 describes (block and element choices give way to the file's modules).
    """
    from trainer.network.network import create_network, spec_from_config

    fam = ctx.bundle.family
    if fam.flow:
        flow_notes(cfg, ctx)
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


def flow_notes(cfg, ctx: ModeContext) -> None:
    """Say which settings mean nothing on a flow-matching family, and what the blocks select."""
    from trainer.network.network import effective_blocks

    fam = ctx.bundle.family
    if cfg.train_snr_gamma > 0:
        ctx.log(f"warning: train_snr_gamma = {cfg.train_snr_gamma} is ignored: min-SNR weighting belongs to the "
                f"DDPM noise schedule, and {fam.title} is trained with flow matching")
    named = [b for b in fam.text_encoder_ids if b in cfg.network_blocks]
    if named and not trains_text_encoder(cfg):
        ctx.log(f"note: {' and '.join(named)} selected, but {cfg.mode} mode trains no text encoder; "
                "prompts are encoded once and cached")
    elif len(named) > 1 and fam.te_kinds != ("qwen3",):
        ctx.log(f"note: the {' and '.join(named)} text encoders train; prompts are encoded at every step "
                "(not cached), so the text encoders stay loaded")
    if "BASE" in cfg.network_blocks and not named:
        how = ("" if fam.te_kinds == ("qwen3",) else
               f"; select {' / '.join(fam.text_encoder_ids)} to train its text encoder(s)")
        ctx.log(f"note: BASE is the SD text-encoder id and trains nothing on {fam.title}{how}")
    blocks = list(cfg.network_blocks)
    if effective_blocks(fam, blocks) != tuple(blocks):
        ctx.log(f"note: network_blocks names no {fam.title} block ({' '.join(fam.block_ids[:4])} ...), "
                "so every block is trained")


def release_unused(ctx: ModeContext, *, vae: bool = True, text_encoders: bool = False,
                   keep_encoder: int | None = None) -> None:
    """Free frozen parts a run no longer needs once its latents / prompts are cached.

    The modules' tensors are swapped for meta tensors: memory the trainer owns is freed, while
    weights shared with a web-UI's own model stay untouched (the host still holds them). A run with
    previews keeps them on the CPU instead (``ctx.extras["keep_for_previews"]``). ``keep_encoder``:
    the index of a text encoder that stays (the one a Flux run trains while the other's are cached).
    """
    import gc

    encoders = [e for i, e in enumerate(ctx.bundle.text_encoders) if i != keep_encoder] if text_encoders else []
    parts = ([ctx.bundle.vae] if vae else []) + encoders
    # Previews during the run still need them: they wait on the CPU and come back for each preview.
    away = "cpu" if ctx.extras.get("keep_for_previews") else "meta"
    for module in parts:
        if module is not None:
            module.to(away)
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``; on CUDA through pinned (page-locked) memory with a non-blocking
    copy, so the transfer needs no host-side wait and overlaps the work already queued."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def unet_forward(bundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                 time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run the UNet; SDXL gets its pooled embedding and size/crop time ids. The flow-matching
    transformers (Flux, Z-Image) go through ``transformer_forward``."""
    if bundle.family.flow:
        return transformer_forward(bundle, noisy, timesteps, cond)
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
                        None if cond.pooled is None else cond.pooled.expand(n, -1),
                        None if cond.mask is None else cond.mask.expand(n, -1))


# Flux-dev is guidance-distilled: it takes the guidance scale as an input. Networks are trained at
# guidance 1 (the model's plain conditional prediction); schnell has no such input.
FLUX_TRAIN_GUIDANCE = 1.0


def transformer_forward(bundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                        guidance: float | None = None) -> torch.Tensor:
    """Run a flow-matching transformer on (B, C, H, W) latents at timesteps t = σ·1000; returns the
    velocity ε − x0 the loss compares with (training/losses.py).

    What the model is given follows its diffusers inference pipeline, checked against the pipeline's
    own scheduler in the tests: the scheduler's timesteps are σ·1000 for both families;
    ``FluxPipeline`` gives the transformer ``t / 1000`` = σ (the model multiplies by 1000 itself) and
    steps with its output as it is; ``ZImagePipeline`` gives ``(1000 − t) / 1000`` = 1 − σ and steps
    with the negated output. So Flux gets σ and predicts ε − x0; Z-Image gets 1 − σ and predicts
    x0 − ε. (The reference gives Z-Image σ·1000, which is both scaled and reversed against its
    inference, SPEC.md §4.6 and §11; a network trained that way learns a schedule the UIs never use.)
    ``guidance`` is Flux-dev's embedded guidance scale (training: ``FLUX_TRAIN_GUIDANCE``).
    """
    fam = bundle.family
    model = bundle.unet
    dtype = noisy.dtype
    sigma = timesteps.float() / float(bundle.noise_scheduler.config.num_train_timesteps)
    model_t = (sigma if fam.model_time == "sigma" else 1.0 - sigma).to(noisy.device, dtype)
    if fam.name == "flux":
        out = _flux_forward(model, noisy, model_t, cond, FLUX_TRAIN_GUIDANCE if guidance is None else guidance)
    elif fam.name == "zimage":
        out = _zimage_forward(model, noisy, model_t, cond)
    else:  # pragma: no cover - a new flow family must say how it is called
        raise ValueError(f"no transformer call for the {fam.title} family")
    return out * fam.output_sign


def _flux_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, scale: float) -> torch.Tensor:
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need an even height and width, got {h}x{w} (images must be multiples of 16 px)")
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    img_ids[..., 1] = torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
    img_ids[..., 2] = torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
    hidden = cond.hidden.to(x.device, x.dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype)
    guidance = None
    if getattr(model.config, "guidance_embeds", False):
        guidance = torch.full((b,), scale, device=x.device, dtype=torch.float32)
    out = model(hidden_states=packed, timestep=t, guidance=guidance,
                pooled_projections=cond.pooled.to(x.device, x.dtype), encoder_hidden_states=hidden,
                txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3), return_dict=False)[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _zimage_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    hidden = cond.hidden.to(x.device, x.dtype)
    mask = cond.mask
    if mask is None:
        caps = list(hidden.unbind(0))
    else:
        mask = mask.to(x.device)
        caps = [hidden[i][mask[i]] for i in range(hidden.shape[0])]
    frames = list(x.unsqueeze(2).unbind(0))  # (C, F=1, H, W) per sample
    out = model(frames, t, caps, return_dict=False)[0]
    return torch.stack(list(out), dim=0).squeeze(2)
