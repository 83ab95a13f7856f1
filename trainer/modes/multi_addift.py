"""Multi-ADDifT data: a folder of original/target pairs, bucketed and cached (SPEC.md §4.5).

Pairs are matched by ``diff_target_name`` (``image1.png`` with ``image1_closed_eyes.png``);
unmatched files are reported by name. Both images of a pair get the same bucket, crop and
flip. Each image keeps its own caption: the original's conditions the base prediction, the
target's the network prediction. With ``diff_use_diff_mask`` the loss is restricted to where
the pair really differs (the pixel difference mask the reference computes and then drops),
intersected with the images' alpha masks.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.conditioning import sdxl_time_ids
from trainer.data.cache import TextCache, encode_latents_mean, mask_to_latent
from trainer.modes.base import ModeContext


class _Latents:
    def __init__(self):
        self.latents: list[torch.Tensor] = []


@torch.no_grad()
def prepare_pairs(cfg, ctx: ModeContext) -> dict:
    from trainer.data.buckets import BucketBatcher, group_by_bucket
    from trainer.data.pairs import difference_mask, find_pairs, plan_pair_samples

    planned = ctx.extras.get("data_plan", {}).get("pairs")  # found and probed before the model loaded
    scan = planned[0] if planned is not None else find_pairs(cfg.lora_data_directory, cfg.diff_target_name)
    if scan.unmatched:
        names = ", ".join(p.name for p in scan.unmatched[:10])
        more = f" and {len(scan.unmatched) - 10} more" if len(scan.unmatched) > 10 else ""
        ctx.log(f"not part of a pair (ignored): {names}{more}")
    specs = planned[1] if planned is not None else plan_pair_samples(
        scan.pairs, cfg.image_size, cfg.image_buckets_step, cfg.image_min_length, cfg.image_max_ratio,
        sub_image_num=cfg.sub_image_num, mirroring=cfg.image_mirroring,
        disable_upscale=cfg.image_disable_upscale, trigger_word=cfg.lora_trigger_word,
        use_filename_as_tag=cfg.image_use_filename_as_tag,
    )
    if not specs:
        raise ValueError(f"no usable image pairs in {cfg.lora_data_directory}")
    ctx.log(f"{len(scan.pairs)} pairs -> {len(specs)} training samples")
    bundle, fam = ctx.bundle, ctx.bundle.family
    orig, target, masks, time_ids = _Latents(), _Latents(), [], []
    for spec in specs:
        px_o, px_t, m_o, m_t = spec.load()
        z_o = encode_latents_mean(bundle.vae, torch.from_numpy(px_o)[None], fam.latent_scale, fam.latent_shift)
        z_t = encode_latents_mean(bundle.vae, torch.from_numpy(px_t)[None], fam.latent_scale, fam.latent_shift)
        orig.latents.append(z_o[0].float().cpu())
        target.latents.append(z_t[0].float().cpu())
        mask = difference_mask(px_o, px_t)
        for alpha in (m_o, m_t):
            if alpha is not None:
                mask = mask * alpha
        masks.append(mask_to_latent(np.maximum(mask, 0), tuple(z_o.shape[-2:])))
        time_ids.append(sdxl_time_ids(spec.original_size, spec.crop_top_left, (spec.bucket[1], spec.bucket[0])))
    prompts_o = [s.orig.prompt for s in specs]
    prompts_t = [s.target.prompt for s in specs]
    batcher = BucketBatcher(group_by_bucket(specs), cfg.train_batch_size,
                            num_multiply=cfg.image_num_multiply, seed=cfg.train_seed)
    return {"orig": orig, "target": target, "masks": masks, "time_ids": time_ids,
            "prompts_o": prompts_o, "prompts_t": prompts_t,
            "text": TextCache(ctx.encoder).build(prompts_o + prompts_t),
            "batcher": batcher, "iter": iter(batcher), "specs": specs}
