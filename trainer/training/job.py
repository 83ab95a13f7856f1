"""Run one training job end to end: config -> host model -> mode tasks -> loop -> saved files.

``run_job`` is what the CLI, the UI and the queue all call. It never leaves the user's
model changed (``host.restore()`` runs after success, error and stop alike), refuses to
overwrite an existing network unless ``save_overwrite`` is on, and on a stop saves what was
learned plus a resumable state under logs/state/.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from trainer import paths
from trainer.training.control import TrainControl
from trainer.training.errors import InputError


@dataclass
class JobResult:
    message: str
    saved: list = field(default_factory=list)
    stopped: bool = False
    steps: int = 0
    csv_paths: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    load_checks: list = field(default_factory=list)  # training.loadcheck.LoadCheck of each pass's last file
    previews: list = field(default_factory=list)     # preview images written during the run, in order


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "model": "float16"}


def resolve_dtype(value: str, device, *, field_name: str):
    """A precision string -> torch dtype, with a clear error where the device cannot do it."""
    import torch

    if value == "int8":
        raise InputError(f"{field_name}: int8 needs torchao weight-only quantisation, which this "
                       "install does not provide; choose fp16 or bf16")
    dtype = getattr(torch, _DTYPES.get(value, "float32"))
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"{field_name}: this GPU does not support bf16; choose fp16 or fp32")
    return dtype


def pick_device(name: str | None = None):
    import torch

    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> int:
    import numpy as np
    import torch

    if seed is None or int(seed) < 0:
        seed = random.SystemRandom().randrange(0, 2**32)
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def run_job(config, *, host, control: TrainControl | None = None, output_dir: Path | None = None,
            logs_dir: Path | None = None, resume: bool = False, device=None) -> JobResult:
    """Train ``config`` with the model ``host`` provides; see the module docstring.

    ``control`` carries stop and save-now requests in and progress, messages and previews out
    (one is made when not given). A host that shows progress or has its own Interrupt
    (``Host.follow``) joins the same control for the run. With ``preview_every_steps`` set, each
    preview image written is announced through ``control.preview(step, paths)``.
    """
    from trainer.training import preflight

    control = control or TrainControl()
    output_dir = Path(output_dir or host.lora_dir())
    logs_dir = Path(logs_dir or paths.logs_dir())
    # Every check that needs no model, before the host's model is touched (a web-UI offloads it).
    prep = preflight.prepare(config, output_dir=output_dir, logs_dir=logs_dir, resume=resume, log=control.log)
    try:
        check = getattr(host, "check", None)  # a host that can check the model/VAE names without loading
        if callable(check):
            check(prep.config)
        follow = getattr(host, "follow", None)
        leave = follow(control) if callable(follow) else None
        try:
            result = _run_prepared(prep, host=host, resume=resume, device=device, control=control)
        finally:
            if callable(leave):
                leave()
        # the web UI's own check, once its model is back: a host that renders with its own txt2img
        if prep.config.host_check and result.saved and not result.stopped and callable(getattr(host, "check_saved", None)):
            _host_check(host, prep, result, control)
        return result
    finally:
        prep.release()


_STEPS_FILE = re.compile(r"_\d+steps(-\d+)?$")


def _captions(prep) -> list[str]:
    planned = prep.data_plan.get("lora") if isinstance(prep.data_plan, dict) else None
    return [item.prompt for item in planned[0]] if planned else []


def _host_check(host, prep, result: JobResult, control: TrainControl) -> None:
    """Render the saved files in the web UI's own txt2img (the preview prompts x weight 0 / 0.5 / 1,
    each ``<name>_<k>steps`` file at 1), record what its LoRA loader matched, and show the grid."""
    from trainer.training.loadcheck import LoadCheck
    from trainer.training.previews import default_prompts, grid, preview_folder, save_image

    config, log = prep.config, control.log
    files = [(Path(p), [1.0] if _STEPS_FILE.search(Path(p).stem) else [0.0, 0.5, 1.0]) for p in result.saved]
    prompts = default_prompts(config, _captions(prep))
    log("Checking the saved file in the web UI's own txt2img...")
    try:
        loads, rows, setup = host.check_saved(files, prompts=prompts, seed=int(config.preview_seed),
                                              size=tuple(config.preview_size), negative=config.negative_prompt or "")
    except Exception as error:  # the run's file is saved; the check only reports
        log(f"note: the check in the web UI could not run ({type(error).__name__}: {error})")
        return
    for load in loads:
        check = LoadCheck(load.file, load.host, modules=load.modules, file_modules=load.file_modules,
                          unmatched=list(load.unmatched), error=load.error, in_host=True, said=list(load.said))
        result.load_checks.append(check)
        for line in check.said:
            log(f"  {load.host}: {line}")
        log(check.summary())
        if not check.ok:
            result.notes.append(check.summary())
    folder = preview_folder(prep.logs_dir, prep.name)
    for index, row in enumerate(rows):
        for weight, path, image in row:
            save_image(image, folder / f"host_{path.stem}_w{weight:g}_{index}.png")
    sheet = save_image(grid([[image for _, _, image in row] for row in rows]), folder / "host_check.png")
    columns = ", ".join(f"{path.stem} at {weight:g}" for weight, path, _ in rows[0]) if rows else ""
    log(f"host check images ({setup.describe()}, seed {config.preview_seed}; columns: {columns}): {sheet}")
    result.previews.append(sheet)
    control.preview(result.steps, [sheet])


def _run_prepared(prep, *, host, resume, device, control: TrainControl) -> JobResult:
    import torch

    from trainer.training import loop
    from trainer.modes import get_mode
    from trainer.modes.base import ModeContext
    from trainer.training.memory.profiles import place_unet, use_sdpa
    from trainer.training.preflight import check_room
    from trainer.training.runlog import CsvLog, csv_path

    config, name, state, state_file = prep.config, prep.name, prep.state, prep.state_file
    output_dir, logs_dir = prep.output_dir, prep.logs_dir
    device = pick_device(device) if not isinstance(device, torch.device) else device
    from trainer.training.distributed import detect

    dist = detect(device)
    if dist.enabled:
        device = dist.accelerator.device
        dist.check_batch(config.train_batch_size)
    model_dtype = resolve_dtype(config.train_model_precision, device, field_name="train_model_precision")
    lora_dtype = resolve_dtype(config.train_lora_precision, device, field_name="train_lora_precision")
    vae_dtype = resolve_dtype(config.train_VAE_precision, device, field_name="train_VAE_precision")
    save_dtype = resolve_dtype(config.save_precision, device, field_name="save_precision")

    log = control.log if dist.is_main else (lambda msg: None)  # one voice in the console
    log("Preparing the model...")
    bundle = host.load(config)
    if config.clip_skip:  # the run's own clip skip and embeddings folder win over the host's
        bundle.text_options = replace(bundle.text_options, clip_skip=config.clip_skip)
    if config.embeddings_dir:
        bundle.text_options = replace(bundle.text_options,
                                      embeddings_dir=str(Path(config.embeddings_dir).expanduser()))
    result = JobResult("")
    undo_compile = None
    try:
        memory = _memory_plan(config, bundle, device, log)
        estimate, free, run_config = memory.estimate, memory.free, memory.config
        vae_dtype = resolve_dtype(run_config.train_VAE_precision, device, field_name="train_VAE_precision")
        seed = state["seed"] if state else seed_everything(config.train_seed)
        if state:
            seed_everything(seed)
        bundle.freeze()
        for te in bundle.text_encoders:
            _place(te, device, model_dtype)
        place_unet(bundle.unet, device, model_dtype, memory, _place, log)
        _place(bundle.vae, device, vae_dtype)
        if memory.profile != "speed":
            log(f"  {use_sdpa(bundle.unet)}")
        if run_config.use_gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
            bundle.unet.train()  # diffusers checkpoints only in train mode; SD has no dropout
        undo_compile = _speed_switches(run_config, bundle, device, logs_dir, log)
        if config.zero_terminal_snr:
            from trainer.training.losses import rescale_zero_terminal_snr

            rescale_zero_terminal_snr(bundle.noise_scheduler)
        # Latents are encoded as batches need them, so the first step does not wait for all of
        # them; a profile that keeps the U-Net off the device until the VAE has left caches first.
        ctx = ModeContext(bundle=bundle, device=device, model_dtype=model_dtype, lora_dtype=lora_dtype,
                          vae_dtype=vae_dtype, log=log, cache_dir=logs_dir / "cache", dist=dist,
                          latents_on_first_use=not memory.defer_unet)
        ctx.extras["resume_pass"] = state["pass"] if state else 0
        ctx.extras["search_dirs"] = [output_dir]
        ctx.extras["data_plan"] = prep.data_plan
        ctx.extras["keep_for_previews"] = config.preview_every_steps > 0
        started = time.time()
        output_dir.mkdir(parents=True, exist_ok=True)
        if config.save_as_json and not resume and dist.is_main:
            # beside the network, and where the reference's "load by name" looks for it
            config.to_json(output_dir / f"{name}.json")
            stamp = time.strftime("%Y%m%d_%H%M%S")
            config.to_json(paths.jsons_dir() / time.strftime("%Y%m%d") / f"{name}-{stamp}.json")
        for index, task in enumerate(get_mode(config.mode).build_tasks(run_config, ctx)):
            if state and index < state["pass"]:
                continue
            stem = name if task.name == "main" else f"{name}_{task.name}"
            csv = None
            if config.logging_save_csv and dist.is_main:
                csv = CsvLog(state["csv"][task.name] if state and task.name in state.get("csv", {})
                             else csv_path(logs_dir, name, "" if task.name == "main" else f"_{task.name}"),
                             _csv_info(task.config, bundle), len(task.param_groups()), append=bool(state))
                result.csv_paths.append(csv.path)
            saver = _saver(task, bundle, output_dir, save_dtype, seed, started, run_config, log)
            if dist.is_main and not task.skip_training:
                every, total = task.config.save_per_steps, task.config.train_iterations
                files = (len(range(every, total, every)) if every > 0 else 0) + 1
                check_room(output_dir, task.network, save_dtype, files)
            opts = loop.LoopOptions(
                save=saver, stem=stem, device=device, model_dtype=model_dtype, control=control, csv=csv, state_path=state_file,
                resume=state if state and index == state["pass"] else None, dist=dist,
                estimate=estimate, free_memory=free, keep_other_state=not resume,
                extra_state={"pass": index, "seed": seed, "config": config.to_dict(),
                             "csv": {task.name: str(csv.path)} if csv else {}},
            )
            if ctx.extras["keep_for_previews"] and dist.is_main:
                opts.preview = _previewer(task, bundle, prep, model_dtype, result, log, control)
            try:
                if not task.skip_training:
                    out = loop.run(task, opts)
                else:
                    keep = task.save_final and dist.is_main
                    out = loop.LoopResult(0, False, [saver(stem, True, 0)] if keep else [], 0.0, [])
            finally:
                if csv:
                    csv.close()
            result.saved += out.saved
            result.notes += out.notes
            # a web UI's own check (host_check, after restore) replaces the diffusers one
            host_checks = prep.config.host_check and callable(getattr(host, "check_saved", None))
            if out.saved and not out.stopped and dist.is_main and not host_checks:
                _load_check(out.saved[-1], bundle, result, log)
            result.steps = out.steps_done
            if out.stopped:
                result.stopped = True
                where = f"Saved {out.saved[-1]}; " if out.saved else ""
                result.message = (f"Stopped at step {out.steps_done}. {where}"
                                  f"continue with --resume (state in {state_file})")
                return result
        if resume and state_file.exists() and dist.is_main:
            state_file.unlink()  # the resumed run is finished; a state it did not resume stays
        if not result.saved:
            result.message = "Finished; this process saved nothing (the main process saves)"
            return result
        result.message = "Finished: saved " + ", ".join(str(p) for p in result.saved[-1:])
        log("Done.")
        return result
    finally:
        if undo_compile is not None:
            undo_compile()
        host.restore()


def _previewer(task, bundle, prep, model_dtype, result: JobResult, log, control: TrainControl):
    """The loop's preview callable of one pass: renders when due, records and reports the image."""
    import torch

    from trainer.training.previews import Previewer, default_prompts, preview_folder

    config = task.config
    previewer = Previewer(
        bundle=bundle, network=task.network, prompts=default_prompts(config, _captions(prep)),
        folder=preview_folder(prep.logs_dir, prep.name), every=config.preview_every_steps,
        seed=config.preview_seed, size=tuple(config.preview_size), steps=config.preview_steps,
        negative=config.negative_prompt or "", autocast_dtype=None if model_dtype == torch.float32 else model_dtype,
        on_parts=_bring_parts(bundle), prefix="" if task.name == "main" else f"{task.name}_")

    def preview(step: int) -> None:
        if not previewer.due(step):
            return
        try:
            path = previewer.render_step(step)
        except Exception as error:  # a preview is a view of the run, never a reason to end it
            log(f"note: the preview at step {step} failed ({type(error).__name__}: {error})")
            return
        result.previews.append(path)
        log(f"preview: {path}")
        control.preview(step, [path])

    return preview


