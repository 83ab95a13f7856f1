"""Everything a run checks before it touches the host's model.

A web-UI host offloads the user's model in ``load``, so every check that can be made without
the model happens here first: settings, the name's length on this file system, the data
folder (images found, decodable, captions readable), the output and logs folders (writable),
the files the run would replace, the per-name run lock, the stopped run's state and whether
the new settings may continue it. A problem raises ``InputError`` naming the setting or file
to fix, and nothing was changed. The plan of the data found here is handed to the mode, so
the images are not probed twice.

After the model is loaded, ``check_room`` adds the one check that needs the network's size:
room on disk for the files the run will write.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainer.training.errors import InputError
from trainer.training.runlock import LockHeld, RunLock

# Settings a resumed run may take from the new request; every other difference refuses.
RESUME_CHANGEABLE = (
    "train_iterations", "save_per_steps", "train_learning_rate", "train_textencoder_learning_rate",
    "logging_save_csv", "logging_verbose", "save_overwrite", "save_as_json", "save_precision",
    "network_strength", "use_gradient_checkpointing",
)
_STATE_KEYS = ("step", "network", "optimizer", "scheduler", "task", "rng", "pass", "config")
_TMP_RANDOM = r"[A-Za-z0-9_]+"
_LONGEST_TMP_TAIL = ".XXXXXXXXXXXX.tmp"  # what atomic_path adds around a file name, with room


@dataclass
class Prepared:
    """What the checks found: the settings to train, the stopped run to continue, the data plan."""

    config: object
    name: str
    output_dir: Path
    logs_dir: Path
    state_file: Path
    state: dict | None
    started: float
    locks: list = field(default_factory=list)
    data_plan: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []


def prepare(config, *, output_dir: Path, logs_dir: Path, resume: bool,
            log: Callable[[str], None] = print) -> Prepared:
    """Run every check that needs no model; on success the run's locks are held (``release()``)."""
    from trainer.training.runlog import state_path

    config.check_for_run()
    name = config.save_lora_name or "untitled"
    started = time.time()
    _check_name_length(config, name, output_dir)
    _check_folder(output_dir, "output folder", "choose another output folder (--output-dir)")
    _check_folder(Path(logs_dir) / "state", "logs folder",
                  "choose another logs folder (--logs-dir) or make this one writable")
    prep = Prepared(config=config, name=name, output_dir=Path(output_dir), logs_dir=Path(logs_dir),
                    state_file=state_path(logs_dir, name), state=None, started=started)
    prep.data_plan = check_inputs(config, output_dir)
    # Under `accelerate launch` every process runs the job; the main one holds the locks.
    secondary = int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    if not secondary:
        _take_locks(prep)
    try:
        removed = [] if secondary else clean_stale_temporaries(prep.output_dir, prep.state_file.parent, name,
                                                               before=started)
        if removed:
            log(f"removed {len(removed)} temporary file(s) left by an interrupted save: "
                + ", ".join(p.name for p in removed))
        if resume:
            from trainer.training.runlog import read_state

            prep.state = read_state(prep.state_file)
            prep.config = resume_config(prep.state, config, log)
        elif prep.state_file.exists():
            log(f"note: a stopped run of '{name}' exists ({prep.state_file}); this new run leaves it in "
                "place. To continue that one instead, resume it (--resume, or tick 'resume the stopped "
                "run' on the page).")
        _check_existing(prep)
    except BaseException:
        prep.release()
        raise
    return prep


# --- the name and the folders -------------------------------------------------------------


