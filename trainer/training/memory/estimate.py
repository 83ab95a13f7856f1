"""Peak-memory planning: what a run will need on its device, before it starts.

``estimate_peak(config, model, device)`` adds up, for each phase of a run, the bytes that are
alive together and returns the largest phase as a :class:`MemoryEstimate`:

- loading (CPU only, and only when ``checkpoint_bytes`` is given): a loader that maps the whole
  file (``.ckpt``) holds the file's tensors while it builds the fp32 modules;
- caching latents: every frozen module, plus one VAE encode at the largest bucket;
- training: the frozen modules that stay (the VAE and an untrained text encoder leave only when
  the trainer frees them: ``free_after_caching``; a mode that encodes latents on first use keeps
  the VAE through the first epoch: ``vae_in_training``), the network's parameters, gradients and
  optimizer state, and the working memory of one forward + backward at the largest bucket.

Working memory is ``intercept + slope x latent cells x batch`` for the U-Net and an amount per
prompt for trained text encoders. For the flow-matching transformers (Flux.1, Z-Image) it is built
from their blocks: what each block keeps for the backward (``kept``, times the block count) plus the
transient of the one block the backward works on, each ``a + b x tokens x batch`` (``BLOCK_STEP``,
below: CPU-measured, not yet checked on a GPU). The coefficients were measured with
``bench/calibrate_memory.py`` on the full-size architectures (CPU, one forward + backward with a
lierla Full network: peak resident memory minus the memory before the step). The ``half`` rows
come from bf16 CPU-autocast runs; they are the best figure available for fp16/bf16 GPU runs
until a GPU calibration replaces them. They were measured up to 256 px (SD1.5) and 192 px
(SDXL), where they are close to linear in the cell count; larger buckets are extrapolated.

Hand-written because no library covers it: accelerate's ``estimate-memory`` counts a model's
weights only (from a hub repository), not the frozen/trainable split, optimizer state or the
activations of a training step. No weights are needed here: a family name is enough (parameter counts of the shipped configs; the
network's modules are found on a meta-device copy of the architecture). Suggestions, the
printed summary and the out-of-memory message live in ``trainer/training/memory/advice.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from trainer.config.choices import TEXT_ENCODER_IDS

MiB = 2**20
GiB = 2**30

# Parameters of the shipped full-size configs (tests/test_standalone_full_size.py checks SD's;
# tests/test_memory_dit.py counts Flux's and Z-Image's on the meta device). "unet" is the denoiser: the
# U-Net, or the transformer of Flux.1 (dev; schnell has no guidance embedding) and Z-Image. Text
# encoders: CLIP-L (+ OpenCLIP-bigG for SDXL; + T5-XXL encoder for Flux), Qwen3-4B for Z-Image.
PARAMS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoders": (123_060_480,)},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoders": (340_387_840,)},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoders": (123_060_480, 694_659_840)},
    "flux": {"unet": 11_901_408_320, "vae": 83_819_683, "text_encoders": (123_060_480, 4_762_310_656)},
    "flux-schnell": {"unet": 11_891_178_560, "vae": 83_819_683, "text_encoders": (123_060_480, 4_762_310_656)},
    "zimage": {"unet": 6_154_908_736, "vae": 83_819_683, "text_encoders": (4_022_468_096,)},
}
# Names of PARAMS that are a variant of a family: the variant's name -> the family's.
VARIANTS = {"flux-schnell": "flux"}
# U-Net step working memory, (family, half precision, gradient checkpointing) -> (MiB, MiB per latent
# cell and sample). SD2 shares SD1's layout. SDXL fp32 rows are its bf16 rows scaled as SD1.5's scale.
UNET_STEP = {
    ("sd1", False, False): (180.0, 0.72), ("sd1", False, True): (160.0, 0.43),
    ("sd1", True, False): (190.0, 0.353), ("sd1", True, True): (235.0, 0.104),
    ("sdxl", True, False): (410.0, 0.434), ("sdxl", True, True): (335.0, 0.0625),
    ("sdxl", False, False): (820.0, 0.885), ("sdxl", False, True): (670.0, 0.26),
}
# Flow-matching transformers (Flux.1, Z-Image): their blocks, the tokens of a step and each block's
# working memory. A step's sequence is the image tokens (one per 16x16 pixels: the VAE's 8x and the
# 2x2 patches) plus the text tokens: Flux's T5 context is always padded to 512
# (conditioning.FLUX_T5_LENGTH); Z-Image takes a caption's real tokens, at most 512
# (conditioning.ZIMAGE_TEXT_LENGTH), and the estimate takes the most.
DIT_BLOCKS = {"flux": (("flux double", 19), ("flux single", 38)), "zimage": (("zimage layer", 30),)}
DIT_TEXT_TOKENS = {"flux": 512, "zimage": 512}
DIT_PATCH_PX = 16
DIT_WIDTH = {"flux": 3072, "zimage": 3840}  # the token stream's width
# Elements of a block's largest Linear weight (Flux: a single block's proj_out, 15360 -> 3072; Z-Image:
# feed_forward.w1/w3, 3840 -> 10240): base weights stored smaller are upcast one layer at a time, so a
# step holds at most one such copy; added where a row below was not measured with the same storage.
DIT_LARGEST_LAYER = {"flux": 15360 * 3072, "zimage": 3840 * 10240}
# Working memory of one block's training step: (block kind, half precision, gradient checkpointing,
# fp8 base weights) -> (kept MiB, kept KiB per token, transient MiB, transient KiB per token), per
# sample. "kept": what the block holds from its forward until the backward reaches it (saved
# activations, its output; with checkpointing only its output); "transient": the most the one block
# the backward works on adds on top (with checkpointing its recomputed forward). A model of N blocks
# needs about N x kept + the largest transient.
#
# CPU-derived, not yet checked on a GPU: measured on 2026-12-02 with bench/calibrate_dit_memory.py
# (one full-width block of each kind with random weights and the trainer's lierla rank-16 network;
# forward + backward at 128-512 tokens, batch 1; bytes of the tensors the step creates, counted at
# the aten level), fitted linear in the token count. A GPU allocates the same tensors; its kernels'
# workspaces and the CUDA allocator's rounding are not in these figures (RUNTIME covers some).
# The fp32 rows were measured with the base weights stored in fp8 (upcast per layer, to keep the
# measuring process small): the same activations, plus one layer's upcast copy.
# Fitted intercepts below 0 (all within the fit's error, under 4 MiB) are written as 0.
BLOCK_STEP = {
    ("flux double", True, False, False): (0.0, 213.64, 0.0, 53.02),
    ("flux single", True, False, False): (0.0, 201.74, 0.0, 82.83),
    ("flux double", True, True, False): (0.0, 5.92, 0.0, 266.66),
    ("flux single", True, True, False): (0.0, 5.92, 0.0, 290.49),
    ("zimage layer", True, False, False): (0.0, 385.80, 0.0, 52.50),
    ("zimage layer", True, True, False): (0.0, 7.50, 0.0, 430.80),
    ("flux double", True, True, True): (0.0, 5.92, 79.2, 209.34),
    ("flux single", True, True, True): (0.0, 5.92, 90.8, 201.68),
    ("zimage layer", True, True, True): (0.0, 7.50, 75.9, 355.74),
    # fp32 compute (base weights stored in fp8 while measuring: see above)
    ("flux double", False, False, True): (0.0, 260.98, 184.4, 0.0),  # fit's slope < 0: the largest transient measured
    ("flux single", False, False, True): (0.0, 237.24, 181.0, 70.93),
    ("flux double", False, True, True): (0.0, 11.83, 185.4, 190.97),
    ("flux single", False, True, True): (0.0, 11.83, 180.7, 296.35),
    ("zimage layer", False, False, True): (0.1, 400.80, 150.9, 24.93),
    ("zimage layer", False, True, True): (0.0, 15.00, 150.9, 410.74),
}
# Trained text encoder(s), working memory per prompt (77 tokens) in MiB: (family, half) -> MiB.
TE_STEP = {("sd1", False): 115.0, ("sd1", True): 86.0, ("sd2", False): 259.0, ("sd2", True): 149.0,
           ("sdxl", False): 532.0, ("sdxl", True): 297.0}
# Flux's text encoders one by one (block id, half) -> MiB per prompt: CLIP-L is SD1's text encoder
# (77 tokens, SD1's figures); T5-XXL's encoder at 512 tokens, CPU-measured as BLOCK_STEP on 2026-12-02
# (`bench/calibrate_dit_memory.py --family t5 --tokens 512 --t5-layers 1,2 --checkpointing off`):
# per layer kept 200.4 MiB (bf16) / 268.4 MiB (fp32), 3.9 / 7.9 MiB around the layers, transient
# 58 / 96 MiB; 24 layers x kept + around + transient.
TE_STEP_DIT = {("CLIP", False): 115.0, ("CLIP", True): 86.0,
               ("T5", True): 24 * 200.4 + 3.9 + 58.0, ("T5", False): 24 * 268.4 + 7.9 + 96.0}
# One VAE encode (no gradients, one image): (MiB, MiB per latent cell) in fp32 (measured 128-384 px);
# half-precision VAEs measured at 0.62 of that.
VAE_ENCODE = (40.0, 0.16)
VAE_HALF_FACTOR = 0.62
# CPU: the Python + torch + diffusers stack itself (resident after imports); CUDA: workspaces, allocator slack.
RUNTIME = {"cpu": 450 * MiB, "cuda": 300 * MiB}
# Optimizer state per trainable parameter: ("floats", n) = n tensors like the parameter; ("bytes", n).
OPTIMIZER_STATE = {
    "AdamW": ("floats", 2), "Adam": ("floats", 2), "PagedAdamW": ("floats", 2), "PagedAdamW32bit": ("floats", 2),
    "AdamWScheduleFree": ("floats", 2), "RAdamScheduleFree": ("floats", 2), "SGDScheduleFree": ("floats", 1),
    "AdamW8bit": ("bytes", 2), "Adam8bit": ("bytes", 2), "PagedAdamW8bit": ("bytes", 2),
    "Lion8bit": ("bytes", 1), "PagedLion8bit": ("bytes", 1), "SGDNesterov8bit": ("bytes", 1),
    "Lion": ("floats", 1), "Tiger": ("floats", 1), "SGDNesterov": ("floats", 1),
    "AdaFactor": ("floats", 0.1), "CAME": ("floats", 1.2), "AdamMini": ("floats", 1.1),
    "Prodigy": ("floats", 4), "DadaptAdam": ("floats", 3), "DadaptLion": ("floats", 2),
    "DAdaptAdaGrad": ("floats", 3), "DAdaptAdan": ("floats", 5), "DAdaptSGD": ("floats", 3),
}
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "model": 2, "int8": 1}


@dataclass
class MemoryEstimate:
    """Estimated peak bytes of one run on one device (see the module docstring).

    ``breakdown`` holds the items of the peak phase; ``phases`` the total of every phase;
    ``facts`` the settings the estimate used and ``parts`` the counts it was built from, so that
    a changed setting can be priced without rebuilding anything.
    """

    device: str
    phase: str
    breakdown: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        """Peak bytes (the largest phase)."""
        return int(sum(self.breakdown.values()))

    def with_facts(self, **changes: Any) -> "MemoryEstimate":
        """The estimate of the same run with some facts changed (``checkpointing=True``, ``batch=1``...)."""
        return compute(dict(self.facts, **changes), self.parts)


def estimate_peak(config: Any, model: Any, device: Any = "cpu", *, free_after_caching: bool = True,
                  checkpoint_bytes: int = 0) -> MemoryEstimate:
    """Peak memory of training ``config`` on ``device``.

    ``model`` is a loaded ModelBundle, a Family or a family name ("sd1", "sd2", "sdxl").
    ``free_after_caching``: the trainer drops the VAE (and a text encoder that does not train)
    once latents and captions are cached. ``checkpoint_bytes``: what the loader holds besides the
    built modules (today's single-file loader keeps the whole file until every module is built;
    pass 0 when the host already holds the model). It counts on a CPU only, where loading and
    training share one memory.
    """
    family = family_name(model)
    facts = config_facts(config, family, device_kind(device))
    facts["free_after_caching"] = bool(free_after_caching)
    facts["checkpoint_bytes"] = int(checkpoint_bytes or 0)
    source = model if getattr(model, "unet", None) is not None else family
    unet_params, te_params = network_parameters(config, source)
    # a text encoder trains only where the network has modules on it (BASE names none on Flux/Z-Image)
    facts["train_te"] = facts["train_te"] and te_params > 0
    parts = {"params": param_counts(model, family), "net_unet": unet_params, "net_te": te_params}
    return compute(facts, parts)


def compute(facts: dict, parts: dict) -> MemoryEstimate:
    """The estimate from settings (``facts``) and counts (``parts``); see the module docstring."""
    kind = facts["device"]
    runtime = RUNTIME.get(kind, RUNTIME["cuda"])
    denoiser = denoiser_name(facts["family"])
    weights = _weights(parts["params"], facts.get("unet_bytes", facts["model_bytes"]), facts["vae_bytes"],
                       te_bytes=facts["model_bytes"], denoiser=denoiser)
    phases: dict[str, dict] = {}
    if facts["checkpoint_bytes"] and kind == "cpu":
        phases["loading the model"] = {"runtime": runtime, "checkpoint file held by the loader": facts["checkpoint_bytes"],
                                       **_weights(parts["params"], 4, 4, denoiser=denoiser)}
    encode = (VAE_ENCODE[0] + VAE_ENCODE[1] * facts["cells"]) * MiB * (VAE_HALF_FACTOR if facts["vae_bytes"] == 2 else 1)
    cached_with = {k: v for k, v in weights.items()
                   if not (k == f"{denoiser} weights" and facts.get("unet_after_caching"))}
    phases["caching latents"] = {"runtime": runtime, **cached_with, "VAE encode (largest bucket)": encode}
    phases["training"] = {"runtime": runtime, **_kept(weights, facts, parts["params"]), **_network(facts, parts),
                          **_work(facts)}
    if facts.get("preview_cells"):
        # A preview brings the VAE and text encoders back beside the network and its optimizer state;
        # the step's activations are freed by then. The decode is priced with the encode's formula
        # at the preview size (no decode measurement yet).
        decode = (VAE_ENCODE[0] + VAE_ENCODE[1] * facts["preview_cells"]) * MiB * \
            (VAE_HALF_FACTOR if facts["vae_bytes"] == 2 else 1)
        phases["previews"] = {"runtime": runtime, **weights, **_network(facts, parts),
                              "VAE decode (preview)": decode}
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    notes = []
    if facts["free_after_caching"]:
        notes.append("the VAE" + ("" if facts["train_te"] else " and the text encoder(s)") + " leave after caching")
    return MemoryEstimate(device=kind, phase=phase, breakdown={k: int(v) for k, v in phases[phase].items() if v},
                          phases={p: int(sum(v.values())) for p, v in phases.items()}, facts=facts, parts=parts,
                          notes=notes)


def device_kind(device: Any) -> str:
    """"cpu", "cuda", "mps"... of a torch.device or a string such as "cuda:1"."""
    return str(getattr(device, "type", device) or "cpu").split(":")[0]


def family_name(model: Any) -> str:
    """The family name of a bundle, a Family or a name; a clear error for anything else."""
    name = model if isinstance(model, str) else getattr(getattr(model, "family", model), "name", None)
    name = VARIANTS.get(name, name)
    if name not in PARAMS:
        raise ValueError(f"memory estimate: the model must be a loaded model, a Family or one of "
                         f"{', '.join(PARAMS)}; got {model!r}")
    return name


def params_name(model: Any) -> str:
    """The PARAMS entry of ``model``: its family's, or its variant's (Flux.1-schnell: "flux-schnell")."""
    family = family_name(model)
    variant = "" if isinstance(model, str) else getattr(getattr(model, "family", model), "variant", "")
    if isinstance(model, str) and model in VARIANTS:
        return model
    return f"{family}-{variant}" if f"{family}-{variant}" in PARAMS else family


def denoiser_name(family: str) -> str:
    """What the breakdown calls the trained model: "U-Net" (SD) or "transformer" (Flux.1, Z-Image)."""
    return "transformer" if family in DIT_BLOCKS else "U-Net"


def config_facts(config: Any, family: str, kind: str) -> dict:
    """The settings of ``config`` that decide its memory."""
    from trainer.families import get_family
    from trainer.modes import get_mode

    height, width = (int(v) for v in tuple(config.image_size))
    mode = str(getattr(config, "mode", "LoRA"))
    facts = get_mode(mode)
    precision = str(config.train_model_precision)
    blocks = list(config.network_blocks or [])
    fam = get_family(family)
    if fam.is_dit:  # Flux's CLIP / T5 (Z-Image's Qwen3 is never trained: families.QWEN3_NOT_TRAINED)
        te_ids = tuple(b for b in fam.text_encoder_ids if b in blocks and b != "QWEN3")
    else:
        te_ids = tuple(b for b in TEXT_ENCODER_IDS if b in blocks)[:1]
    tokens = (height // DIT_PATCH_PX) * (width // DIT_PATCH_PX) + DIT_TEXT_TOKENS[family] if fam.is_dit else 0
    return {
        "family": family, "device": kind, "mode": mode, "height": height, "width": width,
        "cells": (height // 8) * (width // 8), "batch": int(config.train_batch_size),
        "checkpointing": bool(getattr(config, "use_gradient_checkpointing", False)),
        "model_precision": precision, "model_bytes": PRECISION_BYTES.get(precision, 4),
        "lora_bytes": PRECISION_BYTES.get(str(config.train_lora_precision), 4),
        "vae_bytes": PRECISION_BYTES.get(str(getattr(config, "train_VAE_precision", "fp32")), 4),
        "optimizer": str(config.train_optimizer),
        "train_te": bool(facts.text_encoder and te_ids), "te_trained": te_ids if facts.text_encoder else (),
        "tokens": tokens,  # a transformer family's sequence length (image + text tokens), per sample
        # set by a memory profile (trainer/training/memory/profiles.py): bytes per stored U-Net
        # weight (1 = fp8), the U-Net placed only after caching, optimizer state paged to the host
        "unet_bytes": PRECISION_BYTES.get(precision, 4), "unet_after_caching": False, "offload_optimizer": False,
        # latents encoded as batches need them: the VAE stays during the first epoch's steps
        "vae_in_training": facts.latents_on_first_use,
        "networks": len(facts.passes),  # an earlier pass's network (Difference's copy) stays applied
        "preview_cells": _preview_cells(config),
    }


def _preview_cells(config: Any) -> int:
    """Latent cells of a preview image, 0 when previews are off."""
    if int(getattr(config, "preview_every_steps", 0) or 0) <= 0:
        return 0
    height, width = (int(v) for v in tuple(getattr(config, "preview_size", (512, 512))))
    return (height // 8) * (width // 8)


def param_counts(model: Any, family: str) -> dict:
    """Parameters of the U-Net, VAE and text encoders: counted on a bundle, else the family's."""
    if getattr(model, "unet", None) is None:
        return PARAMS[params_name(model)]

    def count(module):
        return 0 if module is None else sum(p.numel() for p in module.parameters())
    vae = count(getattr(model, "vae", None)) or PARAMS[family]["vae"]
    return {"unet": count(model.unet), "vae": vae, "text_encoders": tuple(count(te) for te in model.text_encoders)}


