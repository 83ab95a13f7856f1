"""The fake hosts' model objects, built from a checkpoint file's LDM state dict.

Only the structure TrainTrain relies on is reproduced (HOSTS.md §2), and
tests/test_fakehost_fidelity.py checks it against records of the real hosts (tests/data/hosts):

- AUTOMATIC1111: one ``nn.Module`` with ``model.diffusion_model``, ``first_stage_model`` and
  ``cond_stage_model`` (or ``conditioner``), module names as in the file, and the text encoder
  hijacked the way A1111 does it: ``cond_stage_model.wrapped.transformer`` and a token
  embedding wrapped in a module whose original sits at ``.wrapped``. Flags ``is_sd1/2/xl``,
  ``parameterization``, ``lowvram``, ``sd_checkpoint_info``, and a ``.device``.
- Forge: an engine (not a module) with ``forge_objects.{unet,clip,vae}``: a UNet patcher whose
  ``model`` (KModel) holds ``diffusion_model`` (LDM names) and ``predictor.prediction_type``,
  a CLIP whose ``cond_stage_model.clip_l`` (``clip_h`` for SD2, ``clip_l`` + ``clip_g`` for SDXL)
  are IntegratedCLIPs (transformers-layout ``transformer.text_model.*`` + ``logit_scale``, and
  ``transformer.text_projection`` where the file has one; OpenCLIP weights converted to that
  layout at load) whose token embedding the text-processing engine wraps for textual inversion
  (``token_embedding.wrapped``, weight registered twice), a VAE whose
  ``first_stage_model`` has LDM VAE names. Everything is built under ``torch.inference_mode()``.

There is no GPU: ``.to(device)`` records ``placement`` and leaves the tensors on the CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from torch import nn


class Placed(nn.Module):
    """A module that records the device the host moves it to (dtype changes are real)."""

    placement = "cpu"

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            for module in self.modules():
                if isinstance(module, Placed):
                    module.placement = device.type
        return super().to(dtype=dtype) if dtype is not None else self

    @property
    def device(self) -> torch.device:
        return torch.device(self.placement)


def tree_module(state: dict, root: nn.Module | None = None, *, requires_grad: bool = False) -> nn.Module:
    """A module tree whose ``state_dict()`` has exactly the keys of ``state`` (floats as parameters).
    ``requires_grad`` as the real host leaves its parameters: both hosts' U-Net parameters and
    Forge's VAE parameters require grad (tests/data/hosts: ``n_requires_grad``)."""
    root = root if root is not None else Placed()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        if tensor.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=requires_grad))
        else:
            node.register_buffer(leaf, tensor.clone())
    return root


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class EmbeddingsWithFixes(nn.Module):
    """A1111's token-embedding wrapper (``modules.sd_hijack``; the original at ``.wrapped``)."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    """A1111's wrapper of an SD1 ldm ``FrozenCLIPEmbedder`` (``modules.sd_hijack_clip``), kept at ``.wrapped``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped


class FrozenOpenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """The same for SD2's OpenCLIP embedder (``modules.sd_hijack_open_clip``)."""


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """The same for SDXL's CLIP-L embedder (``conditioner.embedders.0``)."""


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """The same for SDXL's OpenCLIP bigG embedder (``conditioner.embedders.1``)."""


def _hijack_text_encoder(embedder: nn.Module, wrapper: type) -> nn.Module:
    """What ``StableDiffusionModelHijack.hijack`` does to one text embedder (modules/sd_hijack.py)."""
    if "transformer" in embedder._modules:  # CLIP: transformer.text_model.embeddings.token_embedding
        embeddings = embedder.transformer.text_model.embeddings
    else:  # OpenCLIP: model.token_embedding
        embeddings = embedder.model
    embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding)
    return wrapper(embedder)


class ConcatTimestepEmbedderND(nn.Module):
    """sgm's size / crop / target-size embedder of SDXL's conditioner (no weights)."""


def _scaled_linear(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, alphas_cumprod) of SD's scaled-linear schedule, 0.00085..0.012, in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return betas, torch.cumprod(1 - betas, 0)


def _sgm_denoiser(module: nn.Module, steps: int = 1000) -> None:
    """sgm's ``DiffusionEngine.denoiser`` with its ``sigmas`` buffer (in the state dict)."""
    _, alphas = _scaled_linear(steps)
    module.denoiser = nn.Module()
    module.denoiser.register_buffer("sigmas", ((1 - alphas) / alphas).sqrt().float())