def _bring_parts(bundle):
    """Moves the VAE and text encoders to the U-Net's device for a preview and back where they were."""
    def where(module):
        tensor = next(iter([*module.parameters(), *module.buffers()]), None)
        return None if tensor is None else tensor.device

    kept: dict = {}

    def move(back: bool) -> None:
        for module in [bundle.vae, *bundle.text_encoders]:
            if module is None:
                continue
            if back:
                kept[id(module)] = where(module)
                if kept[id(module)] is not None and kept[id(module)].type == "meta":
                    raise RuntimeError("the VAE or a text encoder was released; previews need them")
                module.to(bundle.device)
            elif kept.get(id(module)) is not None:
                module.to(kept.pop(id(module)))

    return move


def _load_check(path: Path, bundle, result: JobResult, log) -> None:
    """Load the saved file into a weightless copy of the model with another program's loader
    (diffusers, LyCORIS for LoHa) and say what loaded; a failing check never fails the run."""
    from trainer.training.loadcheck import check_file

    try:
        check = check_file(path, bundle)
    except Exception as error:  # the run's file is saved; the check only reports
        log(f"note: the load check of {Path(path).name} could not run ({type(error).__name__}: {error})")
        return
    result.load_checks.append(check)
    log(check.summary())
    if not check.ok and not check.skipped:
        result.notes.append(check.summary())