def _weights(params: dict, model_bytes: float, vae_bytes: int, te_bytes: int | None = None,
             denoiser: str = "U-Net") -> dict:
    return {f"{denoiser} weights": params["unet"] * model_bytes,
            "text encoder weights": sum(params["text_encoders"]) * (model_bytes if te_bytes is None else te_bytes),
            "VAE weights": params["vae"] * vae_bytes}


def _kept(weights: dict, facts: dict, params: dict) -> dict:
    out = dict(weights)
    if facts["free_after_caching"]:
        if not facts.get("vae_in_training"):
            out.pop("VAE weights")
        if not facts["train_te"]:
            out.pop("text encoder weights")
        elif facts["family"] == "flux" and len(facts.get("te_trained", ())) == 1:
            # one Flux encoder trains: the other's outputs are cached and it leaves (modes/lora.py)
            from trainer.conditioning import FLUX_ENCODERS

            share = params["text_encoders"][FLUX_ENCODERS.index(facts["te_trained"][0])] / sum(params["text_encoders"])
            out["text encoder weights"] = out["text encoder weights"] * share
    return out


def _network(facts: dict, parts: dict) -> dict:
    params = parts["net_unet"] + (parts["net_te"] if facts["train_te"] else 0)
    size = facts["lora_bytes"]
    how, amount = OPTIMIZER_STATE.get(facts["optimizer"], ("floats", 2))
    state = params * (amount * size if how == "floats" else amount)
    if facts.get("offload_optimizer"):
        state = 0  # paged: the driver moves it to host memory when the GPU needs the room
    return {"network weights": params * size * facts["networks"], "network gradients": params * size,
            f"optimizer state ({facts['optimizer']})": int(state)}