def _name_max(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _check_name_length(config, name: str, output_dir: Path) -> None:
    """The longest file name the run writes (a periodic save's temporary file) must fit."""
    longest_steps = max(config.train_iterations, 1)
    longest = f".{name}_copy_{longest_steps}steps.safetensors{_LONGEST_TMP_TAIL}"
    limit = _name_max(Path(output_dir))
    if len(longest.encode("utf-8")) > limit:
        room = limit - (len(longest.encode("utf-8")) - len(name.encode("utf-8")))
        raise InputError(f"save_lora_name is {len(name.encode('utf-8'))} bytes long; file names here hold at "
                         f"most {limit} bytes and the run adds suffixes such as '_{longest_steps}steps"
                         f".safetensors', so use at most {max(room, 1)} characters")


def _check_folder(folder: Path, what: str, fix: str) -> None:
    """The folder exists (or can be made) and a file can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".traintrain-write-check.", suffix=".tmp")
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason += " (nothing can be saved there)"
        raise InputError(f"{what} {folder} is not writable: {reason}; {fix}") from None


# --- locks and leftovers ------------------------------------------------------------------


def _take_locks(prep: Prepared) -> None:
    what = f"training '{prep.name}'"
    for lock in (RunLock(prep.output_dir / f".{prep.name}.lock", what),
                 RunLock(prep.state_file.parent / f".{prep.name}.lock", what)):
        try:
            lock.acquire()
        except LockHeld as held:
            prep.release()
            who = held.owner.describe() if held.owner and held.owner.pid else "another run"
            raise InputError(f"a run named '{prep.name}' is already training ({who}); wait for it to "
                             f"finish or stop it, or choose another save_lora_name") from None
        prep.locks.append(lock)


def own_temporaries(folder: Path, name: str) -> re.Pattern:
    """Temporary files ``atomic_path`` makes for this name's files in ``folder``."""
    stem = re.escape(name)
    return re.compile(rf"^\.{stem}(?:_copy)?(?:_\d+steps)?\.(?:safetensors|json|pt)\.{_TMP_RANDOM}\.tmp$")


def clean_stale_temporaries(output_dir: Path, state_dir: Path, name: str, *, before: float) -> list[Path]:
    """Delete temporary files of this name's saves left by a killed run (older than ``before``)."""
    removed = []
    pattern = own_temporaries(output_dir, name)
    for folder in {Path(output_dir), Path(state_dir)}:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not pattern.match(entry.name) or not entry.is_file():
                continue
            try:
                if entry.stat().st_mtime < before:
                    entry.unlink()
                    removed.append(entry)
            except OSError:
                pass
    return removed


# --- files the run would replace ------------------------------------------------------------


def pass_plans(config) -> list[tuple[str, object]]:
    """(file stem suffix, settings) of each training pass: ("", cfg) or ("_copy", cfg), ("", cfg2)."""
    from trainer.modes import get_mode

    if not get_mode(config.mode).has_second_pass:
        return [("", config)]
    plans = [("_copy", config)]
    if not config.diff_1st_pass_only:
        plans.append(("", config.pass2()))
    return plans


def planned_files(config, output_dir: Path, *, from_pass: int = 0, from_step: int = 0) -> list[Path]:
    """Every file a run of ``config`` writes in ``output_dir`` (final, periodic, settings JSON)."""
    name = config.save_lora_name or "untitled"
    out: list[Path] = []
    for index, (suffix, cfg) in enumerate(pass_plans(config)):
        if index < from_pass:
            continue
        stem = f"{name}{suffix}"
        every, total = int(cfg.save_per_steps or 0), cfg.train_iterations
        first = from_step if index == from_pass else 0
        if every > 0:
            out += [output_dir / f"{stem}_{k}steps.safetensors" for k in range(every, total, every) if k > first]
        final = suffix == "" or config.diff_save_1st_pass or config.diff_1st_pass_only
        if final:
            out.append(output_dir / f"{stem}.safetensors")
    if config.save_as_json and from_pass == 0 and from_step == 0:
        out.append(output_dir / f"{name}.json")
    return out


def _check_existing(prep: Prepared) -> None:
    config = prep.config
    if config.save_overwrite:
        return
    state = prep.state or {}
    existing = [p for p in planned_files(config, prep.output_dir, from_pass=int(state.get("pass", 0)),
                                         from_step=int(state.get("step", 0))) if p.exists()]
    if existing:
        names = ", ".join(p.name for p in existing[:6]) + (f" and {len(existing) - 6} more" if len(existing) > 6 else "")
        verb = "already exists" if len(existing) == 1 else "already exist"
        raise InputError(f"{names} {verb} in {prep.output_dir} and this run would replace "
                         f"{'it' if len(existing) == 1 else 'them'}; choose another save_lora_name, move "
                         "them away, or turn on save_overwrite")


# --- the data ----------------------------------------------------------------------------


def check_inputs(config, output_dir: Path) -> dict:
    """Find and probe the run's images (and caption files); returns the plan the mode reuses."""
    from trainer.config.schema import param
    from trainer.data.images import probe_image
    from trainer.modes import get_mode

    mode = get_mode(config.mode)
    plan: dict = {}
    if mode.inputs == "images":
        from trainer.data.buckets import plan_samples
        from trainer.data.images import discover_images

        items = discover_images(config.lora_data_directory, trigger_word=config.lora_trigger_word,
                                use_filename_as_tag=config.image_use_filename_as_tag)
        specs = plan_samples(items, config.image_size, config.image_buckets_step, config.image_min_length,
                             config.image_max_ratio, sub_image_num=config.sub_image_num,
                             mirroring=config.image_mirroring, disable_upscale=config.image_disable_upscale)
        plan["lora"] = (items, specs)
    elif mode.inputs == "image pairs":
        from trainer.data.pairs import find_pairs, plan_pair_samples

        scan = find_pairs(config.lora_data_directory, config.diff_target_name)
        specs = plan_pair_samples(
            scan.pairs, config.image_size, config.image_buckets_step, config.image_min_length,
            config.image_max_ratio, sub_image_num=config.sub_image_num, mirroring=config.image_mirroring,
            disable_upscale=config.image_disable_upscale, trigger_word=config.lora_trigger_word,
            use_filename_as_tag=config.image_use_filename_as_tag)
        plan["pairs"] = (scan, specs)
    elif mode.inputs == "two images":
        for key, attr in (("original image", "original_image"), ("target image", "target_image")):
            path = Path(getattr(config, attr)).expanduser()
            if not path.is_file():
                raise InputError(f"{key}: {path} does not exist; give the path of an image file")
            probe_image(path)
    if mode.has_second_pass and config.diff_load_1st_pass:
        from trainer.modes.difference import find_first_pass

        try:
            find_first_pass(config.diff_load_1st_pass, [Path(output_dir)])
        except ValueError as error:
            raise InputError(str(error)) from None
    if config.network_resume and mode.reads(param("network_resume")):
        if not Path(config.network_resume).expanduser().is_file():
            raise InputError(f"network_resume: {config.network_resume} does not exist; give the path of a "
                             "saved network file (.safetensors or .pt), or leave it empty")
    if config.embeddings_dir and not Path(config.embeddings_dir).expanduser().is_dir():
        raise InputError(f"embeddings_dir: {config.embeddings_dir} is not a folder; give the folder of your "
                         "textual-inversion embeddings, or leave it empty")
    return plan


# --- resuming ----------------------------------------------------------------------------


def _changeable(key: str) -> bool:
    from trainer.config.schema import find_param

    found = find_param(key)
    return found is not None and found.name in RESUME_CHANGEABLE


def settings_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(JSON key, stopped run's value, new value) of every setting that differs."""
    diffs = []
    for key in list(dict.fromkeys([*old, *new])):
        a, b = old.get(key), new.get(key)
        if key == "2nd pass" and isinstance(a, dict) and isinstance(b, dict):
            diffs += settings_differences(a, b, prefix="2nd pass: ")
        elif a != b:
            diffs.append((prefix + key, a, b))
    return diffs


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_config(state: dict, config, log: Callable[[str], None]):
    """The settings a resumed run trains with: the new request's, when only changeable ones differ.

    Refuses (InputError listing them) when a setting that shapes the network, the data or the
    optimizer differs from the stopped run's.
    """
    old = state.get("config") or {}
    diffs = settings_differences(old, config.to_dict())
    fixed = [d for d in diffs if not _changeable(d[0].removeprefix("2nd pass: "))]
    if fixed:
        listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in fixed)
        raise InputError(f"cannot resume '{config.save_lora_name or 'untitled'}' with these settings changed "
                         f"({listed}). They cannot change in the middle of a run: set them back to the "
                         f"stopped run's values, or start a new run without resume. "
                         f"Only {', '.join(RESUME_CHANGEABLE)} may change on resume.")
    step, index = int(state["step"]), int(state.get("pass", 0))
    plans = pass_plans(config)
    if index < len(plans) and int(plans[index][1].train_iterations) < step:
        raise InputError(f"train_iterations: the stopped run is at step {step} already; "
                         f"{plans[index][1].train_iterations} is below it, so set it to {step} or more")
    if diffs:
        log("resuming with settings taken from this request: "
            + "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs))
    return config


def check_room(output_dir: Path, network, dtype, files: int, *, what: str = "network") -> None:
    """Refuse (InputError) when ``output_dir`` cannot hold ``files`` saves of ``network``."""
    import torch

    per_file = sum(p.numel() for p in network.parameters()) * torch.empty((), dtype=dtype).element_size()
    need = int(per_file * files * 1.05) + 64 * 1024 * files
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return
    if free < need:
        raise InputError(f"output folder {output_dir} has {_mib(free)} free but this run saves {files} "
                         f"{what} file(s) of about {_mib(per_file)} each ({_mib(need)} in all); free some "
                         "space or choose another output folder (--output-dir)")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
