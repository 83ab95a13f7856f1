"""Measure the activation memory of one U-Net / text-encoder training step (the data behind trainer/training/memory/estimate.py).

    python bench/calibrate_memory.py                    # SD1.5 fp32 and bf16, checkpointing off/on
    python bench/calibrate_memory.py --family sdxl --precision bf16 --resolutions 64,128

Every point runs in a fresh process: the full-size U-Net of the shipped config (random weights,
no file needed) gets a lierla Full rank-16 network; the script then records the resident memory
before one forward + backward and the peak during it (Linux ``VmHWM``, reset right before the
step). Their difference is the step's working memory: saved activations, gradients in flight
and the allocator's slack, which is what the estimate must predict. ``bf16`` runs the step
under CPU autocast with bf16 weights, the closest a CPU comes to a GPU's fp16/bf16 run.

Printed per point: bytes per latent cell per sample (the coefficient trainer/training/memory/estimate.py uses).
``--text-encoder`` measures the text encoder(s) the same way, per prompt (77 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import run_point, vm_kb  # noqa: E402




def _random_module(module, dtype):
    """Real memory for a meta-built module, filled with small random values (no file needed)."""
    import torch

    module = module.to(dtype=dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.zero_()
            elif name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1])[None])
    return module.requires_grad_(False)


def _bundle(family: str, dtype, with_te: bool):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from trainer.bundle import ModelBundle
    from trainer.families import get_family
    from trainer.hosts.components import TEXT_ENCODERS, read_json, shipped_config_dir
    from trainer.hosts.ldm_convert import text_encoder_class

    folder = shipped_config_dir(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json"))
        tes = []
        if with_te:
            for slot in TEXT_ENCODERS[family]:
                config = CLIPTextConfig.from_json_file(str(folder / slot.subfolder / "config.json"))
                tes.append(text_encoder_class(config)(config))
    unet = unet if with_te else _random_module(unet, dtype)  # the text-encoder runs leave it on meta
    tes = [_random_module(te, dtype) for te in tes]
    return ModelBundle(family=get_family(family), unet=unet, vae=None, text_encoders=tes, tokenizers=[],
                       noise_scheduler=None)


def measure_point(family: str, precision: str, resolution: int, batch: int, checkpointing: bool,
                  text_encoder: bool) -> dict:
    """One step's working memory (bytes) in this process."""
    import torch

    from trainer.config.choices import BLOCKID26
    from trainer.conditioning import Conditioning, sdxl_time_ids
    from trainer.modes.base import unet_forward
    from trainer.network.network import NetworkSpec, create_network

    half = precision == "bf16"
    dtype = torch.bfloat16 if half else torch.float32
    bundle = _bundle(family, dtype, text_encoder)
    blocks = ("BASE",) if text_encoder else tuple(b for b in BLOCKID26 if b != "BASE")
    net = create_network(bundle, NetworkSpec(rank=16, alpha=8.0, blocks=blocks, train_text_encoder=text_encoder))
    net.apply_to()
    if checkpointing and not text_encoder:
        bundle.unet.enable_gradient_checkpointing()
        bundle.unet.train()
    cells = (resolution // 8) ** 2
    width = 2048 if family == "sdxl" else (1024 if family == "sd2" else 768)
    ids = torch.randint(0, 49000, (batch, 77))
    noisy = torch.randn(batch, 4, resolution // 8, resolution // 8, dtype=dtype)
    cond = Conditioning(torch.randn(batch, 77, width, dtype=dtype),
                        torch.randn(batch, 1280, dtype=dtype) if family == "sdxl" else None)
    before = vm_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        if text_encoder:
            outs = [te(ids, output_hidden_states=True).hidden_states[-2] for te in bundle.text_encoders]
            loss = sum(o.float().pow(2).mean() for o in outs)
        else:
            size = (resolution, resolution)
            loss = unet_forward(bundle, noisy, torch.tensor([500] * batch), cond,
                                sdxl_time_ids(size, (0, 0), size)).float().pow(2).mean()
    loss.backward()
    peak = vm_kb("VmHWM")
    return {"family": family, "precision": precision, "resolution": resolution, "batch": batch,
            "checkpointing": checkpointing, "text_encoder": text_encoder,
            "step_bytes": (peak - before) * 1024, "per_cell": (peak - before) * 1024 / (cells * batch),
            "per_prompt": (peak - before) * 1024 / batch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl"))
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--resolutions", default="64,128,192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--text-encoder", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure_point(**json.loads(args.point))))
        return 0
    resolutions = [64] if args.text_encoder else [int(r) for r in args.resolutions.split(",")]
    for precision in args.precision.split(","):
        for ckpt in ["off"] if args.text_encoder else args.checkpointing.split(","):
            for res in resolutions:
                point = dict(family=args.family, precision=precision, resolution=res, batch=args.batch,
                             checkpointing=ckpt == "on", text_encoder=args.text_encoder)
                r = run_point(__file__, point, args.threads)
                if r is None:
                    return 1
                what = "per prompt" if args.text_encoder else f"{res} px: per latent cell"
                value = r["per_prompt"] if args.text_encoder else r["per_cell"]
                print(f"{args.family} {precision} checkpointing {ckpt} batch {args.batch} {what}: "
                      f"{value / 1024:.1f} KiB (step {r['step_bytes'] / 2**20:.0f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
