"""WebUIHost: the Host protocol inside AUTOMATIC1111 / Forge, one training session at a time.

A session runs from ``load(config)`` to ``restore()`` (``run_job`` calls the latter in a
``finally``, so also after an error or a stop). During a session the host's GPU lock is
held, the host's job state shows the progress, the host's Interrupt stops the run (both through
the run's ``TrainControl``, which the host joins in ``follow``), and the host's own model is offloaded; ``restore()`` puts that model back, refreshes the host's LoRA
list and releases the lock. Every call into the host goes through the adapters of
``webui.py`` (the only module importing the host's ``modules``).

Typical use from the tab::

    host = WebUIHost()
    control = TrainControl(on_log=...)
    result = run_job(config, host=host, control=control)   # run_job calls host.follow(control)
    control.stop()                                         # from the Stop button
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.hosts.base import ModelLoadError, config_value

_NOT_CHOSEN = ("", "None")


@dataclass
class _Session:
    adapter: Any
    lock: Any
    done: threading.Event = field(default_factory=threading.Event)
    saved: dict | None = None
    bundle: Any = None
    interrupted_logged: bool = False


class WebUIHost:
    """The Host protocol for a web-UI tab (see the module docstring).

    ``config_dir`` replaces the shipped diffusers configs (for non-standard architectures);
    ``log`` receives messages for the user (default: the console, where the host logs too);
    ``poll_s`` is how often the host's Interrupt flag is checked while a run holds the model;
    ``hold_gpu_lock`` False skips the host's queue lock (only for callers that already hold it).
    """

    def __init__(self, *, config_dir: str | Path | None = None, log: Callable[[str], None] = print,
                 poll_s: float = 0.2, hold_gpu_lock: bool = True) -> None:
        self.config_dir = config_dir
        self.log = log
        self.poll_s = poll_s
        self.hold_gpu_lock = hold_gpu_lock
        self._control: Any = None  # the TrainControl of the run this host follows
        self._session: _Session | None = None
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ host facts
    @property
    def adapter(self) -> Any:
        """The adapter of the running host (A1111Adapter or ForgeAdapter), decided at call time."""
        from trainer.hosts.webui import adapter

        return adapter()

    def lora_dir(self) -> Path:
        """The host's LoRA folder (``--lora-dir``, default ``models/Lora``): where runs save."""
        return self.adapter.lora_dir()

    def list_models(self) -> list[str]:
        """Checkpoint titles the host lists; "" (blank) in ``config.model`` means the loaded model."""
        return self.adapter.checkpoint_titles()

    def list_vaes(self) -> list[str]:
        """VAE names the host lists (keys of ``sd_vae.vae_dict``)."""
        return list(self.adapter.vae_files())

    def refresh_lists(self) -> None:
        """Rescan the host's checkpoint and VAE folders (what the host's refresh buttons do)."""
        self.adapter.rescan()

    def loaded_model_name(self) -> str:
        """Title of the checkpoint the host has loaded now, "" if none."""
        model = self.adapter.loaded_model(load=False)
        info = getattr(model, "sd_checkpoint_info", None)
        return str(getattr(info, "title", "") or "")

    # ------------------------------------------------------------------ Host protocol
    def check(self, config: Any) -> None:
        """ModelLoadError when ``config`` names a model or VAE the host does not have; called before
        ``load``, so a wrong name is reported while the user's model is still where it was."""
        adapter = self.adapter
        name = str(config_value(config, "model") or "").strip()
        if name not in _NOT_CHOSEN:
            info = adapter.find_checkpoint(name)
            path = Path(info.filename) if info is not None else self._existing_file(adapter, name)
            if adapter.name == "AUTOMATIC1111":
                _refuse_transformer_on_a1111(path)
        self._vae_path(adapter, config_value(config, "vae"))

    def model_family(self, name: str) -> str | None:
        """The family of the checkpoint ``name`` (read from its file's keys; blank: the model the host has
        loaded, by its flags and engine, without loading one), None when it cannot be told."""
        from trainer.hosts.standalone import family_of

        if not name or name in _NOT_CHOSEN:
            adapter = self.adapter
            model = adapter.loaded_model(load=False)
            try:
                return adapter.family(model) if model is not None else None
            except ModelLoadError:
                return None
        info = self.adapter.find_checkpoint(name) if name and name not in _NOT_CHOSEN else None
        path = Path(info.filename) if info is not None else Path(name or "")
        return family_of(path) if name and path.exists() else None

    def load(self, config: Any) -> Any:
        """Start a session and hand over the model ``config.model`` names (blank: the loaded one).

        The host's model is offloaded before the bundle is built. On failure the session is
        ended (model back, lock released) before the error propagates.
        """
        session = self._begin()
        try:
            session.bundle = self._load(session, config)
            session.bundle.text_options = session.adapter.text_options()  # prompts read as the host reads them
            return session.bundle
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """End the session: free the bundle, put the host's model back, refresh its LoRA list, unlock."""
        session = self._session
        if session is None:
            return
        try:
            _release(session.bundle)
            session.bundle = None
            if session.saved is not None:
                try:
                    session.adapter.restore(session.saved)
                except Exception as error:  # the run's own outcome must not be hidden by this
                    self.log(f"Could not put the web UI's model back ({type(error).__name__}: {error}); "
                             "select the checkpoint again in the web UI.")
            try:
                session.adapter.refresh_loras()
            except Exception as error:
                self.log(f"Could not refresh the web UI's LoRA list ({type(error).__name__}: {error}).")
        finally:
            session.done.set()
            try:
                session.adapter.state().end()
            finally:
                self._session = None
                if session.lock is not None:
                    session.lock.release()

    def follow(self, control: Any) -> Callable[[], None]:
        """Join a run's control: its progress shows in the host's job state (before the caller's
        listeners see it), and the host's Interrupt is a stop source the loop asks at every step.
        Returns the function that leaves it."""
        self._control = control
        stop_listening = control.listen(on_progress=self._progress, first=True)
        stop_watching = control.watch(self._interrupted)

        def leave() -> None:
            stop_listening()
            stop_watching()
            if self._control is control:
                self._control = None

        return leave

    def _interrupted(self) -> bool:
        """Whether the host's Interrupt was pressed during the run (said once in the log)."""
        session = self._session
        return session is not None and self._check_interrupt(session)

    def _progress(self, event: Any) -> None:
        """Show a loop progress event in the host's job state; a host Interrupt requests a stop."""
        session = self._session
        if session is None:
            return
        state = session.adapter.state()
        state.sampling_steps = int(getattr(event, "total", 0) or 0)
        state.sampling_step = int(getattr(event, "step", 0) or 0)
        loss = getattr(event, "loss_ema", float("nan"))
        state.textinfo = (f"{getattr(event, 'pass_name', '')}: step {state.sampling_step}/{state.sampling_steps}"
                          + (f", loss {loss:.4f}" if loss == loss else ""))
        self._check_interrupt(session)

    # ------------------------------------------------------------------ the host's own txt2img
    def txt2img_settings(self) -> Any:
        """The host's txt2img settings now (``webui_txt2img.Txt2ImgSettings``)."""
        from trainer.hosts import webui_txt2img

        return webui_txt2img.settings(self.adapter.name)

    def generate(self, prompts: list[str], *, seed: int, negative: str = "",
                 size: tuple[int, int] | None = None) -> tuple[list, Any]:
        """``prompts`` rendered by the host's txt2img with its current settings, one seed for all;
        ``size`` (height, width) replaces the host's. Returns (PIL images, the settings used)."""
        from trainer.hosts import webui_txt2img

        with self._generating("TrainTrain: prompt preview") as adapter:
            setup = webui_txt2img.settings(adapter.name)
            height, width = size if size else (setup.height, setup.width)
            images = [webui_txt2img.txt2img(p, negative=negative, seed=seed, setup=setup, width=width, height=height)
                      for p in prompts]
        return images, setup

    def check_saved(self, files: list[tuple[Path, list[float]]], *, prompts: list[str], seed: int,
                    size: tuple[int, int], negative: str = "") -> tuple[list, list, Any]:
        """Each saved file through the host's own ``<lora:name:w>`` path at its weights, every prompt
        (one seed), and what the host's LoRA loader made of it. Returns (HostLoad per file, one row of
        (weight, file, PIL image) per prompt, the settings used). The model is as before afterwards."""
        from trainer.hosts import webui_txt2img

        loads, rows = [], [[] for _ in prompts]
        with self._generating("TrainTrain: check in the web UI") as adapter:
            setup = webui_txt2img.settings(adapter.name)
            self.adapter.refresh_loras()  # the files were just written
            try:
                for path, weights in files:
                    for weight in weights:
                        webui_txt2img.prepare_report(adapter.name)
                        with webui_txt2img.console_lines() as echo:
                            for row, prompt in zip(rows, prompts):
                                tagged = f"{prompt} <lora:{Path(path).stem}:{weight:g}>".strip()
                                row.append((weight, Path(path), webui_txt2img.txt2img(
                                    tagged, negative=negative, seed=seed, setup=setup, width=size[1], height=size[0])))
                        if weight == max(weights):
                            loads.append(webui_txt2img.report(adapter.name, Path(path), echo.lines))
            finally:
                webui_txt2img.drop_networks(adapter.name)
                _return_freed()  # the merged copies the host's loader made for these files
        return loads, rows, setup

    @contextlib.contextmanager
    def _generating(self, job: str):
        """The host's queue lock and job state around a generation here (never during a run)."""
        if self._session is not None:
            raise ModelLoadError("a training run is using the web UI's model; generate when it has finished")
        adapter = self.adapter
        lock = adapter.queue_lock() if self.hold_gpu_lock else None
        if lock is not None and not lock.acquire(blocking=False):
            self.log("Waiting for the web UI to finish its current job...")
            lock.acquire()
        import torch

        try:
            state = adapter.state()
            state.begin(job=job)
            # the hosts' LoRA code changes weights in place and leaves grad mode to its caller; the
            # U-Net's parameters require grad, so nothing here may record autograd (as in a generation)
            try:
                with torch.no_grad():
                    yield adapter
            finally:
                state.end()
        finally:
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ session internals
    def _begin(self) -> _Session:
        with self._guard:
            if self._session is not None:
                raise ModelLoadError("a training run is already using the web UI's model; wait for it to end "
                                     "or stop it first")
            adapter = self.adapter
            lock = adapter.queue_lock() if self.hold_gpu_lock else None
            if lock is not None and not lock.acquire(blocking=False):
                self.log("Waiting for the web UI to finish its current job...")
                lock.acquire()
            session = _Session(adapter, lock)
            self._session = session
        try:
            state = adapter.state()
            state.begin(job="TrainTrain")  # also clears an Interrupt left from an earlier generation
            state.job_count = 1
        except BaseException:
            self.restore()
            raise
        threading.Thread(target=self._watch, args=(session,), name="traintrain-interrupt", daemon=True).start()
        return session

    def _watch(self, session: _Session) -> None:
        """Turn the host's Interrupt into a stop request even when no progress event comes."""
        while not session.done.wait(self.poll_s):
            self._check_interrupt(session)

    def _check_interrupt(self, session: _Session) -> bool:
        """Whether the host's Interrupt is pressed; if so, say it once and stop the run's control."""
        state = session.adapter.state()
        if not (getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False)):
            return False
        if not session.interrupted_logged:
            session.interrupted_logged = True
            self.log("Interrupted from the web UI: stopping after this step.")
        if self._control is not None:
            self._control.stop()
        return True

    def _load(self, session: _Session, config: Any) -> Any:
        adapter = session.adapter
        name = str(config_value(config, "model") or "").strip()
        ticked = bool(config_value(config, "model_v_pred", False))
        vae_path = self._vae_path(adapter, config_value(config, "vae"))
        use_loaded = name in _NOT_CHOSEN
        model = adapter.loaded_model(load=use_loaded)
        info, path = None, None
        if use_loaded and model is None:
            raise ModelLoadError("the web UI has no model loaded; load one there or choose a checkpoint as the model")
        if not use_loaded:
            info = adapter.find_checkpoint(name)
            path = Path(info.filename) if info is not None else self._existing_file(adapter, name)
            use_loaded = model is not None and _same_file(getattr(model, "sd_checkpoint_info", None), path)
        session.saved = adapter.remember(model)
        adapter.offload(session.saved)
        self.log(f"The {adapter.name} model is offloaded for training; it is put back afterwards.")
        if use_loaded:
            return self._from_loaded(adapter, model, vae_path, ticked)
        te = str(config_value(config, "te") or "").strip()  # a Flux / Z-Image transformer file's text encoders
        return self._from_file(path, vae_path, True if ticked else None, info,
                               te_path=Path(te) if te and te != "None" else None)

    def _from_loaded(self, adapter: Any, model: Any, vae_path: Path | None, ticked: bool) -> Any:
        from trainer.hosts.webui_weights import bundle_from_host_state, normalise_keys, unusable_tensors

        family = adapter.family(model)
        if adapter.lora_merged(model) and self._unmerge(adapter) and not adapter.lora_merged(model):
            self.log(f"The LoRA the last generation merged into the {adapter.name} model was taken out with "
                     f"{adapter.name}'s own loader (its next generation with a LoRA merges it again).")
        if family == "flux":
            return self._flux_from_loaded(adapter, model, vae_path)
        info = getattr(model, "sd_checkpoint_info", None)
        host_prediction = adapter.prediction(model)
        reason, state = None, None
        if adapter.lora_merged(model):
            reason = "its weights carry a LoRA merged in by the last generation"
        else:
            state, layouts = adapter.weights(model, family, self.config_dir)
            state = normalise_keys(state)  # the hosts' wrappers (A1111 hijack, Forge TI) out of the key paths
            bad = unusable_tensors(state)
            if bad:
                reason = f"its weights are quantised (e.g. {bad[0]})"
        if reason is not None:
            filename = Path(getattr(info, "filename", "") or "")
            if not filename.is_file():
                raise ModelLoadError(f"the web UI's loaded model cannot be trained as held in memory ({reason}), "
                                     "and its checkpoint file is not available; choose a checkpoint file")
            self.log(f"Reading {filename.name} from disk: the loaded model cannot be used as it is ({reason}).")
            v_pred = True if ticked or host_prediction == "v_prediction" else None
            return self._from_file(filename, vae_path, v_pred, info)
        vae = self._vae(vae_path, family) if vae_path is not None else None
        return bundle_from_host_state(
            state, family=family, host_prediction=host_prediction, v_pred_option=ticked or None,
            config_dir=self.config_dir, te_layouts=layouts, vae=vae,
            source=str(getattr(info, "title", "") or "the web UI's loaded model"), metadata=_checkpoint_meta(info))

    @staticmethod
    def _unmerge(adapter: Any) -> bool:
        """Put the weights a LoRA was merged into back the host's own way (``drop_networks``: the
        backups its loader keeps go back in place); False if that fails. Reading the checkpoint
        file instead would hold a second copy of the model in memory."""
        import torch

        from trainer.hosts.webui_txt2img import drop_networks

        try:
            with torch.no_grad():  # A1111 restores its layers in place; their weights require grad
                drop_networks(adapter.name)
        except Exception:  # noqa: BLE001 - a host without that loader: the file is read instead
            return False
        _return_freed()  # the merged copies
        return True

    def _flux_from_loaded(self, adapter: Any, model: Any, vae_path: Path | None) -> Any:
        from trainer.hosts.webui_dit import flux_from_loaded

        vae = self._vae(vae_path, "flux") if vae_path is not None else None
        info = getattr(model, "sd_checkpoint_info", None)
        return flux_from_loaded(adapter, model, vae=vae, config_dir=self.config_dir, log=self.log,
                                source=str(getattr(info, "title", "") or "the web UI's loaded model"),
                                metadata=_checkpoint_meta(info))

    def _from_file(self, path: Path, vae_path: Path | None, v_pred: bool | None, info: Any,
                   te_path: Path | None = None) -> Any:
        from trainer.hosts.standalone import load_model

        bundle = load_model(path, vae_path=vae_path, v_pred=v_pred, config_dir=self.config_dir, te_path=te_path)
        bundle.metadata.update(_checkpoint_meta(info))
        return bundle

    def _vae(self, path: Path, family: str) -> Any:
        from trainer.hosts.components import ConfigFolders
        from trainer.hosts.standalone import load_vae

        return load_vae(path, vae_config=ConfigFolders(family, self.config_dir).json("vae"))

    @staticmethod
    def _vae_path(adapter: Any, vae: Any) -> Path | None:
        name = str(vae or "").strip()
        if name in _NOT_CHOSEN or name.lower() in ("none", "automatic"):
            return None
        files = adapter.vae_files()
        if name in files:
            return Path(files[name])
        if Path(name).is_file():
            return Path(name)
        known = ", ".join(list(files)[:8]) or "none found"
        raise ModelLoadError(f"vae: {name!r} is not a VAE the web UI lists (known: {known}); choose one of them, "
                             "None, or a VAE file path")

    @staticmethod
    def _existing_file(adapter: Any, name: str) -> Path:
        if Path(name).is_file():
            return Path(name)
        known = ", ".join(adapter.checkpoint_titles()[:8]) or "none found"
        raise ModelLoadError(f"model: {name!r} is not a checkpoint the web UI lists (known: {known}); choose one of "
                             "them, leave it blank for the loaded model, or refresh the list")


