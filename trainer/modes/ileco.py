"""iLECO: make the model answer the original prompt the way it answers the target prompt.

One step (SPEC.md §4.2): pure noise X is the noisy latent; the base model's prediction for
the target prompt (network off, no gradient) is the target for the network-on prediction for
the original prompt. A blank target prompt means the empty prompt, which erases the concept.

Changes from the reference, on purpose: X is drawn afresh every step (the reference reuses one
draw for the whole run, which fits the network to a single noise image), the latent shape
keeps the (height, width) order of ``image_size``, and no text-encoder modules are created
(they would never train in this mode and would only be saved as zeros).

``ileco_latents = "trajectory"`` (not in the reference; ``"noise"`` is the default above) is
the formulation of LECO and ESD, in two parts:

- The noisy latent comes from the base model's own denoising trajectory for the original
  prompt: every ``REFRESH_EVERY`` steps the base model (network off) denoises a batch of fresh
  noise with the original prompt in ``TRAJECTORY_STEPS`` deterministic DDIM steps (Euler steps
  of the velocity for flow-matching models), keeping the latent at every step; each training
  step then takes, per sample, the latent of a stored step whose timestep lies in [min, max),
  at that timestep. Pure noise is what the model sees only
  at the very first sampling step; the trajectory's latents are those it meets at every step
  while it draws the prompt.
- The target is guided away from the original prompt: ``e(target) + g * (e(target) - e(orig))``
  with ``g = TARGET_GUIDANCE`` (ESD's negative guidance; base model, network off; noise and
  velocity predictions alike). A web UI applies the network to the unguided half of
  classifier-free guidance too, where a change that does not depend on the prompt cancels out;
  on the tests' tiny world, pure noise with the unguided target erased nothing at weight 1.

The README's iLECO notes give both options' measured effect on the tests' tiny world.
"""

from __future__ import annotations

import torch

from trainer.conditioning import sdxl_time_ids
from trainer.training.losses import diffusion_loss, flow_euler, flow_sigma, is_flow, sample_timesteps
from trainer.modes.base import ModeContext, TrainTask, build_network, release_unused, repeat_cond, unet_forward

TRAJECTORY_STEPS = 20   # DDIM steps of one stored trajectory
REFRESH_EVERY = 10      # training steps between two trajectory batches
TARGET_GUIDANCE = 2.0   # trajectory: the target is pushed this far away from the original prompt


