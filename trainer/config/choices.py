"""Exact strings of every enumeration the reference's presets and UI use (SPEC.md §3.2).

Kept in one small module so the config schema, the optimizer factory and the UI agree
without importing each other.
"""

MODES = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")

# Mode letters used in the parameter table: which panels show a parameter.
MODE_LETTERS = {"LoRA": "L", "iLECO": "I", "Difference": "D", "ADDifT": "A", "Multi-ADDifT": "M"}

NETWORK_TYPES = ("lierla", "c3lier", "loha")
NETWORK_ELEMENTS = ("Full", "CrossAttention", "SelfAttention")
NETWORK_RANKS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
NETWORK_ALPHAS = (0.03125, 0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Dropdown order of the reference, without its selectable separator entries.
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy",
    "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD",
    "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit",
    "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree",
    "CAME", "Tiger", "AdamMini", "PagedAdamW", "PagedAdamW32bit", "SGDNesterov", "Adam",
)

LR_SCHEDULERS = (
    "cosine_annealing", "cosine_annealing_with_restarts", "linear", "cosine", "cosine_with_restarts",
    "polynomial", "constant", "constant_with_warmup", "piecewise_constant", "exponential", "step",
    "multi_step", "reduce_on_plateau", "cyclic", "one_cycle",
)

MODEL_PRECISIONS = ("model", "fp32", "bf16", "fp16", "int8")
LORA_PRECISIONS = ("fp32", "bf16", "fp16")
SAVE_PRECISIONS = ("model", "fp32", "bf16", "fp16")
VAE_PRECISIONS = ("fp32", "bf16", "fp16")
# Spellings the reference's parser also accepts; "fp8" means fp16 there.
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp8": "fp16"}

LOSS_FUNCTIONS = ("MSE", "L1", "Smooth-L1")
BUCKET_STEPS = (0, 64, 128, 192, 256, 320, 384, 448, 512, 576)

# The block ids the UI shows and presets store (SD1/SD2 layout; BASE = text encoder(s)).
BLOCKID26 = ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
# Flow-matching transformer families (SPEC.md §3.2): text encoders, IN (embedders), double-stream
# blocks D00-D18 / single-stream blocks S.., OUT (final layer).
FLUX_BLOCK_IDS = ("CLIP", "T5", "IN") + tuple(f"D{i:02d}" for i in range(19)) + tuple(f"S{i:02d}" for i in range(38)) + ("OUT",)
ZIMAGE_BLOCK_IDS = ("QWEN3", "IN") + tuple(f"S{i:02d}" for i in range(30)) + ("OUT",)
# The text-encoder ids: BASE (the SD families' text encoder(s)), CLIP and T5 (Flux.1), QWEN3 (Z-Image).
TEXT_ENCODER_IDS = ("BASE", "CLIP", "T5", "QWEN3")
# Ids a settings file may hold besides BLOCKID26 (the UI shows BLOCKID26 only).
TRANSFORMER_BLOCK_IDS = tuple(dict.fromkeys(FLUX_BLOCK_IDS + ZIMAGE_BLOCK_IDS))
MEMORY_PROFILES = ("speed", "balanced", "low", "auto")