def _ddpm_schedule(module: nn.Module, steps: int = 1000) -> None:
    """The noise-schedule buffers ldm's ``LatentDiffusion.register_schedule`` adds (they are in its
    state dict): scaled-linear betas 0.00085..0.012 as in SD's configs."""
    betas, alphas = _scaled_linear(steps)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
    variance = betas * (1 - previous) / (1 - alphas)
    values = {"betas": betas, "alphas_cumprod": alphas, "alphas_cumprod_prev": previous,
              "sqrt_alphas_cumprod": alphas.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas).sqrt(),
              "log_one_minus_alphas_cumprod": (1 - alphas).log(), "sqrt_recip_alphas_cumprod": (1 / alphas).sqrt(),
              "sqrt_recipm1_alphas_cumprod": (1 / alphas - 1).sqrt(), "posterior_variance": variance,
              "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
              "posterior_mean_coef1": betas * previous.sqrt() / (1 - alphas),
              "posterior_mean_coef2": (1 - previous) * (1 - betas).sqrt() / (1 - alphas)}
    for name, value in values.items():
        module.register_buffer(name, value.float())


def _all_vit_h_blocks(text_state: dict) -> dict:
    """A1111 builds SD2's OpenCLIP ViT-H text model from its config, all 24 blocks, whatever the file
    holds: a file in the diffusers-derived layout (23 blocks, SD2 uses the penultimate layer) still
    gets a block 23 (left as initialised)."""
    block = "model.transformer.resblocks."
    present = {int(k[len(block):].split(".")[0]) for k in text_state if k.startswith(block)}
    if len(present) != 23:
        return text_state
    last = max(present)
    extra = {key.replace(f"{block}{last}.", f"{block}{last + 1}."): torch.empty_like(value)
             for key, value in text_state.items() if key.startswith(f"{block}{last}.")}
    return {**text_state, **extra}


class FakeLatentDiffusion(Placed):
    """AUTOMATIC1111's loaded model (LatentDiffusion / DiffusionEngine) after the hijack."""

    def __init__(self, state: dict, info):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = tree_module(_strip(state, "model.diffusion_model."), nn.Module(),
                                                 requires_grad=True)
        self.first_stage_model = tree_module(_strip(state, "first_stage_model."), nn.Module())
        self.is_sdxl = any(k.startswith("conditioner.") for k in state)
        self.is_sd2 = not self.is_sdxl and any(k.startswith("cond_stage_model.model.") for k in state)
        self.is_sd1 = not self.is_sdxl and not self.is_sd2
        self.is_ssd = False
        if self.is_sdxl:
            self.conditioner = tree_module(_strip(state, "conditioner."), nn.Module())
            wrappers = (FrozenCLIPEmbedderForSDXLWithCustomWords, FrozenOpenCLIPEmbedder2WithCustomWords)
            for (name, embedder), wrapper in zip(list(self.conditioner.embedders._modules.items()), wrappers):
                self.conditioner.embedders._modules[name] = _hijack_text_encoder(embedder, wrapper)
            for index in (2, 3, 4):  # original size, crop, target size
                self.conditioner.embedders.add_module(str(index), ConcatTimestepEmbedderND())
            _sgm_denoiser(self)
            # A1111's hijack then points cond_stage_model at the conditioner (modules/sd_hijack.py), which
            # registers it a second time: the state dict has every text-encoder key under both names.
            self.cond_stage_model = self.conditioner
        else:
            _ddpm_schedule(self)
            wrapper = FrozenOpenCLIPEmbedderWithCustomWords if self.is_sd2 else FrozenCLIPEmbedderWithCustomWords
            text_state = _strip(state, "cond_stage_model.")
            if self.is_sd2:
                text_state = _all_vit_h_blocks(text_state)
            self.cond_stage_model = _hijack_text_encoder(tree_module(text_state, nn.Module()), wrapper)
        self.parameterization = "eps"
        self.lowvram = False
        self.sd_checkpoint_info = info
        self.sd_model_checkpoint = info.filename
        self.sd_model_hash = info.shorthash


def a1111_model(info) -> FakeLatentDiffusion:
    """Load ``info.filename`` the way AUTOMATIC1111 does (fp32, as with --no-half)."""
    return FakeLatentDiffusion(load_file(info.filename), info)