class IlecoTask(TrainTask):

    def __init__(self, cfg, ctx: ModeContext, network):
        if not (cfg.original_prompt or "").strip():
            raise ValueError("iLECO needs an original prompt: the concept the network should change")
        self.config, self.ctx, self.network = cfg, ctx, network
        with torch.no_grad():
            self.c_orig = ctx.encoder.encode([cfg.original_prompt]).to(ctx.device)
            self.c_target = ctx.encoder.encode([cfg.target_prompt or ""]).to(ctx.device)
        h, w = cfg.image_size
        f = ctx.bundle.vae_scale_factor
        self.latent_shape = (cfg.train_batch_size, ctx.bundle.latent_channels, h // f, w // f)
        self.time_ids = sdxl_time_ids((h, w), (0, 0), (h, w))
        self.latents = cfg.ileco_latents
        self._traj = None  # (timesteps (S,), latents (S, B, C, H, W), step made at)
        self.guidance = TARGET_GUIDANCE if self.latents == "trajectory" else 0.0
        if self.latents == "trajectory":
            ctx.log(f"iLECO latents: the base model's trajectory for the original prompt "
                    f"({TRAJECTORY_STEPS} DDIM steps, new every {REFRESH_EVERY} steps); target guided "
                    f"away from the original prompt at {TARGET_GUIDANCE:g}")

    def param_groups(self) -> list[dict]:
        lr = self.config.train_learning_rate
        return self.network.param_groups(unet_lr=lr, te_lr=lr)

    def compute_loss(self, step: int) -> torch.Tensor:
        cfg, ctx, bundle = self.config, self.ctx, self.ctx.bundle
        b = self.latent_shape[0]
        if self.latents == "trajectory":
            x, t = self._trajectory_latents(step)
        else:
            x = torch.randn(self.latent_shape, dtype=torch.float32).to(ctx.device)
            t = sample_timesteps(b, cfg.train_min_timesteps, cfg.train_max_timesteps,
                                 fixed_in_batch=False, device=ctx.device, scheduler=bundle.noise_scheduler,
                                 latent_hw=self.latent_shape[-2:])
        x, t = ctx.shard(x), ctx.shard(t)
        b = x.shape[0]
        with torch.no_grad():
            self.network.multiplier = 0.0
            target = unet_forward(bundle, x, t, repeat_cond(self.c_target, b), self.time_ids)
            if self.guidance:
                base = unet_forward(bundle, x, t, repeat_cond(self.c_orig, b), self.time_ids)
                target = target + self.guidance * (target - base)
        self.network.multiplier = 1.0
        pred = unet_forward(bundle, x, t, repeat_cond(self.c_orig, b), self.time_ids)
        return diffusion_loss(pred, target, t, scheduler=bundle.noise_scheduler,
                              kind=cfg.train_loss_function, snr_gamma=cfg.train_snr_gamma)

    def _timestep_grid(self) -> torch.Tensor:
        """The trajectory's timesteps: from the last one (999) down to the range's low end."""
        last = int(self.ctx.bundle.noise_scheduler.config.num_train_timesteps) - 1
        return torch.linspace(last, min(int(self.config.train_min_timesteps), last), TRAJECTORY_STEPS).round().long()

    @torch.no_grad()
    def _make_trajectory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic DDIM (eta 0) from fresh noise with the original prompt, network off;
        the latent before every step. Written out here so it uses the run's own noise schedule
        (zero-terminal-SNR rescaling included) and prediction type."""
        ctx, bundle = self.ctx, self.ctx.bundle
        if is_flow(bundle.noise_scheduler):
            return self._make_flow_trajectory()
        acp = bundle.noise_scheduler.alphas_cumprod.to(ctx.device, torch.float32)
        grid = self._timestep_grid()
        x = torch.randn(self.latent_shape, dtype=torch.float32).to(ctx.device)
        b = x.shape[0]
        cond = repeat_cond(self.c_orig, b)
        self.network.multiplier = 0.0
        kept = []
        for i, t in enumerate(grid.tolist()):
            kept.append(x)
            tt = torch.full((b,), t, device=ctx.device, dtype=torch.long)
            out = unet_forward(bundle, x, tt, cond, self.time_ids).float()
            a = acp[t]
            if bundle.prediction_type == "v_prediction":
                x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
            else:
                x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
            a_prev = acp[grid[i + 1]] if i + 1 < len(grid) else torch.ones((), device=ctx.device)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return grid.to(ctx.device), torch.stack(kept)

    @torch.no_grad()
    def _make_flow_trajectory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-matching models: Euler steps of the velocity (the flow scheduler's own step),
        from σ = 1 down the same timestep grid, network off."""
        ctx, bundle = self.ctx, self.ctx.bundle
        sched = bundle.noise_scheduler
        grid = self._timestep_grid()
        x = torch.randn(self.latent_shape, dtype=torch.float32).to(ctx.device)
        b = x.shape[0]
        cond = repeat_cond(self.c_orig, b)
        self.network.multiplier = 0.0
        kept = []
        sigmas = flow_sigma(sched, grid.float()).tolist() + [0.0]
        steps = grid.tolist()

        def velocity(x, i):
            tt = torch.full((b,), steps[i], device=ctx.device, dtype=torch.long)
            return unet_forward(bundle, x, tt, cond, self.time_ids).float()

        flow_euler(x, sigmas, velocity, on_step=lambda i, latent: kept.append(latent))
        return grid.to(ctx.device), torch.stack(kept)

    def _trajectory_latents(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, a stored trajectory latent and its timestep, in [min, max)."""
        if self._traj is None or step - self._traj[2] >= REFRESH_EVERY or step < self._traj[2]:
            grid, lat = self._make_trajectory()
            self._traj = (grid, lat, step)
        grid, lat, _ = self._traj
        lo, hi = int(self.config.train_min_timesteps), int(self.config.train_max_timesteps)
        allowed = torch.nonzero((grid >= lo) & (grid < hi)).flatten()
        if allowed.numel() == 0:  # a range narrower than the grid's spacing: its nearest step
            allowed = torch.argmin((grid - (lo + hi) // 2).abs()).view(1)
        b = lat.shape[1]
        pick = allowed[torch.randint(0, allowed.numel(), (b,))].to(lat.device)
        return lat[pick, torch.arange(b, device=lat.device)], grid[pick]

    def metadata(self) -> dict:
        meta = {"traintrain_original_prompt": self.config.original_prompt,
                "traintrain_target_prompt": self.config.target_prompt}
        if self.latents != "noise":
            meta["traintrain_ileco_latents"] = self.latents
        return meta

    def state_dict(self) -> dict:
        return {} if self._traj is None else {"trajectory": self._traj}

    def load_state_dict(self, state: dict) -> None:
        self._traj = state.get("trajectory")


def build_tasks(cfg, ctx: ModeContext):
    net = build_network(cfg, ctx)
    ctx.log(f"network: {len(net.unet_modules)} U-Net modules")
    task = IlecoTask(cfg, ctx, net)
    release_unused(ctx, vae=True, text_encoders=True)  # both prompts are encoded
    yield task