def _memory_plan(config, bundle, device, log):
    """Estimate the run's peak memory, choose the memory profile's savings (memory/profiles.py),
    say both, and warn (with what to switch on) when it will not fit in the free memory."""
    from trainer.training.memory import profiles
    from trainer.training.memory.advice import format_estimate
    from trainer.training.memory.estimate import estimate_peak, free_device_memory

    free = free_device_memory(device)
    try:
        estimate = estimate_peak(config, bundle, device)
    except (ValueError, KeyError) as exc:  # an unusual model: train anyway, without the estimate
        log(f"note: no memory estimate for this model ({exc})")
        estimate = None
    memory = profiles.plan(config, estimate, device, free)
    if memory.profile != "speed" or memory.asked != "speed":
        for line in memory.lines():
            log(line)
    if memory.estimate is not None:
        log(format_estimate(memory.estimate, free))
    if memory.hint:
        log(memory.hint)
    return memory


def _speed_switches(config, bundle, device, logs_dir: Path, log):
    """Channels-last, pinned batch transfer and (``compile_unet``) torch.compile, each logged once
    (training/speed.py); returns the function that undoes the compile, or None."""
    from trainer.training import speed

    log(f"  {speed.channels_last(bundle.unet, device, transformer=bundle.family.flow)}")
    log(f"  {speed.pinned_transfer(device)}")
    if not config.compile_unet:
        log("  compile: off (compile_unet)")
        return None
    return speed.compile_forward(bundle.unet, logs_dir / "compile", lambda m: log(f"  {m}"))


