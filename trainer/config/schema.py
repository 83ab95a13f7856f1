"""The parameter schema: one ``Param`` per setting, in the order the settings JSON stores them.

Everything that shows, saves, loads or checks a setting (UI, CLI, presets, queue, metadata)
reads this table instead of naming parameters itself. The first 59 rows are the reference
product's keys with their exact spelling and saved order (SPEC.md §3.1); the rows after them
are this project's extensions.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import choices as C

KINDS = ("str", "int", "float", "bool", "choice", "blocks", "size", "optional_float")
UI_KINDS = ("DD", "TX", "CH", "CB")
MODE_LETTERS = ("L", "I", "D", "A", "M", "D2")
ALL_PANELS = frozenset(MODE_LETTERS)


@dataclass(frozen=True)
class Param:
    """One setting.

    ``name`` is the Python attribute, ``key`` the JSON key. ``choices`` are the only allowed values
    for kind ``choice``; for numeric kinds they are the values the UI offers, and other values in
    range are allowed too. ``modes`` holds the panels where the setting has an effect (mode letters
    of SPEC.md, ``D2`` = the Difference 2nd-pass panel). ``second_pass`` marks the settings that
    the 2nd-pass panel overrides (SPEC.md §3.4).
    """

    name: str
    key: str
    kind: str
    default: object
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    help: str
    modes: frozenset
    ui: str
    group: str
    reference: bool
    second_pass: bool


def _modes(spec: str) -> frozenset:
    """'all' means every mode and the 2nd-pass panel; otherwise space-separated letters."""
    return ALL_PANELS if spec == "all" else frozenset(spec.split())


# (key, kind, default, ui, modes, help, extras). Extras: choices, minimum, maximum, name.
_REFERENCE_ROWS = [
    ("network_type", "choice", "lierla", "DD", "all",
     "Network kind: lierla is a plain LoRA on attention layers, c3lier (LoCon) also trains the "
     "ResNet and up/down-sampling convolutions, loha is a LyCORIS LoHa on the same layers as c3lier.",
     dict(choices=C.NETWORK_TYPES)),
    ("network_rank", "int", 16, "DD", "all",
     "Rank (dim) of the linear and 1x1-conv modules: the size of the LoRA. Start around 16; "
     "larger is not better.", dict(choices=C.NETWORK_RANKS, minimum=1)),
    ("network_alpha", "float", 8.0, "DD", "all",
     "LoRA alpha; the learned change is scaled by alpha/rank. Usually equal to or below the rank "
     "(iLECO can profit from a larger one). 0 means alpha = rank.",
     dict(choices=C.NETWORK_ALPHAS, minimum=0)),
    ("lora_data_directory", "str", "", "TX", "L M",
     "Folder with the training images (searched with its sub-folders); captions come from "
     ".txt/.caption files next to the images.", {}),
    ("diff_target_name", "str", "", "TX", "M",
     "File-name suffix that marks the target image of a pair, e.g. '_closed_eyes' pairs "
     "'a.png' with 'a_closed_eyes.png'.", {}),
    ("lora_trigger_word", "str", "", "TX", "L M A",
     "Text put before every caption (the whole caption when an image has none). In ADDifT an empty "
     "trigger word removes BASE from the trained blocks.", {}),
    ("image_size(height, width)", "size", (512, 512), "TX", "L I M",
     "Training resolution as 'height,width' in pixels (multiples of 8), or one number for a square. "
     "It is the largest bucket for LoRA and Multi-ADDifT and the noise size for iLECO.",
     dict(name="image_size")),
    ("train_iterations", "int", 1000, "TX", "all",
     "Number of training steps. iLECO and Difference usually need 500-1000, ADDifT 30-100.",
     dict(minimum=1)),
    ("train_batch_size", "int", 2, "TX", "all",
     "Samples per step. In iLECO, Difference and ADDifT these are copies of the same input with "
     "different noise; 1-3 is enough there.", dict(minimum=1)),
    ("train_learning_rate", "float", 1e-4, "TX", "all",
     "Learning rate of the U-Net modules (and of the text encoder unless its own rate is set). "
     "Adaptive optimizers such as Prodigy and DAdapt* expect about 1.0.", {}),
    ("train_optimizer", "choice", "AdamW", "DD", "all",
     "Optimizer. AdamW is recommended; the 8-bit variants save memory but lose precision "
     "(Difference works poorly with them). Matched without regard to case.",
     dict(choices=C.OPTIMIZERS)),
    ("train_optimizer_settings", "str", "", "TX", "all",
     "Extra optimizer arguments as key=value, one per line or separated by ';', values as "
     "Python literals, e.g. 'weight_decay=0.01; betas=(0.9,0.99)'. Spaces are removed.", {}),
    ("train_lr_scheduler", "choice", "cosine", "DD", "all",
     "How the learning rate changes during training. 'cosine' is a good default.",
     dict(choices=C.LR_SCHEDULERS)),
    ("train_lr_scheduler_settings", "str", "", "TX", "all",
     "Extra scheduler arguments as key=value, same format as the optimizer settings, "
     "e.g. 'eta_min=0.00001' for cosine_annealing.", {}),
    ("save_lora_name", "str", "", "TX", "L I D A M",
     "File name (without extension) of the saved network; blank means 'untitled'. Also names "
     "the saved settings and the loss log.", {}),
    ("use_gradient_checkpointing", "bool", False, "CH", "all",
     "Recompute activations in the backward pass: much less GPU memory for a somewhat slower step.",
     {}),
    ("network_blocks(BASE = TextEncoder)", "blocks", C.BLOCKID26, "CB", "all",
     "Blocks that receive modules. BASE is the text encoder(s), IN/M/OUT the U-Net's input, middle "
     "and output blocks. Ids a model lacks (IN09-IN11, OUT09-OUT11 on SDXL) are skipped. Flux.1: CLIP and T5 "
     "(its text encoders, LoRA mode), D00-D18 and S00-S37 (double / single blocks); Z-Image: S00-S29.",
     dict(name="network_blocks", choices=C.BLOCKID26)),
    ("network_resume", "str", "", "TX", "L D A M",
     "Start from the weights of an existing network file (.safetensors or .pt). Only weights are "
     "loaded; the modules and their ranks come from the file.", {}),
    ("network_strength", "float", 1.0, "TX", "all",
     "Multiplies the effect of the saved file (folded into the weights at save time), so weight 1 "
     "in the prompt applies this strength. LoHa ignores it.", {}),
    ("network_conv_rank", "int", 0, "DD", "all",
     "Rank of the k x k convolution modules of c3lier and loha. 0 means the same as network_rank.",
     dict(choices=(0,) + C.NETWORK_RANKS, minimum=0)),
    ("network_conv_alpha", "float", 0.0, "DD", "all",
     "Alpha of the k x k convolution modules of c3lier and loha. 0 means the same as network_alpha.",
     dict(choices=(0,) + C.NETWORK_ALPHAS, minimum=0)),
    ("network_element", "choice", "Full", "DD", "all",
     "Which attention layers get modules: Full = all selected layers, CrossAttention = only the "
     "prompt-driven attn2 layers, SelfAttention = only attn1. No effect on loha.",
     dict(choices=C.NETWORK_ELEMENTS)),
    ("network_train_text_encoder", "bool", False, "CH", "",
     "Kept so files of the reference product load; it has no effect. The text encoder is trained "
     "in LoRA mode when BASE is among the network blocks.", {}),
    ("image_buckets_step", "int", 256, "DD", "L M",
     "Granularity in pixels of the aspect-ratio buckets; smaller steps make more, finer buckets. "
     "A multiple of 8.", dict(choices=tuple(s for s in C.BUCKET_STEPS if s), minimum=8)),
    ("image_num_multiply", "int", 1, "TX", "L M",
     "Repeat each bucket's images this many times per epoch.", dict(minimum=1)),
    ("image_min_length", "int", 512, "TX", "L M",
     "Smallest bucket side in pixels (a multiple of 8). Lower it (e.g. 256) to get the smaller "
     "buckets that sub_image_num fills.", dict(minimum=8)),
    ("image_max_ratio", "float", 2.0, "TX", "L M",
     "Largest aspect ratio a bucket may have, in either orientation.", dict(minimum=1)),
    ("sub_image_num", "int", 0, "TX", "L M",
     "Extra scaled-down copies of every image, stored in the nearest-ratio smaller buckets; "
     "more training images from few originals.", dict(minimum=0)),
    ("image_mirroring", "bool", False, "CH", "L M",
     "Also train on a left-right mirrored copy of every image.", {}),
    ("image_use_filename_as_tag", "bool", False, "CH", "L M",
     "Build the caption from the file name ('_' becomes ','; anything from '_id_' on is dropped) "
     "instead of caption files.", {}),
    ("image_disable_upscale", "bool", False, "CH", "L M",
     "Skip images that would have to be enlarged to fit their bucket.", {}),
    ("train_fixed_timsteps_in_batch", "bool", False, "CH", "L D A M D2",
     "Use one timestep for the whole batch instead of one per sample. (The key keeps the "
     "reference's spelling.)", {}),
    ("train_textencoder_learning_rate", "optional_float", None, "TX", "L",
     "Learning rate of the text-encoder modules (BASE) in LoRA mode. Blank or 0 means the same as "
     "train_learning_rate.", dict(minimum=0)),
    ("train_seed", "int", -1, "TX", "all",
     "Random seed for noise and data order; -1 draws a new one each run.",
     dict(minimum=-1, maximum=2**32 - 1)),
    ("train_min_timesteps", "int", 0, "TX", "all",
     "Lowest diffusion timestep trained (0-999). Low timesteps shape details and style.",
     dict(minimum=0, maximum=999)),
    ("train_max_timesteps", "int", 1000, "TX", "all",
     "Upper end of the trained timesteps (1-1000, exclusive). For ADDifT use 500-1000 for actions "
     "and accessories, 200-400 for styles.", dict(minimum=1, maximum=1000)),
    ("train_loss_function", "choice", "MSE", "DD", "all",
     "Per-pixel loss: MSE (squared error), L1 (absolute error) or Smooth-L1 (Huber, beta 1).",
     dict(choices=C.LOSS_FUNCTIONS)),
    ("train_lr_step_rules", "str", "", "TX", "all",
     "Steps of the piecewise_constant scheduler as 'multiplier:step,...,final multiplier', "
     "e.g. '1:100,0.5:200,0.1'. Only that scheduler reads it.", {}),
    ("train_lr_warmup_steps", "int", 0, "TX", "all",
     "Steps over which the learning rate rises from 0 at the start (diffusers-family schedulers).",
     dict(minimum=0)),
    ("train_lr_scheduler_num_cycles", "int", 1, "TX", "all",
     "Number of restarts of cosine_with_restarts.", dict(minimum=1)),
    ("train_lr_scheduler_power", "float", 1.0, "TX", "all",
     "Exponent of the polynomial scheduler's decay.", {}),
    ("train_snr_gamma", "float", 5.0, "TX", "all",
     "Min-SNR loss weighting gamma (0-20; 0 turns it off). 5 is the usual value.",
     dict(minimum=0, maximum=20)),
    ("save_per_steps", "int", 0, "TX", "all",
     "Also save '<name>_<k>steps' every this many steps; 0 turns it off.", dict(minimum=0)),
    ("diff_alt_ratio", "float", 1.0, "TX", "A M",
     "Strength of the reverse (target-to-original) steps of ADDifT. A negative value replaces them "
     "with pure-noise regularisation steps.", {}),
    ("diff_revert_original_target", "bool", False, "CH", "A M",
     "Swap the original and target images (learn the opposite direction).", {}),
    ("diff_use_diff_mask", "bool", False, "CH", "A M",
     "Multiply both predictions by the pair's mask before the loss, so only the masked area "
     "is learned.", {}),
    ("train_model_precision", "choice", "fp16", "DD", "all",
     "Precision of the frozen model weights and of mixed-precision compute. 'model' means fp16; "
     "int8 quantises the weights. fp16 is fine on GPUs.", dict(choices=C.MODEL_PRECISIONS)),
    ("train_lora_precision", "choice", "fp32", "DD", "all",
     "Precision of the trained network's weights. fp32 is recommended.",
     dict(choices=C.LORA_PRECISIONS)),
    ("save_precision", "choice", "fp16", "DD", "all",
     "Precision of the tensors in the saved file. 'model' means fp16.",
     dict(choices=C.SAVE_PRECISIONS)),
    ("train_VAE_precision", "choice", "fp32", "DD", "all",
     "Precision of the VAE when it encodes the training images.", dict(choices=C.VAE_PRECISIONS)),
    ("diff_load_1st_pass", "str", "", "TX", "D A M",
     "Difference: name of an existing copier network in the output folder to use instead of "
     "training pass 1 (.safetensors is added if missing). ADDifT: the found file is resumed from.",
     {}),
    ("diff_save_1st_pass", "bool", False, "CH", "D",
     "Difference: also save the pass-1 copier network as '<name>_copy'.", {}),
    ("diff_1st_pass_only", "bool", False, "CH", "D",
     "Difference: stop after pass 1 (tick diff_save_1st_pass too, or nothing is saved).", {}),
    ("logging_save_csv", "bool", False, "CH", "L I D A M",
     "Write step, loss and learning rate of every step to a CSV log (shown by the Plot tab).", {}),
    ("logging_verbose", "bool", False, "CH", "L I D A M",
     "Print file counts and the name of every created module.", {}),
    ("save_overwrite", "bool", False, "CH", "all",
     "Allow overwriting an existing '<name>.safetensors'; when off, such a run refuses to start.",
     {}),
    ("save_as_json", "bool", False, "CH", "L I D A M",
     "Save these settings as JSON (in jsons/<date>/) when a run starts.", {}),
    ("model_v_pred", "bool", False, "CH", "all",
     "The model predicts v (SD2 768-v and other v-prediction models).", {}),
    ("use_2nd_pass_settings", "bool", False, "CH", "D2",
     "Difference: train pass 2 with the 2nd-pass panel's settings instead of pass 1's.", {}),
]

_EXTENSION_ROWS = [
    ("gradient_accumulation_steps", "int", 1, "TX", "all",
     "Add up the gradients of this many steps before each optimizer update: the effect of a "
     "larger batch without its memory. The reference accepted this key and ignored it.",
     dict(minimum=1)),
    ("train_noise_offset", "float", 0.0, "TX", "L D A M D2",
     "Noise offset: adds this much per-channel constant noise so the model learns very dark and "
     "very bright images; 0 turns it off, 0.05-0.1 are usual values.", dict(minimum=0)),
    ("train_max_grad_norm", "float", 0.0, "TX", "all",
     "Clip the gradient norm to this value before each update; 0 turns clipping off.",
     dict(minimum=0)),
    ("cache_latents_to_disk", "bool", False, "CH", "L M",
     "Also store the encoded images on disk next to the images, so the next run with the same "
     "images and model skips the VAE. Latents and text embeddings are always cached in memory.",
     {}),
    ("addift_timestep_schedule", "choice", "fixed", "DD", "A M",
     "ADDifT timesteps: 'fixed' cycles the reference's five timesteps at 10%, 30%, ... 90% of the "
     "min-max range (compatible results); 'random' draws each step's timestep from [min, max).",
     dict(choices=("fixed", "random"))),
    ("zero_terminal_snr", "bool", False, "CH", "all",
     "Rescale the noise schedule so the last timestep is pure noise (zero terminal SNR). Use it for "
     "models trained that way, normally with v-prediction.", {}),
    ("ileco_latents", "choice", "noise", "DD", "I",
     "iLECO noisy latents: 'noise' trains on pure noise at every timestep (the reference's method; "
     "that is what the model sees only at the first, noisiest sampling step); 'trajectory' takes "
     "them from the base model's own denoising of the original prompt, at the sampled timestep, "
     "and guides the target away from the original prompt, as LECO and ESD do, so the later "
     "sampling steps are trained too and the change holds under classifier-free guidance; about "
     "1.6 times the compute per run.", dict(choices=("noise", "trajectory"))),
    ("clip_skip", "int", 0, "TX", "all",
     "Clip skip used to read captions and prompts: 0 follows the web UI's own Clip skip setting "
     "(1 in the standalone program); 2 reads the CLIP layer before the last, as many anime models "
     "are used. Set it to what you will generate with. SDXL uses at least 2 and on AUTOMATIC1111 "
     "always 2.", dict(minimum=0, maximum=12)),
    ("embeddings_dir", "str", "", "TX", "all",
     "Folder of textual-inversion embeddings that captions and prompts may name, as in the web UI "
     "(the file name is the word). Blank: the web UI's embeddings folder; none standalone.", {}),
    ("preview_prompts", "str", "", "TX", "L I D A M",
     "Prompts of the preview images, one per line. Blank: the trigger word and the first captions "
     "(LoRA, Multi-ADDifT), the original and target prompts (iLECO), the trigger word (ADDifT, Difference).",
     {}),
    ("preview_every_steps", "int", 0, "TX", "L I D A M",
     "Every this many steps, render the preview prompts with the network on and off (one image, "
     "logs/<date>/<name>/previews/step_<k>.png). 0 turns previews off. Previews never change what is trained.",
     dict(minimum=0)),
    ("preview_seed", "int", 1, "TX", "L I D A M",
     "Seed of the preview images (the same for every preview, so they show the change).", dict(minimum=0)),
    ("preview_size", "size", (512, 512), "TX", "L I D A M",
     "Preview image size, 'height,width' or one number (multiples of 8).", {}),
    ("preview_steps", "int", 20, "TX", "L I D A M",
     "Sampling steps of a preview image (Euler).", dict(minimum=1, maximum=150)),
    ("host_check", "bool", True, "CH", "L I D A M",
     "Web UI only: after a run saves its file, render the preview prompts in the web UI's own txt2img "
     "(its sampler, steps and CFG; the preview size and seed) at LoRA weight 0, 0.5 and 1 (and each "
     "<name>_<k>steps file at 1), and report what the web UI's LoRA loader matched or skipped. "
     "The images go next to the previews.", {}),
    ("memory_profile", "choice", "speed", "DD", "L I D A M",
     "How much speed to trade for memory. speed: the settings as they are. balanced: gradient "
     "checkpointing and base weights stored in 16 bits. low: also base weights in fp8 (upcast per "
     "layer), an 8-bit optimizer, the VAE in bf16 and the U-Net on the GPU only after caching, and "
     "optimizer state paged to system memory if it still does not fit. auto: the fastest of these "
     "that the memory estimate says fits in the free GPU memory (speed on a CPU). Each change is "
     "logged with its reason; it only ever switches savings on.",
     dict(choices=C.MEMORY_PROFILES)),
    ("compile_unet", "bool", False, "CH", "L I D A M",
     "Compile the U-Net (or transformer) with torch.compile: faster steps on a GPU after a slower "
     "first one. The compiled kernels are kept under the logs folder (logs/compile), so a second run "
     "does not compile again. Where compiling fails, training goes on uncompiled and says why.", {}),
]

_REQUIRED_ROWS = 17  # the "Required Parameters" group of the UI (SPEC.md §3.1)


def _build() -> tuple[Param, ...]:
    params = []
    for index, row in enumerate(_REFERENCE_ROWS + _EXTENSION_ROWS):
        key, kind, default, ui, modes, help_text, extra = row
        panels = _modes(modes)
        reference = index < len(_REFERENCE_ROWS)
        params.append(Param(
            name=extra.get("name", key), key=key, kind=kind, default=default,
            choices=extra.get("choices"), minimum=extra.get("minimum"), maximum=extra.get("maximum"),
            help=help_text, modes=panels, ui=ui,
            group="required" if index < _REQUIRED_ROWS else "optional",
            reference=reference, second_pass="D2" in panels,
        ))
    return tuple(params)


PARAMS: tuple[Param, ...] = _build()
REFERENCE_PARAMS: tuple[Param, ...] = tuple(p for p in PARAMS if p.reference)
EXTENSION_PARAMS: tuple[Param, ...] = tuple(p for p in PARAMS if not p.reference)
_BY_NAME = {p.name: p for p in PARAMS}
_BY_KEY = {p.key: p for p in PARAMS}

# Case-insensitive optimizer lookup: "adamw" -> "AdamW" (old presets store lower case).
OPTIMIZER_ALIASES: dict[str, str] = {name.lower(): name for name in C.OPTIMIZERS}

# Keys the reference accepts in code but never shows or saves (SPEC.md §3.1, end). They load
# quietly and are not written back. gradient_accumulation_steps is a real setting here.
IGNORED_KEYS = frozenset({
    "diff_use_fixed_noise", "image_use_transparent_background_ajust", "logging_use_wandb",
    "logging_use_tensorboard", "logging_dir", "train_repeat", "train_use_bucket",
    "train_optimizer_args", "gen_noise_scheduler", "lora_train_targets",
})

# JSON keys outside the parameter table -> TrainConfig attribute (SPEC.md §1.4, §2, §3.5).
EXTRA_KEYS: dict[str, str] = {
    "mode": "mode", "model": "model", "vae": "vae", "te": "te",
    "original prompt": "original_prompt", "target prompt": "target_prompt",
    "negative prompt": "negative_prompt", "original image": "original_image",
    "target image": "target_image", "2nd pass": "second_pass",
}


def param(name_or_key: str) -> Param:
    """The Param with this attribute name or JSON key; KeyError naming close matches if none."""
    found = _BY_NAME.get(name_or_key) or _BY_KEY.get(name_or_key)
    if found is None:
        raise KeyError(f"no parameter named {name_or_key!r}{suggest(name_or_key)}")
    return found


def find_param(name_or_key: str) -> Param | None:
    """The Param with this attribute name or JSON key, or None."""
    return _BY_NAME.get(name_or_key) or _BY_KEY.get(name_or_key)


def params_for_mode(mode: str) -> list[Param]:
    """Params that have an effect in a mode ("LoRA", ... or a letter; "D2" = 2nd-pass panel)."""
    letter = C.MODE_LETTERS.get(mode, mode)
    if letter not in MODE_LETTERS:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(C.MODES)} or D2")
    return [p for p in PARAMS if letter in p.modes]


def all_key_spellings() -> list[str]:
    """Every accepted spelling of a setting: JSON keys, attribute names and the extra keys."""
    names = {p.key for p in PARAMS} | {p.name for p in PARAMS}
    return sorted(names | set(EXTRA_KEYS) | set(EXTRA_KEYS.values()))


def suggest(word: str) -> str:
    """' (did you mean ...?)' listing close spellings of a key, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, all_key_spellings(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


_PY_TYPES = {"str": "str", "int": "int", "float": "float", "bool": "bool", "blocks": "list[str]",
             "size": "tuple[int, int]", "optional_float": "float | None"}


def annotation(p: Param) -> str:
    """The Python type a TrainConfig attribute of ``p`` has (a Literal of the choices for kind
    ``choice``): the source of the typed attribute list in ``settings.TrainConfig``."""
    if p.kind == "choice":
        return "Literal[" + ", ".join(repr(c) for c in p.choices) + "]"
    return _PY_TYPES[p.kind]


def annotation_lines(indent: str = "    ", width: int = 110) -> list[str]:
    """``name: type`` for every parameter, in table order (TrainConfig's generated block); a long
    Literal is wrapped over several lines."""
    import textwrap

    lines = []
    for p in PARAMS:
        line = f"{indent}{p.name}: {annotation(p)}"
        if len(line) <= width:
            lines.append(line)
            continue
        values = ", ".join(repr(c) for c in p.choices) + ","
        lines.append(f"{indent}{p.name}: Literal[")
        lines += textwrap.wrap(values, width, initial_indent=indent * 2, subsequent_indent=indent * 2)
        lines.append(f"{indent}]")
    return lines