def _work(facts: dict) -> dict:
    half = facts["model_bytes"] == 2
    if facts["family"] in DIT_BLOCKS:
        return _dit_work(facts, half)
    table = "sd1" if facts["family"] == "sd2" else facts["family"]
    intercept, slope = UNET_STEP[(table, half, facts["checkpointing"])]
    label = f"U-Net forward + backward ({facts['height']}x{facts['width']}, batch {facts['batch']}" + \
            (", checkpointing)" if facts["checkpointing"] else ")")
    out = {label: (intercept + slope * facts["cells"] * facts["batch"]) * MiB}
    if facts["train_te"]:
        out["text encoder forward + backward"] = TE_STEP[(facts["family"], half)] * facts["batch"] * MiB
    return out


def _block_row(kind: str, family: str, half: bool, checkpointing: bool, fp8: bool) -> tuple:
    """BLOCK_STEP's row for these settings; a row measured with the other storage, where only that
    one exists, with one layer's upcast copy added to its transient (see DIT_LARGEST_LAYER)."""
    row = BLOCK_STEP.get((kind, half, checkpointing, fp8))
    if row is not None:
        return row
    kept, kept_per, transient, transient_per = BLOCK_STEP[(kind, half, checkpointing, not fp8)]
    copy = DIT_LARGEST_LAYER[family] * (2 if half else 4) / MiB
    return kept, kept_per, transient + (copy if fp8 else 0.0), transient_per


