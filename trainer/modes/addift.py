"""ADDifT and Multi-ADDifT: learn the difference between an original and a target image.

One step (SPEC.md §4.4), kept as the reference computes it so its presets behave the same:
both images are noised with the same noise at the same timestep; the base model's
prediction for the noised *original* (network off, no gradient) is the target for the
network's prediction on the noised *target* image. Even steps train the forward direction at
network multiplier +0.25; odd steps train the reverse direction at -0.25·|diff_alt_ratio|
(a negative ratio replaces the pair by the noise itself on those steps). Saved at weight 1
the network therefore gives four times the trained effect (times ``network_strength``).

Timesteps: ``addift_timestep_schedule = "fixed"`` (default) is the reference's schedule —
five values lo + k·(hi−lo)/10 for k = 1, 3, 5, 7, 9, each used for a forward and a reverse
step; ``"random"`` draws t uniformly in [min, max) for each forward step and reuses it for
the following reverse step. The log says which one runs.

Multi-ADDifT draws bucketed batches of pairs from a folder, each image with its own caption.

Changes from the reference: with ``diff_use_diff_mask`` the loss is the mean over the masked
latent area (the reference multiplied both predictions by the mask and averaged over the whole
latent, so a small mask gave a small loss); pair images are read with the loader of every
other mode (``data.images``: EXIF orientation, 16-bit images), so a photo trains upright.
"""

from __future__ import annotations

import torch
from PIL import Image

from trainer.conditioning import sdxl_time_ids
from trainer.data.cache import encode_latents_mean, mask_to_latent
from trainer.training.losses import add_noise, diffusion_loss
from trainer.modes.base import ModeContext, TrainTask, build_network, release_unused, repeat_cond, unet_forward

TRAIN_MULTIPLIER = 0.25


def fixed_timestep(step: int, lo: int, hi: int) -> int:
    """The reference's five-value schedule (odd steps repeat the previous even step's t)."""
    n = step - (step % 2)
    k = (n % 10) + 1
    return min(int(lo + k * (hi - lo) / 10), 999)


def load_pixels(path: str, size: tuple[int, int] | None = None, factor: int = 8):
    """An image as RGB pixels in [-1, 1] (1, 3, H, W), cropped to a multiple of ``factor``.

    Read by the loader every mode uses (``data.images.open_image``: EXIF orientation applied,
    16-bit and float images scaled to 8 bits, transparency kept as a mask). ``size`` (w, h)
    resizes first (Lanczos), for a target image whose size differs from the original's.
    Returns (pixels, alpha mask or None, (w, h)).
    """
    from trainer.data.images import open_image, to_arrays

    img = open_image(path)  # ImageLoadError (a ValueError) names the file
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.LANCZOS)
    w, h = img.size
    cw, ch = w - w % factor, h - h % factor
    if cw < factor or ch < factor:
        raise ValueError(f"image {path} is too small ({w}x{h})")
    left, top = (w - cw) // 2, (h - ch) // 2
    pixels, mask = to_arrays(img.crop((left, top, left + cw, top + ch)))
    return torch.from_numpy(pixels)[None].contiguous(), mask, (cw, ch)