def _refuse_transformer_on_a1111(path: Path) -> None:
    """ModelLoadError when ``path`` is a Flux.1 / Z-Image transformer: AUTOMATIC1111 can neither load
    nor generate with those families, so a network trained here could not be tried in it. Read from the
    file's key names only (a safetensors header); a file it cannot read is left to the load to report."""
    from trainer.families import get_family
    from trainer.hosts.checkpoint_file import CheckpointFile, detect_family

    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return
    try:
        family = get_family(detect_family(CheckpointFile(path, "model")))
    except Exception:  # not a model this trainer knows: the load names the problem
        return
    if family.is_dit:
        raise ModelLoadError(
            f"model: {path.name} is a {family.title} model, and AUTOMATIC1111 has no {family.title} support (it "
            f"cannot load the model or use a {family.title} LoRA), so this tab cannot train it; train it in Forge "
            "(Flux.1) or a Forge Neo fork (Z-Image), or on the standalone page (python -m trainer ui)")


def _same_file(info: Any, path: Path) -> bool:
    filename = getattr(info, "filename", None)
    try:
        return bool(filename) and Path(filename).resolve() == Path(path).resolve()
    except OSError:
        return False


def _checkpoint_meta(info: Any) -> dict:
    """Base-model facts for the saved file's header (``ss_sd_model_name`` / ``_hash``)."""
    if info is None:
        return {}
    meta = {"name": getattr(info, "model_name", None) or getattr(info, "title", None),
            "hash": getattr(info, "hash", None), "sha256": getattr(info, "sha256", None)}
    filename = getattr(info, "filename", None)
    if filename:
        meta["model_name"] = Path(filename).stem
    return {k: v for k, v in meta.items() if v}


def _return_freed() -> None:
    """Collect what was just let go and hand the freed heap back to the operating system: a host
    generating with a LoRA merges copies of the weights it patches (Forge: an SDXL U-Net's worth),
    and without the trim they stay in its resident memory after the LoRA is taken off."""
    from trainer.heap import return_freed_memory

    gc.collect()
    return_freed_memory()


def _release(bundle: Any) -> None:
    """Free the bundle's weights before the host's model goes back (the run is over by now).

    Moving a module to the meta device replaces that module's own parameters only; tensors it
    shared with the host stay with the host.
    """
    if bundle is None:
        return
    for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        if module is not None:
            module.to("meta")
    _return_freed()  # else the freed copy stays in the host's resident memory, run after run
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
