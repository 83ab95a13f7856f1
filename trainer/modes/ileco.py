"""iLECO: make the model answer the original prompt the way it answers the target prompt.

One step (SPEC.md §4.2): pure noise X is the noisy latent; the base model's prediction for
the target prompt (network off, no gradient) is the target for the network-on prediction for
the original prompt. A blank target prompt means the empty prompt, which erases the concept.

Changes from the reference, on purpose: X is drawn afresh every step (the reference reuses one
draw for the whole run, which fits the network to a single noise image), the latent shape
keeps the (height, width) order of ``image_size``, and no text-encoder modules are created
(they would never train in this mode and would only be saved as zeros).
"""

from __future__ import annotations

import torch

from trainer.conditioning import sdxl_time_ids
from trainer.training.losses import diffusion_loss, sample_timesteps
from trainer.modes.base import ModeContext, build_network, release_unused, repeat_cond, unet_forward


class IlecoTask:
    name = "main"
    epoch = None

    def __init__(self, cfg, ctx: ModeContext, network):
        if not (cfg.original_prompt or "").strip():
            raise ValueError("iLECO needs an original prompt: the concept the network should change")
        self.config, self.ctx, self.network = cfg, ctx, network
        with torch.no_grad():
            self.c_orig = ctx.encoder.encode([cfg.original_prompt]).to(ctx.device)
            self.c_target = ctx.encoder.encode([cfg.target_prompt or ""]).to(ctx.device)
        h, w = cfg.image_size
        f = ctx.bundle.vae_scale_factor
        self.latent_shape = (int(cfg.train_batch_size), ctx.bundle.unet.config.in_channels, h // f, w // f)
        self.time_ids = sdxl_time_ids((h, w), (0, 0), (h, w))

    def param_groups(self) -> list[dict]:
        lr = self.config.train_learning_rate
        return self.network.param_groups(unet_lr=lr, te_lr=lr)

    def compute_loss(self, step: int) -> torch.Tensor:
        cfg, ctx, bundle = self.config, self.ctx, self.ctx.bundle
        b = self.latent_shape[0]
        x = torch.randn(self.latent_shape, dtype=torch.float32).to(ctx.device)
        t = sample_timesteps(b, int(cfg.train_min_timesteps), int(cfg.train_max_timesteps),
                             fixed_in_batch=False, device=ctx.device)
        x, t = ctx.shard(x), ctx.shard(t)
        b = x.shape[0]
        with torch.no_grad():
            self.network.multiplier = 0.0
            target = unet_forward(bundle, x, t, repeat_cond(self.c_target, b), self.time_ids)
        self.network.multiplier = 1.0
        pred = unet_forward(bundle, x, t, repeat_cond(self.c_orig, b), self.time_ids)
        return diffusion_loss(pred, target, t, scheduler=bundle.noise_scheduler,
                              kind=cfg.train_loss_function, snr_gamma=float(cfg.train_snr_gamma))

    def metadata(self) -> dict:
        return {"traintrain_original_prompt": self.config.original_prompt,
                "traintrain_target_prompt": self.config.target_prompt}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_tasks(cfg, ctx: ModeContext):
    net = build_network(cfg, ctx, train_text_encoder=False)
    ctx.log(f"network: {len(net.unet_modules)} U-Net modules")
    task = IlecoTask(cfg, ctx, net)
    release_unused(ctx, vae=True, text_encoders=True)  # both prompts are encoded
    yield task