def _dit_work(facts: dict, half: bool) -> dict:
    """A transformer family's step: every block's kept memory + the largest transient + what is around
    the blocks (embedded input, final layer, the gradient between blocks: 3 token streams, an allowance)."""
    family, batch = facts["family"], facts["batch"]
    fp8 = facts.get("unet_bytes", facts["model_bytes"]) == 1
    tokens = facts["tokens"] * batch
    kept = transient = 0.0
    for kind, count in DIT_BLOCKS[family]:
        k, k_per, t, t_per = _block_row(kind, family, half, facts["checkpointing"], fp8)
        kept += count * (k * MiB + k_per * 1024 * tokens)
        transient = max(transient, t * MiB + t_per * 1024 * tokens)
    around = 3 * tokens * DIT_WIDTH[family] * (2 if half else 4)
    label = (f"transformer forward + backward ({facts['height']}x{facts['width']}, {facts['tokens']} tokens, "
             f"batch {batch}" + (", checkpointing)" if facts["checkpointing"] else ")"))
    out = {label: kept + transient + around}
    if facts["train_te"]:
        per_prompt = sum(TE_STEP_DIT[(te, half)] for te in facts.get("te_trained", ()))
        out["text encoder forward + backward"] = per_prompt * batch * MiB
    return out


def network_parameters(config: Any, model: Any) -> tuple[int, int]:
    """(U-Net, text-encoder) trainable parameters of the network ``config`` builds.

    ``model`` is a bundle or a family name; the text-encoder count assumes BASE trains.
    """
    from trainer.network.network import find_targets, select_targets, spec_from_config

    bundle = model if getattr(model, "unet", None) is not None else _meta_bundle(family_name(model))
    spec = spec_from_config(config, train_text_encoder=True,
                            blocks=tuple(dict.fromkeys(["BASE", *config.network_blocks])))
    targets = find_targets(bundle.family, bundle.unet, list(bundle.text_encoders), spec.network_type)
    totals = [0, 0]
    for target in select_targets(targets, spec, bundle.family):
        shape = tuple(target.layer.weight.shape)
        if len(target.layers) > 1:  # a fused transformer module: the parts' rows stacked
            shape = (sum(layer.weight.shape[0] for layer in target.layers), shape[1])
        rank, _ = spec.rank_alpha(target.layer)
        out_f, in_f = shape[0], shape[1]
        taps = shape[2] * shape[3] if len(shape) == 4 else 1
        if spec.network_type == "loha":
            size = 2 * (rank * out_f + rank * in_f + (rank * rank * taps if taps > 1 else 0))
        else:
            size = rank * in_f * taps + rank * out_f
        totals[1 if target.is_te else 0] += size
    return totals[0], totals[1]


