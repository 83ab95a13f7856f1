"""The two trainers of the benchmark, each run inside its own child process.

``run_ours`` trains with TrainTrain's ``run_job`` on the settings of ``presets/LoRA.json`` (what a
user starts from), changing only what both trainers must share.

``run_baseline`` is the loop of diffusers' example ``examples/text_to_image/train_text_to_image_lora.py``
(SDXL: ``train_text_to_image_lora_sdxl.py``) built from registry packages only: the pipeline from
``from_single_file`` (offline, configs from the shipped folder), a PEFT adapter from
``add_adapter(LoraConfig(..., init_lora_weights="gaussian"))``, and per step: VAE encode
(``latent_dist.sample() * scaling_factor``), text-encoder forward, ``randn_like`` noise, uniform
random timesteps, ``add_noise``, UNet forward, MSE in float with Min-SNR weighting, backward,
AdamW step, ``zero_grad``. Module coverage is matched to ours (see ``UNET_TARGETS``), and since the
preset trains the text encoder (BASE is among its blocks) the baseline adds an adapter to the text
encoder(s) as diffusers' DreamBooth-LoRA example does with ``--train_text_encoder``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from common import ROOT, BenchSpec, Meter, Measurement, read_images

# lierla "Full" wraps every Linear / Conv2d inside the UNet's Transformer2DModels; these PEFT
# target names are exactly that set (checked against our module count in the child).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
# Ours wraps every Linear of the CLIP attention and MLP blocks.
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def ours_config(spec: BenchSpec):
    """presets/LoRA.json with only the shared values changed."""
    from trainer.config import TrainConfig

    values = json.loads((ROOT / "presets" / "LoRA.json").read_text(encoding="utf-8"))
    blocks_key = "network_blocks(BASE = TextEncoder)"
    if not spec.train_text_encoder:
        values[blocks_key] = [b for b in values[blocks_key] if b != "BASE"]
    values.update({
        "model": spec.checkpoint, "lora_data_directory": spec.data_dir,
        "image_size(height, width)": str(spec.resolution),
        "image_min_length": str(min(spec.resolution, int(values["image_min_length"]))),
        "train_iterations": str(spec.steps), "train_batch_size": str(spec.batch),
        "network_rank": str(spec.rank), "network_alpha": str(spec.alpha),
        "train_learning_rate": str(spec.lr), "train_optimizer": "AdamW", "train_seed": str(spec.seed),
        "save_lora_name": "bench_ours", "save_overwrite": True, "memory_profile": spec.memory_profile,
    })
    if not spec.half:  # fp16 weights on a CPU are not what anyone trains with
        values.update({"train_model_precision": "fp32", "save_precision": "fp32"})
    return TrainConfig.from_dict(values)


def run_ours(spec: BenchSpec) -> Measurement:
    import torch

    from trainer.hosts.standalone import StandaloneHost
    from trainer.training.control import TrainControl
    from trainer.training.job import run_job

    config = ours_config(spec)
    meter = Meter("TrainTrain" if spec.memory_profile == "speed" else f"TrainTrain {spec.memory_profile}", spec.device)
    work = Path(spec.work_dir) / "ours"
    host = StandaloneHost(output_dir=work / "output", config_dir=spec.config_dir or None)
    found = {}

    def on_progress(event) -> None:
        if not event.message and event.step > 0:
            meter.step_done(event.loss)

    def log(message: str) -> None:
        if message.startswith("network:"):
            found["modules"] = message
    meter.start()
    run_job(config, host=host, output_dir=work / "output", logs_dir=work / "logs", device=torch.device(spec.device),
            control=TrainControl(on_progress=on_progress, on_log=log))
    m = meter.finish()
    m.notes.append(found.get("modules", ""))
    m.modules, m.trainable_params = _our_network_size(config, spec)
    _add_estimate(m, config, spec)
    return m


def _add_estimate(m: Measurement, config, spec: BenchSpec) -> None:
    """trainer/training/memory/estimate.py's estimate of this run, to print next to the measured peak."""
    from trainer.training.memory import profiles
    from trainer.training.memory.estimate import estimate_peak, free_device_memory

    held = Path(spec.checkpoint).stat().st_size if not spec.half else 0  # the loader holds the file on CPU
    est = estimate_peak(config, spec.family, spec.device, checkpoint_bytes=held)
    est = profiles.plan(config, est, spec.device, free_device_memory(spec.device)).estimate  # the profile's
    m.estimate_mb, m.estimate_phase = est.total / 2**20, est.phase


