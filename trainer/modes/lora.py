"""LoRA mode: plain noise (or v) prediction on captioned, bucketed images (SPEC.md §4.1).

prepare: discover images and captions, plan bucketed samples (sub-images, mirroring),
encode every sample's latent once (LatentCache: up front, or the first time a batch needs it
when ``ctx.latents_on_first_use``; the VAE leaves once every latent is cached), and encode
every caption once while the text encoder is frozen (TextCache). When BASE is among the blocks
the text encoder gets network modules and captions are encoded live every step so those
modules train.
"""

from __future__ import annotations

import torch

from trainer.conditioning import Conditioning, sdxl_time_ids
from trainer.data.cache import LatentCache, TextCache
from trainer.training.losses import add_noise, diffusion_loss, make_noise, sample_timesteps, training_target
from trainer.modes.base import ModeContext, TrainTask, build_network, release_unused, to_device, unet_forward


def prepare_images(cfg, ctx: ModeContext):
    """Discover, plan and cache the images of ``cfg.lora_data_directory``."""
    from trainer.data.images import discover_images
    from trainer.data.buckets import plan_samples

    planned = ctx.extras.get("data_plan", {}).get("lora")  # found and probed before the model loaded
    if planned is not None:
        items, specs = planned
    else:
        items = discover_images(cfg.lora_data_directory, trigger_word=cfg.lora_trigger_word,
                                use_filename_as_tag=cfg.image_use_filename_as_tag)
        specs = plan_samples(
            items, cfg.image_size, cfg.image_buckets_step, cfg.image_min_length, cfg.image_max_ratio,
            sub_image_num=cfg.sub_image_num, mirroring=cfg.image_mirroring,
            disable_upscale=cfg.image_disable_upscale,
        )
    if not specs:
        raise ValueError(f"no usable images in {cfg.lora_data_directory} (all were skipped; see the warnings above)")
    used = len({s.item.path for s in specs})
    skipped = f" ({len(items) - used} skipped)" if used < len(items) else ""
    ctx.log(f"{used} images{skipped} -> {len(specs)} training samples in {len({s.bucket for s in specs})} buckets")
    fam = ctx.bundle.family
    every = max(1, len(specs) // 10)

    def progress(done: int, total: int) -> None:
        if done == total or done % every == 0:
            ctx.log(f"caching latents {done}/{total}" + (" (all cached)" if done == total and lazy else ""))

    lazy = ctx.latents_on_first_use
    cache = LatentCache(ctx.bundle.vae, specs, scale=fam.latent_scale, shift=fam.latent_shift,
                        disk_dir=ctx.cache_dir if cfg.cache_latents_to_disk else None,
                        vae_id=str(ctx.bundle.source), warn=lambda m: ctx.log(f"warning: {m}"), progress=progress)
    if lazy:
        ctx.log(f"latents: {len(specs)} to cache, each the first time a batch needs it (training starts now)")
    else:
        cache.build()
    return items, specs, cache


class LoraTask(TrainTask):
    """One LoRA-mode training pass over a bucketed, cached image set."""

    def __init__(self, cfg, ctx: ModeContext, *, specs, cache: LatentCache, network, prompts=None):
        from trainer.data.buckets import BucketBatcher, group_by_bucket

        self.config, self.ctx, self.network = cfg, ctx, network
        self.specs, self.cache = specs, cache
        self.prompts = prompts if prompts is not None else [s.item.prompt for s in specs]
        self.train_te = bool(network.te_modules)
        # Flux training one of its two encoders: the other's output is cached and it can leave
        trained = sorted({m.block for m in network.te_modules})
        self.live_encoder = trained[0] if ctx.bundle.family.name == "flux" and len(trained) == 1 else None
        cache_text = not self.train_te or self.live_encoder is not None
        self.text = TextCache(ctx.encoder).build(self.prompts) if cache_text else None
        groups = group_by_bucket(specs)
        self.batcher = BucketBatcher(groups, cfg.train_batch_size,
                                     num_multiply=cfg.image_num_multiply, seed=cfg.train_seed)
        self._iter = iter(self.batcher)
        self._vae_gone = cache.complete  # the job released it already when caching came first

    @property
    def epoch(self):
        return self.batcher.epoch

    def param_groups(self) -> list[dict]:
        te_lr = self.config.train_textencoder_learning_rate or self.config.train_learning_rate
        return self.network.param_groups(unet_lr=self.config.train_learning_rate, te_lr=te_lr)

    def _batch(self) -> list[int]:
        return next(self._iter)

    def conditioning(self, idx: list[int]):
        prompts = [self.prompts[i] for i in idx]
        if self.live_encoder is not None:  # the trained encoder's share fresh, the frozen one's cached
            cached, fresh = self.text.get(prompts), self.ctx.encoder.flux_part(prompts, self.live_encoder)
            return Conditioning(cached.hidden, fresh) if self.live_encoder == "CLIP" else \
                Conditioning(fresh, cached.pooled)
        if self.train_te:
            return self.ctx.encoder.encode(prompts)
        return self.text.get(prompts)

    def compute_loss(self, step: int) -> torch.Tensor:
        cfg, ctx, bundle = self.config, self.ctx, self.ctx.bundle
        idx = self._batch()
        latents = to_device(torch.stack(self.cache.get(idx)), ctx.device)
        if self.cache.complete and not self._vae_gone:
            self._vae_gone = True
            release_unused(ctx, vae=True)  # every latent is cached
        noise = make_noise(latents, cfg.train_noise_offset)
        sched = bundle.noise_scheduler
        t = sample_timesteps(len(idx), cfg.train_min_timesteps, cfg.train_max_timesteps,
                             fixed_in_batch=cfg.train_fixed_timsteps_in_batch, device=ctx.device,
                             scheduler=sched, latent_hw=tuple(latents.shape[-2:]))
        noisy = add_noise(sched, latents, noise, t)
        cond = self.conditioning(idx)
        time_ids = None
        if bundle.family.name == "sdxl":
            time_ids = torch.cat([
                sdxl_time_ids(s.original_size, s.crop_top_left, (s.bucket[1], s.bucket[0]))
                for s in (self.specs[i] for i in idx)
            ])
        target = training_target(sched, latents, noise, t, bundle.prediction_type)
        noisy, t, target, cond, time_ids = (ctx.shard(v) for v in (noisy, t, target, cond, time_ids))
        pred = unet_forward(bundle, noisy, t, cond.to(ctx.device), time_ids)
        return diffusion_loss(pred, target, t, scheduler=sched, kind=cfg.train_loss_function,
                              snr_gamma=cfg.train_snr_gamma)

    def metadata(self) -> dict:
        """``ss_tag_frequency`` of the images this pass trains on (sd-scripts' per-folder shape)."""
        from trainer.data.images import tag_frequency

        return {"ss_tag_frequency": tag_frequency([s.item for s in self.specs], self.config.lora_data_directory)}

    def state_dict(self) -> dict:
        return {"batcher": self.batcher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state["batcher"])
        self._iter = iter(self.batcher)


def build_tasks(cfg, ctx: ModeContext):
    """LoRA mode has one pass."""
    _, specs, cache = prepare_images(cfg, ctx)
    if cache.complete:
        release_unused(ctx, vae=True)
    net = build_network(cfg, ctx)
    ctx.log(f"network: {len(net.unet_modules)} U-Net modules, {len(net.te_modules)} text-encoder modules")
    task = LoraTask(cfg, ctx, specs=specs, cache=cache, network=net)
    if not task.train_te:
        release_unused(ctx, vae=False, text_encoders=True)  # captions are cached
    elif task.live_encoder is not None:  # Flux: the frozen encoder's outputs are cached
        from trainer.conditioning import FLUX_ENCODERS

        release_unused(ctx, vae=False, text_encoders=True, keep_encoder=FLUX_ENCODERS.index(task.live_encoder))
        ctx.log(f"the frozen {'T5' if task.live_encoder == 'CLIP' else 'CLIP'} text encoder's outputs are cached; "
                f"only {task.live_encoder} encodes at every step")
    yield task
