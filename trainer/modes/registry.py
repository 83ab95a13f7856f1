"""The training modes: one :class:`Mode` descriptor per mode, registered by name.

Whatever differs between modes outside their task code is a field here, declared once per mode
(``trainer/modes/__init__.py``) and asked by the rest of the trainer: the config checks (what a
run needs set, whether a 2nd pass exists), the preflight (which inputs to probe), the memory
estimate (text encoder, networks kept applied), the page (which widgets and panels show) and the
job (which module builds the tasks). Modelled on PEFT's ``register_peft_method``: registering
checks the descriptor, and a name is registered once.

This module imports nothing heavy: the config and the page ask it before torch is loaded. The
task builders (``trainer/modes/<module>.py``) are imported when a run starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from trainer.config import choices as C

# What a mode trains on, which the preflight probes before the model is touched.
INPUTS = {
    "images": "a folder of captioned images (lora_data_directory)",
    "image pairs": "a folder of image pairs, 'name.png' and 'name<diff_target_name>.png'",
    "two images": "one original image and one target image",
    "prompts": "an original and a target prompt, no images",
}


@dataclass(frozen=True)
class Need:
    """A setting a run cannot start without, and what to say when it is blank ({mode} = the mode's name)."""

    setting: str
    problem: str


@dataclass(frozen=True)
class Mode:
    """What the trainer needs to know about one mode besides its task code.

    Attributes:
        name: the reference's spelling (one of ``choices.MODES``), as settings files and the page hold it.
        tasks: the module whose ``build_tasks(config, ctx)`` yields the passes' tasks.
        inputs: a key of ``INPUTS``: what it trains on.
        needs: settings that must be set before a run starts, in the order they are reported.
        passes: the training passes, in order; ``("copy", "main")`` means a 2nd-pass panel exists.
        text_encoder: whether its network may train the text encoder (BASE in network_blocks).
        latents_on_first_use: whether it can encode latents as batches first need them (the VAE then
            stays through the first epoch, which the memory estimate counts).
        shown_without_effect: settings the page shows in this mode although nothing reads them
            (kept from the reference so every saved key has a widget).
    """

    name: str
    tasks: str
    inputs: str
    needs: tuple[Need, ...] = ()
    passes: tuple[str, ...] = ("main",)
    text_encoder: bool = False
    latents_on_first_use: bool = False
    shown_without_effect: frozenset[str] = field(default_factory=frozenset)

    @property
    def letter(self) -> str:
        """Its letter in the schema's ``modes`` column (which settings it reads)."""
        return C.MODE_LETTERS[self.name]

    @property
    def has_second_pass(self) -> bool:
        """Whether the mode trains twice, the 2nd pass with its own settings panel (Difference)."""
        return len(self.passes) > 1

    @property
    def takes_images(self) -> bool:
        """Whether the page asks for an original and a target image file."""
        return self.inputs == "two images"

    @property
    def takes_prompts(self) -> bool:
        """Whether the page shows the original / target prompts."""
        return self.inputs == "prompts"

    def reads(self, param) -> bool:
        """Whether the setting ``param`` (a schema Param) has an effect in this mode."""
        return self.letter in param.modes

    def shows(self, param) -> bool:
        """Whether the page shows the 1st-pass widget of ``param`` in this mode."""
        return self.reads(param) or param.name in self.shown_without_effect

    def run_problems(self, config) -> list[str]:
        """What this mode needs set before a run can start, one problem per blank setting."""
        return [need.problem.format(mode=self.name) for need in self.needs
                if not str(getattr(config, need.setting) or "").strip()]

    def build_tasks(self, config, ctx):
        """The tasks of a run, one per pass (imports the mode's task module, and with it torch)."""
        return importlib.import_module(self.tasks).build_tasks(config, ctx)


_MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    """Add ``mode`` to the registry; ValueError for a name that is taken or not a reference mode,
    an unknown input kind or passes that do not end with 'main'."""
    if mode.inputs not in INPUTS:
        raise ValueError(f"mode {mode.name!r}: inputs {mode.inputs!r} is not one of {', '.join(INPUTS)}")
    if mode.passes[-1:] != ("main",):
        raise ValueError(f"mode {mode.name!r}: the last pass must be 'main' (it saves under the run's name)")
    if mode.name not in C.MODES:
        raise ValueError(f"mode {mode.name!r} is not one of choices.MODES ({', '.join(C.MODES)})")
    if mode.name in _MODES:
        raise ValueError(f"mode {mode.name!r} is already registered")
    _MODES[mode.name] = mode
    return mode


def get_mode(name: str) -> Mode:
    """The registered mode ``name``; KeyError listing the modes when there is none."""
    try:
        return _MODES[name]
    except KeyError:
        raise KeyError(f"unknown mode {name!r}; one of {', '.join(_MODES)}") from None


def all_modes() -> tuple[Mode, ...]:
    """Every registered mode, in registration order (the reference's order)."""
    return tuple(_MODES.values())