def _our_network_size(config, spec: BenchSpec) -> tuple[int, int]:
    """Module and parameter count of the network ``config`` builds (on the meta device: free)."""
    from trainer.hosts.meta import meta_bundle
    from trainer.network.network import NetworkSpec, create_network

    net = create_network(meta_bundle(spec.family), NetworkSpec(
        network_type=config.network_type, rank=spec.rank, alpha=spec.alpha, element=config.network_element,
        blocks=list(config.network_blocks), train_text_encoder="BASE" in list(config.network_blocks)))
    return len(net.all_modules), sum(p.numel() for p in net.parameters())


def _tokenizers(family: str):
    from transformers import CLIPTokenizer

    from trainer.hosts.components import TOKENIZER_FILES

    vocab, merges = str(TOKENIZER_FILES / "vocab.json"), str(TOKENIZER_FILES / "merges.txt")
    first = CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="<|endoftext|>")
    if family == "sdxl":
        return {"tokenizer": first, "tokenizer_2": CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!")}
    return {"tokenizer": first}


def _load_pipeline(spec: BenchSpec):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if spec.family == "sdxl" else StableDiffusionPipeline
    extra = {} if spec.family == "sdxl" else {"safety_checker": None, "feature_extractor": None,
                                                  "requires_safety_checker": False}
    return cls.from_single_file(spec.checkpoint, config=str(_config_dir(spec)),
                                local_files_only=True, **_tokenizers(spec.family), **extra)


def _config_dir(spec: BenchSpec) -> Path:
    from trainer.hosts.components import shipped_config_dir

    return Path(spec.config_dir) if spec.config_dir else shipped_config_dir(spec.family)


def _pixels(spec: BenchSpec):
    """The images as the example's transforms give them: resize, crop, to [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for path, caption in read_images(Path(spec.data_dir)):
        img = Image.open(path).convert("RGB").resize((spec.resolution, spec.resolution), Image.BILINEAR)
        arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
        out.append((arr * 2 - 1, caption))
    return out


def _encode_sdxl(text_encoders, tokenizers, captions, device):
    """The SDXL example's encode_prompt: penultimate states of both encoders, pooled from the second."""
    import torch

    embeds, pooled = [], None
    for tok, te in zip(tokenizers, text_encoders):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    return torch.cat(embeds, dim=-1), pooled.view(len(captions), -1)


def run_baseline(spec: BenchSpec) -> Measurement:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft import LoraConfig, inject_adapter_in_model

    from trainer.hosts.components import read_json

    meter = Meter("diffusers+PEFT", spec.device)
    device = torch.device(spec.device)
    weight_dtype = torch.float16 if spec.half else torch.float32
    sdxl = spec.family == "sdxl"
    meter.start()
    pipe = _load_pipeline(spec)
    noise_scheduler = DDPMScheduler.from_config(read_json(_config_dir(spec) / "scheduler" / "scheduler_config.json"))
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
    del pipe
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32 if sdxl else weight_dtype)  # the SDXL example keeps its VAE in fp32
    for te in text_encoders:
        te.to(device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    trained = [unet]
    if spec.train_text_encoder:
        for te in text_encoders:
            # transformers' ``te.add_adapter`` wraps exactly this call but demands peft >= 0.22.
            inject_adapter_in_model(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                                               target_modules=TE_TARGETS), te)
            te.train()
        trained += text_encoders
    if spec.half:
        cast_training_params(trained, dtype=torch.float32)
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    meter.m.trainable_params = sum(p.numel() for p in params)
    meter.m.modules = sum(1 for m in trained for n, _ in m.named_modules() if n.endswith(".lora_A"))
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda") if spec.half else None
    data = _pixels(spec)
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    order: list[int] = []
    snr_gamma = 5.0  # the preset's train_snr_gamma
    for _ in range(spec.steps):
        if len(order) < spec.batch:
            order += rng.sample(range(len(data)), len(data))
        idx, order = order[:spec.batch], order[spec.batch:]
        pixels = torch.stack([data[i][0] for i in idx]).to(device, dtype=vae.dtype)
        captions = [data[i][1] for i in idx]
        # As in the examples, only the trained modules run under autocast; the VAE runs at its own dtype.
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(weight_dtype)
        with torch.autocast(device.type, dtype=torch.float16, enabled=spec.half):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),),
                                      device=device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            kwargs = {}
            if sdxl:
                hidden, pooled = _encode_sdxl(text_encoders, tokenizers, captions, device)
                size = (spec.resolution, spec.resolution)
                time_ids = torch.tensor([list(size + (0, 0) + size)] * len(idx), device=device, dtype=weight_dtype)
                kwargs["added_cond_kwargs"] = {"time_ids": time_ids, "text_embeds": pooled}
            else:
                ids = tokenizers[0](captions, max_length=77, padding="max_length", truncation=True,
                                    return_tensors="pt").input_ids.to(device)
                hidden = text_encoders[0](ids, return_dict=False)[0]
            pred = unet(noisy, timesteps, hidden, return_dict=False, **kwargs)[0]
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        meter.step_done(loss.item())
    return meter.finish()