@functools.lru_cache(maxsize=5)
def _meta_bundle(family: str):
    from trainer.hosts.meta import meta_bundle

    return meta_bundle(family)


def free_device_memory(device: Any) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); None on a CPU and other devices."""
    if device_kind(device) != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = getattr(device, "index", None)
    if index is None and ":" in str(device):
        index = int(str(device).split(":", 1)[1])
    free, _ = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
    return int(free)


def estimate_for_model_file(config: Any, path: Any, device: Any = "cpu", *, free_after_caching: bool = True,
                            loader_holds_file: bool | None = None) -> MemoryEstimate:
    """The estimate before loading: the family comes from the file's keys (or a folder's U-Net config).

    ``loader_holds_file``: whether the loader keeps the file's tensors while building (see
    ``estimate_peak``'s ``checkpoint_bytes``). None decides by the file: safetensors files are
    read tensor by tensor and cast on the way (nothing held); ``.ckpt``-style files are mapped
    whole by ``torch.load``. A diffusers folder loads module by module.
    """
    import json
    from pathlib import Path

    from trainer.hosts.checkpoint_file import CheckpointFile, detect_family

    source = Path(path)
    if source.is_dir():
        transformer = source / "transformer" / "config.json"
        if transformer.is_file():  # a Flux.1 / Z-Image diffusers folder
            from trainer.hosts.dit_parts import family_of_transformer

            settings = json.loads(transformer.read_text(encoding="utf-8"))
            family = family_of_transformer(settings)
            if family == "flux" and not settings.get("guidance_embeds", True):
                family = "flux-schnell"
            return estimate_peak(config, family, device, free_after_caching=free_after_caching)
        config_file = source / "unet" / "config.json"
        if not config_file.is_file():
            raise ValueError(f"memory estimate: {source} has no unet/config.json or transformer/config.json; give a "
                             "checkpoint file or a diffusers model folder")
        width = json.loads(config_file.read_text(encoding="utf-8")).get("cross_attention_dim")
        family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
        if family is None:
            raise ValueError(f"memory estimate: {config_file} has cross_attention_dim {width!r}; "
                             "expected 768 (SD1), 1024 (SD2) or 2048 (SDXL)")
        held = 0
    else:
        ckpt = CheckpointFile(source, "model")
        family = detect_family(ckpt)
        if family == "flux":
            from trainer.hosts.dit_parts import has_guidance_embedding

            keys = [k.removeprefix("model.diffusion_model.") for k in ckpt.shapes]
            family = "flux" if has_guidance_embedding(keys) else "flux-schnell"
        if loader_holds_file is None:
            loader_holds_file = source.suffix.lower() not in (".safetensors", ".sft")
        held = source.stat().st_size if loader_holds_file else 0
    return estimate_peak(config, family, device, free_after_caching=free_after_caching, checkpoint_bytes=held)