def _place(module, device, dtype) -> None:
    """Move a frozen module; cast only when the dtype really changes (diffusers warns on every cast)."""
    # Every parameter counts: a host may hold a few in another dtype (Forge keeps the token and
    # position embeddings in fp32 beside an fp16 text encoder).
    same = all(p.dtype == dtype for p in module.parameters() if p.is_floating_point())
    module.to(device=device) if same else module.to(device=device, dtype=dtype)


def _csv_info(cfg, bundle) -> dict:
    return {"network_rank": cfg.network_rank, "network_alpha": cfg.network_alpha,
            "train_learning_rate": cfg.train_learning_rate, "train_iterations": cfg.train_iterations,
            "train_lr_scheduler": cfg.train_lr_scheduler, "model_version": bundle.family.base_model_version,
            "train_optimizer": cfg.train_optimizer, "save_lora_name": cfg.save_lora_name}


def _saver(task, bundle, output_dir: Path, save_dtype, seed: int, started: float, job_config, log):
    """A closure the loop calls to save the task's network under a file stem.

    A file this run did not write is never replaced unless ``save_overwrite`` is on: the start
    refused planned names that exist, and a stop's ``<name>_<k>steps`` that meets someone else's
    file goes to ``<name>_<k>steps-2`` (-3, ...) instead. A failed write raises OSError naming the file.
    """
    from trainer.network.io import build_metadata, save_network

    cfg = task.config

    def save(stem: str, final: bool, steps: int) -> Path:
        training = {"ss_output_name": stem, "ss_seed": str(seed), "ss_training_started_at": str(started),
                    "ss_steps": str(int(steps)), "traintrain_mode": job_config.mode,
                    "traintrain_pass": task.name}
        training.update(task.metadata())
        # rank, alpha and module count come from the live network (a resumed file's ranks win over the config's)
        meta = build_metadata(config=job_config, family=bundle.family, network=task.network,
                              base_model_hash_info=bundle.metadata, training_info=training,
                              prediction_type=bundle.prediction_type)
        path = output_dir / f"{stem}.safetensors"
        if not final and path.exists() and path not in written and not job_config.save_overwrite:
            taken = path
            path = next(p for p in (output_dir / f"{stem}-{n}.safetensors" for n in range(2, 10**6))
                        if not p.exists())
            log(f"note: {taken.name} exists and is not this run's; saved as {path.name} instead")
        overwrite = job_config.save_overwrite or path in written
        try:
            saved = save_network(task.network, path, metadata=meta, dtype=save_dtype,
                                 strength=cfg.network_strength, overwrite=overwrite)
        except OSError as error:
            if isinstance(error, FileExistsError):
                raise
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        written.add(saved)
        return saved

    written: set[Path] = set()
    return save
