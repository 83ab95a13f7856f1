"""Difference (copy machine): two passes on an original/target image pair (SPEC.md §4.3).

Pass 1 ("copy") trains a copy network to reproduce the original image with the plain
noise-prediction objective. Pass 2 keeps the copy network on (frozen, multiplier 1) and trains
a fresh difference network to reproduce the target image; only the difference network is
saved as ``<name>``. On its own, applied to the base model, it moves images from the original
toward the target.

Changes from the reference: ``diff_load_1st_pass`` really loads the named copy network and
skips pass 1; ``diff_1st_pass_only`` saves the copy network (``<name>_copy``) even when
``diff_save_1st_pass`` is off; each pass records its own settings in the metadata; a stopped
run resumes in either pass (the pass-2 state carries the copy network's weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.conditioning import sdxl_time_ids
from trainer.training.losses import add_noise, diffusion_loss, make_noise, sample_timesteps, training_target
from trainer.modes.addift import _source_size, load_pixels
from trainer.data.cache import encode_latents_mean
from trainer.modes.base import ModeContext, TrainTask, build_network, release_unused, repeat_cond, unet_forward


class ImageTask(TrainTask):
    """Plain noise prediction on one fixed image latent (either pass)."""


    def __init__(self, name: str, cfg, ctx: ModeContext, network, latent, cond, time_ids,
                 frozen=None, save_final: bool = True):
        self.name, self.config, self.ctx, self.network = name, cfg, ctx, network
        self.latent, self.cond, self.time_ids = latent, cond, time_ids
        self.frozen = frozen            # the copy network during pass 2
        self.save_final = save_final

    def param_groups(self) -> list[dict]:
        lr = self.config.train_learning_rate
        return self.network.param_groups(unet_lr=lr, te_lr=lr)

    def compute_loss(self, step: int) -> torch.Tensor:
        cfg, ctx, bundle = self.config, self.ctx, self.ctx.bundle
        b = cfg.train_batch_size
        z = self.latent.expand(b, -1, -1, -1).to(ctx.device)
        noise = make_noise(z, cfg.train_noise_offset)
        sched = bundle.noise_scheduler
        t = sample_timesteps(b, cfg.train_min_timesteps, cfg.train_max_timesteps,
                             fixed_in_batch=cfg.train_fixed_timsteps_in_batch, device=ctx.device,
                             scheduler=sched, latent_hw=tuple(z.shape[-2:]))
        target = training_target(sched, z, noise, t, bundle.prediction_type)
        z, noise, t, target = (ctx.shard(v) for v in (z, noise, t, target))
        pred = unet_forward(bundle, add_noise(sched, z, noise, t), t,
                            repeat_cond(self.cond, z.shape[0]).to(ctx.device), self.time_ids)
        return diffusion_loss(pred, target, t, scheduler=sched, kind=cfg.train_loss_function,
                              snr_gamma=cfg.train_snr_gamma)

    def metadata(self) -> dict:
        return {"traintrain_original_image": Path(self.config.original_image).name,
                "traintrain_target_image": Path(self.config.target_image).name}

    def state_dict(self) -> dict:
        return {"frozen": None if self.frozen is None else self.frozen.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.frozen is not None and state.get("frozen") is not None:
            self.frozen.load_state_dict(state["frozen"])


def find_first_pass(name: str, search_dirs: list[Path]) -> Path:
    """Resolve ``diff_load_1st_pass``: a path, or a file name searched in the output folder."""
    p = Path(name)
    if p.suffix.lower() != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    if p.is_file():
        return p
    for folder in search_dirs:
        hits = sorted(Path(folder).rglob(p.name)) if Path(folder).is_dir() else []
        if hits:
            return hits[0]
    raise ValueError(f"diff_load_1st_pass: {name!r} was not found (looked for {p.name} in "
                     f"{', '.join(str(d) for d in search_dirs)}); give the path of a saved copy network")


@torch.no_grad()
def _encode_pair(cfg, ctx: ModeContext):
    bundle, f = ctx.bundle, ctx.bundle.vae_scale_factor
    px_a, _, _ = load_pixels(cfg.original_image, factor=f)
    px_b, _, _ = load_pixels(cfg.target_image, factor=f, size=_source_size(cfg.original_image))
    px_b = px_b[..., : px_a.shape[-2], : px_a.shape[-1]]
    fam = bundle.family
    z_a = encode_latents_mean(bundle.vae, px_a, fam.latent_scale, fam.latent_shift).float()
    z_b = encode_latents_mean(bundle.vae, px_b, fam.latent_scale, fam.latent_shift).float()
    h, w = px_a.shape[-2:]
    return z_a, z_b, sdxl_time_ids((h, w), (0, 0), (h, w))


def build_tasks(cfg, ctx: ModeContext):
    z_a, z_b, time_ids = _encode_pair(cfg, ctx)
    with torch.no_grad():
        cond = ctx.encoder.encode([cfg.original_prompt or ""])
    release_unused(ctx, vae=True, text_encoders=True)
    resume_pass = int(ctx.extras.get("resume_pass", 0))

    save_copy = bool(cfg.diff_save_1st_pass or cfg.diff_1st_pass_only)
    loaded = None
    if cfg.diff_load_1st_pass and resume_pass == 0:
        loaded = find_first_pass(cfg.diff_load_1st_pass, ctx.extras.get("search_dirs", []))
    copy_net = build_network(cfg, ctx, from_file=loaded)
    ctx.log(f"copy network: {len(copy_net.unet_modules)} U-Net modules")
    pass1 = ImageTask("copy", cfg, ctx, copy_net, z_a, cond, time_ids, save_final=save_copy)
    if loaded is not None:
        ctx.log(f"pass 1 skipped: copy network loaded from {loaded}")
        pass1.skip_training = True
        pass1.save_final = False
    yield pass1
    if cfg.diff_1st_pass_only:
        return

    copy_net.requires_grad_(False)
    copy_net.multiplier = 1.0
    cfg2 = cfg.pass2()
    diff_net = build_network(cfg2, ctx)
    ctx.log(f"difference network: {len(diff_net.unet_modules)} U-Net modules")
    yield ImageTask("main", cfg2, ctx, diff_net, z_b, cond, time_ids, frozen=copy_net)