class ModelPatcher:
    """Forge's ``backend.patcher.base.ModelPatcher``: one LoraLoader per model (kept on the model),
    clones sharing the model, and the LoRA patches a clone carries until it is loaded."""

    def __init__(self, model: nn.Module):
        from backend.patcher.lora import LoraLoader
        from modules import devices

        self.model = model
        self.load_device = devices.device
        self.offload_device = torch.device("cpu")
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = ModelPatcher(self.model)
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        model_keys = set(k for k, _ in self.model.named_parameters())
        found, these = set(), {}
        for key in patches:
            if key in model_keys:
                found.add(key)
                these.setdefault(key, []).append([strength_patch, patches[key], strength_model, None, None])
        self.lora_patches[identifier] = these
        return found

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)


class CLIP:
    """Forge's ``backend.patcher.clip.CLIP``: the text encoders, their tokenizers and their patcher."""

    def __init__(self, cond_stage_model=None, patcher=None):
        self.cond_stage_model = cond_stage_model
        self.patcher = patcher
        self.tokenizer = None

    def clone(self):
        n = CLIP(self.cond_stage_model, self.patcher.clone())
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *arg, **kwargs):
        return self.patcher.add_patches(*arg, **kwargs)


class ForgeObjects:
    """Forge's ``backend.diffusion_engine.base.ForgeObjects``."""

    def __init__(self, unet, clip, vae, clipvision):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class JointTextEncoder(Placed):
    """Forge's ModuleDict of text encoders (``clip_l``, ``clip_h``, ``clip_g``)."""


class IntegratedCLIP(nn.Module):
    """Forge's CLIP holder: a transformers CLIPTextModel at ``transformer`` (plus a projection when the file has one)."""

    def __init__(self, transformer_state: dict):
        super().__init__()
        # Forge adds a text_projection layer to every CLIP, but its weight stays unset (and out of the
        # state dict) unless the checkpoint has one: OpenCLIP's (clip_g, clip_h) do, CLIP-L's do not.
        self.transformer = tree_module(dict(transformer_state), nn.Module())
        if "text_projection" not in self.transformer._modules:  # the layer is there, with no weight
            self.transformer.add_module("text_projection", nn.Module())
        self.logit_scale = nn.Parameter(torch.tensor(4.6055), requires_grad=False)


class CLIPEmbeddingForTextualInversion(nn.Module):
    """Forge's textual-inversion wrapper (``backend/text_processing/classic_engine.py``): it keeps
    the original token embedding at ``.wrapped`` and registers the same weight as its own
    ``.weight``, so the state dict holds the embedding twice (``token_embedding.weight`` and
    ``token_embedding.wrapped.weight``, one tensor)."""

    def __init__(self, wrapped: nn.Module, textual_inversion_key: str):
        super().__init__()
        self.wrapped = wrapped
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight


def _text_processing_engine(clip: IntegratedCLIP, key: str) -> None:
    """What Forge's ClassicTextProcessingEngine does to each CLIP it drives, when the engine is built."""
    embeddings = clip.transformer.text_model.embeddings
    embeddings.token_embedding = CLIPEmbeddingForTextualInversion(embeddings.token_embedding, key)


def _hf_clip(ldm: dict) -> dict:
    """A checkpoint's CLIP-L keys (already transformers layout) without the position ids buffer."""
    return {k: v for k, v in ldm.items() if not k.endswith("position_ids")}


