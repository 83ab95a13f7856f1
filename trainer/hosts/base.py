"""The Host protocol: where a training run gets its model from and reports to.

A host is the environment the trainer runs in: the standalone program (checkpoints read from
disk, see ``standalone.py``) or a web-UI (the weights it already has loaded, see ``webui.py``).
The job runner only talks to this small interface, so modes, the network and the loop never
know which host they run under:

1. ``load(config)`` hands over a frozen :class:`~trainer.bundle.ModelBundle`;
2. optionally (see the end of ``Host``), ``follow(control)`` joins the run's ``TrainControl`` (see
   ``trainer/training/control.py``) to show its progress and turn the host's own Interrupt into
   ``control.stop()``;
3. ``restore()`` puts the user's session back as it was (always called, also after an error);
4. the finished network is saved under ``lora_dir()``.

``list_models()`` / ``list_vaes()`` feed the model and VAE dropdowns.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from trainer.bundle import ModelBundle


class ModelLoadError(ValueError):
    """A model, VAE or config could not be loaded; the message says which file and what to do."""


@runtime_checkable
class Host(Protocol):
    """What the job runner needs from the environment it runs in."""

    def load(self, config: Any) -> "ModelBundle":
        """Load the model the config names (``model``, ``vae``, ``model_v_pred``) as a frozen bundle.

        Raises :class:`ModelLoadError` with a message for the user when that is not possible.
        """
        ...

    def restore(self) -> None:
        """Give the user's session back after a run (reload what ``load`` unloaded); idempotent."""
        ...

    def lora_dir(self) -> Path:
        """Folder where trained networks are saved and looked up (resume, 1st-pass copier)."""
        ...

    def list_models(self) -> list[str]:
        """Names of the selectable base models, as ``load`` accepts them in ``config.model``."""
        ...

    def list_vaes(self) -> list[str]:
        """Names of the selectable VAEs, as ``load`` accepts them in ``config.vae``."""
        ...

    # Optional, looked up with getattr by run_job (a host without them is still a Host):
    #
    # def check(self, config) -> None
    #     raise ModelLoadError for a model/VAE choice that cannot load, without loading anything;
    #     run_job calls it before load.
    # def check_saved(self, files, *, prompts, seed, size, negative) -> (loads, rows, settings)
    #     web UI only: after the run (model back), render each (file, weights) through the host's own
    #     txt2img and report what its LoRA loader matched (see webui_session.WebUIHost.check_saved);
    #     run_job calls it when host_check is on.
    # def follow(self, control) -> Callable[[], None]
    #     join a run's TrainControl for the run (control.listen(on_progress=...) for the host's own
    #     progress display, control.stop() on the host's Interrupt); returns the function that
    #     leaves it, which run_job calls when the run ends.


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config[name]`` for a mapping (preset JSON), else ``getattr(config, name)``; ``default`` if absent.

    Hosts accept either a TrainConfig object or the raw preset dict, so they read settings
    through this one helper.
    """
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)
