"""TrainTrain: LoRA / LoCon / LoHa trainer for Stable Diffusion.

The package is importable with no web-UI present. Heavy libraries (torch, diffusers,
transformers) are imported by the modules that need them, never here, so that the web-UI
can register the tab without paying for them.
"""

__version__ = "0.1.0"