def _open_clip_to_hf(ldm: dict) -> dict:
    """OpenCLIP keys as Forge converts them at load: transformers layout, q/k/v split, projection transposed."""
    out = {"text_model.embeddings.token_embedding.weight": ldm["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": ldm["positional_embedding"],
           "text_model.final_layer_norm.weight": ldm["ln_final.weight"],
           "text_model.final_layer_norm.bias": ldm["ln_final.bias"],
           "text_projection.weight": ldm["text_projection"].T.contiguous()}
    names = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    layers = sorted({int(k.split(".")[2]) for k in ldm if k.startswith("transformer.resblocks.")})
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for part, chunk in zip("qkv", ldm[src + f"attn.in_proj_{kind}"].chunk(3, dim=0)):
                out[dst + f"self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            for old, new in names.items():
                out[dst + f"{new}.{kind}"] = ldm[src + f"{old}.{kind}"]
    return out


class KModel(Placed):
    def __init__(self, unet_state: dict, prediction_type: str):
        super().__init__()
        self.diffusion_model = tree_module(unet_state, nn.Module(), requires_grad=True)
        self.predictor = SimpleNamespace(prediction_type=prediction_type)


class ForgeEngine:
    """Forge's ``backend.diffusion_engine.sd15.StableDiffusion`` / ``sdxl.StableDiffusionXL`` (not a module)."""

    def __init__(self, state: dict, info):
        xl = any(k.startswith("conditioner.") for k in state)
        sd2 = not xl and any(k.startswith("cond_stage_model.model.") for k in state)
        clip_model = JointTextEncoder()
        if xl:
            clip_model.add_module("clip_l", IntegratedCLIP(_hf_clip(_strip(state, "conditioner.embedders.0.transformer."))))
            clip_model.add_module("clip_g", IntegratedCLIP(_open_clip_to_hf(_strip(state, "conditioner.embedders.1.model."))))
        elif sd2:
            clip_model.add_module("clip_h", IntegratedCLIP(_open_clip_to_hf(_strip(state, "cond_stage_model.model."))))
        else:
            clip_model.add_module("clip_l", IntegratedCLIP(_hf_clip(_strip(state, "cond_stage_model.transformer."))))
        for key, clip_module in clip_model.named_children():  # one text-processing engine per CLIP
            _text_processing_engine(clip_module, key)
        unet = ModelPatcher(KModel(_strip(state, "model.diffusion_model."), "epsilon"))
        vae_model = tree_module(_strip(state, "first_stage_model."), requires_grad=True)
        clip = CLIP(cond_stage_model=clip_model, patcher=ModelPatcher(clip_model))
        vae = SimpleNamespace(first_stage_model=vae_model, patcher=ModelPatcher(vae_model))
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = not xl and not sd2, sd2, xl, False
        self.first_stage_model = None
        self.cond_stage_model = None
        self.sd_checkpoint_info = info
        self.filename = info.filename
        self.sd_model_hash = info.shorthash


class IntegratedT5(nn.Module):
    """Forge's T5 holder (``backend.nn.t5.IntegratedT5``): transformers' T5 names under ``transformer``
    (``shared``, ``encoder.block.N...``; the token embedding once), next to a ``logit_scale``."""

    def __init__(self, transformer_state: dict):
        super().__init__()
        self.transformer = tree_module(dict(transformer_state), nn.Module())
        self.logit_scale = nn.Parameter(torch.tensor(4.6055), requires_grad=False)


class ObjectDict:
    """Forge's ``backend.nn.base.ObjectDict``: the tokenizers as attributes (``clip_l``, ``t5xxl``)."""

    def __init__(self, items: dict):
        for key, value in items.items():
            setattr(self, key, value)


class PredictionFlux(SimpleNamespace):
    """Forge's ``backend.modules.k_prediction.PredictionFlux`` (prediction type "const", a shift ``mu``)."""


def _flux_weightless_modules(dit: nn.Module, guidance: bool) -> None:
    """The modules of Forge's IntegratedFluxTransformer2DModel that hold no weights (norms without an
    affine part, activations, the RoPE embedder; schnell's ``guidance_in`` is an Identity), so the fake's
    module tree is the host's (tests/data/hosts/forge_flux*: ``unet_module_types``)."""
    def put(path: str, module: nn.Module) -> None:
        *parents, leaf = path.split(".")
        node = dit
        for part in parents:
            node = node.get_submodule(part)
        node.add_module(leaf, module)

    put("pe_embedder", nn.Module())
    if guidance:
        put("guidance_in.silu", nn.SiLU())
    else:
        put("guidance_in", nn.Identity())
    for name in ("time_in", "vector_in"):
        put(f"{name}.silu", nn.SiLU())
    for name, _ in list(dit.double_blocks.named_children()):
        for side in ("img", "txt"):
            put(f"double_blocks.{name}.{side}_norm1", nn.LayerNorm(1, elementwise_affine=False))
            put(f"double_blocks.{name}.{side}_norm2", nn.LayerNorm(1, elementwise_affine=False))
            put(f"double_blocks.{name}.{side}_mlp.1", nn.GELU(approximate="tanh"))
    for name, _ in list(dit.single_blocks.named_children()):
        put(f"single_blocks.{name}.pre_norm", nn.LayerNorm(1, elementwise_affine=False))
        put(f"single_blocks.{name}.mlp_act", nn.GELU(approximate="tanh"))
    put("final_layer.norm_final", nn.LayerNorm(1, elementwise_affine=False))
    put("final_layer.adaLN_modulation.0", nn.SiLU())


def _flux_tokenizers():
    """The tokenizers Forge loads from its own FLUX.1 folder (here the tests' tiny CLIP BPE for both)."""
    from tiny import tiny_tokenizer
    from tiny_dit import TEXT_LEN

    t5 = tiny_tokenizer()
    t5.model_max_length = TEXT_LEN
    return ObjectDict({"clip_l": tiny_tokenizer(), "t5xxl": t5})


def _storage_dtype(state: dict):
    """What Forge stores a transformer in on a CPU: the file's own fp8 when most tensors are fp8, else fp32."""
    counts = {}
    for value in state.values():
        counts[value.dtype] = counts.get(value.dtype, 0) + 1
    major = max(counts, key=counts.get) if counts else torch.float32
    return major if major in (torch.float8_e4m3fn, torch.float8_e5m2) else torch.float32


class Flux:
    """Forge's ``backend.diffusion_engine.flux.Flux`` (not a module), loaded from an all-in-one BFL file
    (``model.diffusion_model.*`` transformer, ``vae.*`` LDM VAE, ``text_encoders.clip_l.transformer.*`` and
    ``text_encoders.t5xxl.transformer.*``). Flux.1-schnell has no ``guidance_in`` weights; Forge then uses
    its schnell config (shift 1, no distilled CFG scale)."""

    def __init__(self, state: dict, info):
        unet_state = _strip(state, "model.diffusion_model.")
        schnell = not any(k.startswith("guidance_in.") for k in unet_state)
        storage = _storage_dtype(unet_state)
        unet_state = {k: v.to(storage) for k, v in unet_state.items()}
        clip_model = JointTextEncoder()
        clip_model.add_module("clip_l", IntegratedCLIP(_hf_clip(_strip(state, "text_encoders.clip_l.transformer."))))
        clip_model.add_module("t5xxl", IntegratedT5(_strip(state, "text_encoders.t5xxl.transformer.")))
        _text_processing_engine(clip_model.clip_l, "clip_l")  # the T5 engine wraps nothing
        kmodel = KModel(unet_state, "const")
        _flux_weightless_modules(kmodel.diffusion_model, guidance=not schnell)
        kmodel.predictor = PredictionFlux(prediction_type="const", mu=1.0 if schnell else 1.15)
        kmodel.storage_dtype, kmodel.computation_dtype = storage, torch.float32
        unet = ModelPatcher(kmodel)
        vae_model = tree_module(_strip(state, "vae."), requires_grad=True)
        clip = CLIP(cond_stage_model=clip_model, patcher=ModelPatcher(clip_model))
        clip.tokenizer = _flux_tokenizers()
        vae = SimpleNamespace(first_stage_model=vae_model, patcher=ModelPatcher(vae_model))
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.model_config = SimpleNamespace(
            huggingface_repo=f"black-forest-labs/FLUX.1-{'schnell' if schnell else 'dev'}")
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = self.is_inpaint = False
        self.use_distilled_cfg_scale = not schnell
        self.first_stage_model = None
        self.cond_stage_model = None
        self.sd_checkpoint_info = info
        self.filename = info.filename
        self.sd_model_hash = info.shorthash


def is_flux_state(state: dict) -> bool:
    """Forge's test for a Flux checkpoint (``backend/loader.py``), with or without the LDM prefix."""
    return any(k.endswith("double_blocks.0.img_attn.norm.key_norm.scale") for k in state)


def forge_model(info):
    """Load ``info.filename`` the way Forge does: inside inference mode, so every tensor is an inference tensor."""
    with torch.inference_mode():
        state = load_file(info.filename)
        if is_flux_state(state):
            if not any(k.startswith("model.diffusion_model.") for k in state):  # Forge's preprocess_state_dict
                state = {f"model.diffusion_model.{k}": v for k, v in state.items()}
            return Flux(state, info)
        return ForgeEngine(state, info)


def generate(sd_model) -> None:
    """What a generation does to placement: Forge loads its patchers to the GPU on demand."""
    from modules import shared

    if shared.flavour == "forge":
        from backend import memory_management

        objects = sd_model.forge_objects
        memory_management.load_models_gpu([objects.unet, objects.clip.patcher, objects.vae.patcher])