class AddiftTask(TrainTask):
    """ADDifT on one image pair, or Multi-ADDifT on bucketed pairs (when ``pairs`` is given)."""

    def __init__(self, cfg, ctx: ModeContext, network, *, single=None, pairs=None):
        self.config, self.ctx, self.network = cfg, ctx, network
        self.single, self.pairs = single, pairs
        self.schedule = cfg.addift_timestep_schedule
        self._t = None
        lo, hi = cfg.train_min_timesteps, cfg.train_max_timesteps
        if self.schedule == "fixed":
            ts = sorted({fixed_timestep(n, lo, hi) for n in range(0, 10, 2)})
            ctx.log(f"ADDifT timesteps: fixed schedule {ts} (compatible with the original extension)")
        else:
            ctx.log(f"ADDifT timesteps: random draw in [{lo}, {hi})")

    @property
    def epoch(self):
        return None if self.pairs is None else self.pairs["batcher"].epoch

    def param_groups(self) -> list[dict]:
        lr = self.config.train_learning_rate
        return self.network.param_groups(unet_lr=lr, te_lr=lr)

    def _timestep(self, step: int) -> int:
        cfg = self.config
        lo, hi = cfg.train_min_timesteps, cfg.train_max_timesteps
        if self.schedule == "fixed":
            return fixed_timestep(step, lo, hi)
        if step % 2 == 0 or self._t is None:
            self._t = int(torch.randint(lo, hi, (1,)).item())
        return self._t

    def _batch(self):
        """(z_orig, z_target, c_orig, c_target, mask or None, time_ids or None) for this step."""
        b = int(self.config.train_batch_size)
        if self.single is not None:
            s = self.single
            return (s["z_o"].expand(b, -1, -1, -1), s["z_t"].expand(b, -1, -1, -1),
                    repeat_cond(s["c_o"], b), repeat_cond(s["c_t"], b),
                    None if s["mask"] is None else s["mask"].expand(b, -1, -1, -1), s["time_ids"].expand(b, -1))
        p = self.pairs
        idx = next(p["iter"])
        z_o = torch.stack([p["orig"].latents[i] for i in idx])
        z_t = torch.stack([p["target"].latents[i] for i in idx])
        c_o = p["text"].get([p["prompts_o"][i] for i in idx])
        c_t = p["text"].get([p["prompts_t"][i] for i in idx])
        mask = None
        if self.config.diff_use_diff_mask:
            mask = torch.stack([p["masks"][i] for i in idx])
        time_ids = None
        if self.ctx.bundle.family.name == "sdxl":
            time_ids = torch.cat([p["time_ids"][i] for i in idx])
        return z_o, z_t, c_o, c_t, mask, time_ids

    def compute_loss(self, step: int) -> torch.Tensor:
        cfg, ctx, bundle = self.config, self.ctx, self.ctx.bundle
        z_o, z_t, c_o, c_t, mask, time_ids = self._batch()
        z_o, z_t = z_o.to(ctx.device), z_t.to(ctx.device)
        if cfg.diff_revert_original_target:
            z_o, z_t = z_t, z_o
        noise = torch.randn(z_o.shape, dtype=torch.float32).to(ctx.device, z_o.dtype)
        t = torch.full((z_o.shape[0],), self._timestep(step), device=ctx.device, dtype=torch.long)
        alt = cfg.diff_alt_ratio
        if step % 2 == 0:
            a, b, m = z_o, z_t, TRAIN_MULTIPLIER
        else:
            a, b, m = z_t, z_o, -TRAIN_MULTIPLIER * abs(alt)
            if alt < 0:
                a = b = noise
        sched = bundle.noise_scheduler
        a, b, noise, t, c_o, c_t, mask, time_ids = (
            ctx.shard(v) for v in (a, b, noise, t, c_o, c_t, mask, time_ids))
        x_a, x_b = add_noise(sched, a, noise, t), add_noise(sched, b, noise, t)
        with torch.no_grad():
            self.network.multiplier = 0.0
            y = unet_forward(bundle, x_a, t, c_o.to(ctx.device), time_ids)
        self.network.multiplier = m
        p = unet_forward(bundle, x_b, t, c_t.to(ctx.device), time_ids)
        loss = diffusion_loss(p, y, t, scheduler=sched, kind=cfg.train_loss_function,
                              snr_gamma=cfg.train_snr_gamma,
                              mask=None if mask is None else mask.to(ctx.device))
        self.network.multiplier = 0.0
        return loss

    def metadata(self) -> dict:
        meta = {"traintrain_original_prompt": self.config.original_prompt,
                "traintrain_target_prompt": self.config.target_prompt,
                "traintrain_addift_timestep_schedule": self.schedule,
                "traintrain_training_multiplier": str(TRAIN_MULTIPLIER)}
        if self.pairs is not None:  # Multi-ADDifT: both images of every pair, each with its caption
            from trainer.data.images import tag_frequency

            items = [item for s in self.pairs["specs"] for item in (s.orig, s.target)]
            meta["ss_tag_frequency"] = tag_frequency(items, self.config.lora_data_directory)
        return meta

    def state_dict(self) -> dict:
        state = {"t": self._t}
        if self.pairs is not None:
            state["batcher"] = self.pairs["batcher"].state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._t = state.get("t")
        if self.pairs is not None and "batcher" in state:
            self.pairs["batcher"].load_state_dict(state["batcher"])
            self.pairs["iter"] = iter(self.pairs["batcher"])


@torch.no_grad()
def prepare_single(cfg, ctx: ModeContext) -> dict:
    """Encode the original/target image pair and the two prompts."""
    bundle, f = ctx.bundle, ctx.bundle.vae_scale_factor
    px_o, mask_o, size = load_pixels(cfg.original_image, factor=f)
    px_t, _, _ = load_pixels(cfg.target_image, factor=f, size=_source_size(cfg.original_image))
    px_t = px_t[..., : px_o.shape[-2], : px_o.shape[-1]]
    if px_t.shape != px_o.shape:
        raise ValueError(f"original image {size} and target image could not be brought to one size")
    fam = bundle.family
    z_o = encode_latents_mean(bundle.vae, px_o, fam.latent_scale, fam.latent_shift).float()
    z_t = encode_latents_mean(bundle.vae, px_t, fam.latent_scale, fam.latent_shift).float()
    h, w = px_o.shape[-2:]
    mask = mask_to_latent(mask_o, tuple(z_o.shape[-2:])) if cfg.diff_use_diff_mask else None
    return {"z_o": z_o, "z_t": z_t, "c_o": ctx.encoder.encode([cfg.original_prompt or ""]),
            "c_t": ctx.encoder.encode([cfg.target_prompt or ""]),
            "mask": None if mask is None else mask[None],
            "time_ids": sdxl_time_ids((h, w), (0, 0), (h, w))}


def _source_size(path: str):
    """The (w, h) an image is seen at: upright, after its EXIF orientation."""
    from trainer.data.images import probe_image

    info = probe_image(path)
    return info.width, info.height


def build_tasks(cfg, ctx: ModeContext):
    if cfg.mode == "Multi-ADDifT":
        from trainer.modes.multi_addift import prepare_pairs

        pairs = prepare_pairs(cfg, ctx)
        release_unused(ctx, vae=True, text_encoders=True)  # latents and captions are cached
        net = build_network(cfg, ctx)
        yield AddiftTask(cfg, ctx, net, pairs=pairs)
        return
    single = prepare_single(cfg, ctx)
    release_unused(ctx, vae=True, text_encoders=True)
    net = build_network(cfg, ctx)
    ctx.log(f"network: {len(net.unet_modules)} U-Net modules")
    yield AddiftTask(cfg, ctx, net, single=single)
