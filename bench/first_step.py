"""Time to the first training step of ``python -m trainer train``, from the start of the process.

    python bench/first_step.py                          # this checkout, SD1.5 at 128 px on the CPU
    python bench/first_step.py --before /tmp/old-tree   # also an older checkout, alternating runs
    python bench/first_step.py --model small            # a small SD1.5-shaped model (~1 GiB of RAM)

Each run is a fresh interpreter that runs the CLI's ``train`` command exactly as a user does
(``trainer.cli.main(["train", ...])``) on the bench's random-weight full-size SD1.5 file (written
once by ``bench_sd15.py``'s ``write_checkpoint``). At the first finished optimizer step it records
the wall time since the process started (Linux ``/proc/self/stat``) and the process CPU time
(all threads), then ends. The first step therefore includes the interpreter, every import, the
model load, latent and caption caching and one step. Times are the fastest of ``--repeat`` runs
(other work on the machine only slows a run down); CPU time is steadier than wall time on a busy
machine. Also printed: what was imported by then (bitsandbytes, peft, diffusers' single-file
module) and the lines the run wrote to the console.

``--model small`` keeps SD1.5's layout, its full VAE and CLIP-L text encoder, but narrows the
U-Net to 64/128/256/256 channels (about 4 % of its parameters), written once as an LDM single file
with its own ``unet/config.json``: the same imports, conversion, caching and text encoding as the
full model, in about a fifth of the memory. The child hands that config folder to the standalone
host (``config_dir``), which the CLI has no option for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _since_start() -> float:
    """Wall seconds since this process started (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


def child(tree: str, config: str, out: str) -> None:
    import resource

    sys.path.insert(0, tree)
    import trainer.cli.train as train_cli

    original = train_cli._ProgressBar.update
    original_write = train_cli._ProgressBar.write
    timeline = []

    def cpu_now() -> float:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime

    def write(self, message):
        timeline.append((round(_since_start(), 1), round(cpu_now(), 1), str(message).splitlines()[0][:60]))
        return original_write(self, message)

    def update(self, event):
        if not event.message and event.step >= 1:
            Path(out).write_text(json.dumps({
                "wall": _since_start(), "cpu": cpu_now(), "timeline": timeline,
                "modules": {m: m in sys.modules for m in ("bitsandbytes", "peft", "diffusers.loaders.single_file_utils",
                                                          "torch._dynamo")},
            }))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return original(self, event)

    train_cli._ProgressBar.update = update
    train_cli._ProgressBar.write = write
    config_dir = os.environ.get("FIRST_STEP_CONFIG_DIR")
    if config_dir:
        from trainer.hosts import standalone

        original_init = standalone.StandaloneHost.__init__

        def init(self, *args, **kwargs):
            kwargs.setdefault("config_dir", config_dir)
            original_init(self, *args, **kwargs)

        standalone.StandaloneHost.__init__ = init
    timeline.append((round(_since_start(), 1), round(cpu_now(), 1), "(interpreter started, trainer.cli imported)"))
    from trainer.cli import main

    sys.exit(main(["train", config, "--device", "cpu", "--output-dir", str(Path(out).parent / "output"),
                   "--logs-dir", str(Path(out).parent / "logs")]))


def write_config(folder: Path, checkpoint: Path, images: Path, resolution: int) -> Path:
    values = json.loads((ROOT / "presets" / "LoRA.json").read_text(encoding="utf-8"))
    values.update({
        "model": str(checkpoint), "lora_data_directory": str(images),
        "image_size(height, width)": str(resolution), "image_min_length": str(resolution),
        "train_iterations": "2", "train_batch_size": "1", "train_optimizer": "AdamW", "train_seed": "1",
        "save_lora_name": "first_step", "save_overwrite": True, "train_model_precision": "fp32",
        "save_precision": "fp32",
    })
    path = folder / "first_step.json"
    path.write_text(json.dumps(values, indent=1), encoding="utf-8")
    return path


def write_small_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A small SD1.5-shaped single file (narrow U-Net, full VAE and CLIP-L) and its config folder."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path, config_dir = folder / "sd1-small.safetensors", folder / "sd1-small-config"
    if path.is_file() and (config_dir / "unet" / "config.json").is_file():
        return path, config_dir
    sys.path.insert(0, str(ROOT / "tests"))
    import ldm  # the LDM key layout (test helper)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    shipped = ROOT / "trainer" / "assets" / "sd1"
    unet_config = json.loads((shipped / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [64, 128, 256, 256]
    torch.manual_seed(0)
    parts = {"unet": UNet2DConditionModel.from_config(unet_config),
             "vae": AutoencoderKL.from_config(json.loads((shipped / "vae" / "config.json").read_text())),
             "text_encoders": [CLIPTextModel(CLIPTextConfig.from_json_file(str(shipped / "text_encoder" / "config.json")))]}
    state = {k: v.half().contiguous() for k, v in ldm.ldm_state_dict("sd1", parts).items()}
    (config_dir / "unet").mkdir(parents=True, exist_ok=True)
    (config_dir / "unet" / "config.json").write_text(json.dumps(unet_config, indent=1))
    tmp = path.with_suffix(".partial")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path, config_dir


def run_once(tree: Path, config: Path, work: Path, threads: int, config_dir: Path | None = None) -> dict:
    out = work / "result.json"
    if out.exists():
        out.unlink()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    if config_dir is not None:
        env["FIRST_STEP_CONFIG_DIR"] = str(config_dir)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(tree), "--config",
                           str(config), "--out", str(out)], env=env, capture_output=True, text=True)
    if not out.exists():
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        sys.exit(f"error: the run in {tree} ended (exit {done.returncode}) before its first step")
    result = json.loads(out.read_text())
    result["console"] = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()
                         and "%|" not in line]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="an older checkout to compare with (its trainer/ package is used)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--model", choices=("full", "small"), default="full",
                   help="full-size SD1.5, or a small SD1.5-shaped model (narrow U-Net)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "traintrain-bench"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.config, args.out)
        return 0
    sys.path.insert(0, str(HERE))
    from common import write_checkpoint, write_images

    cache = Path(args.cache_dir)
    config_dir = None
    if args.model == "small":
        checkpoint, config_dir = write_small_checkpoint(cache)
    else:
        checkpoint = write_checkpoint("sd1", cache)
    images = write_images(cache / f"images-{args.resolution}-{args.images}", args.images, args.resolution)
    work = Path(tempfile.mkdtemp(prefix="first-step-", dir=cache))
    config = write_config(work, checkpoint, images, args.resolution)
    trees = {"this checkout": ROOT}
    if args.before:
        trees = {"before": Path(args.before).resolve(), **trees}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.repeat):
        for name, tree in trees.items():
            tic = time.perf_counter()
            runs[name].append(run_once(tree, config, work, args.threads, config_dir))
            print(f"{name}: first step at {runs[name][-1]['wall']:.1f} s wall, {runs[name][-1]['cpu']:.1f} s CPU "
                  f"({time.perf_counter() - tic:.0f} s)", flush=True)
    print()
    print("| tree | first step, wall (s) | first step, CPU (s) | imported by then |")
    print("|---|---|---|---|")
    best = {}
    for name, results in runs.items():
        best[name] = (min(r["wall"] for r in results), min(r["cpu"] for r in results))
        mods = ", ".join(m for m, v in results[0]["modules"].items() if v) or "none of the watched"
        print(f"| {name} | {best[name][0]:.1f} | {best[name][1]:.1f} | {mods} |")
    if len(best) == 2:
        (bw, bc), (aw, ac) = best["before"], best["this checkout"]
        print(f"| after / before | **{aw / bw:.2f}x** | **{ac / bc:.2f}x** | |")
    for name, results in runs.items():
        print(f"\nconsole of a {name} run up to its first step:")
        for line in results[0]["console"][:20]:
            print(f"  {line}")
        print(f"timeline of the fastest {name} run (wall s, CPU s, what was logged then):")
        fastest = min(results, key=lambda r: r["cpu"])
        for wall, cpu, text in fastest["timeline"] + [[round(fastest["wall"], 1), round(fastest["cpu"], 1),
                                                       "(first step done)"]]:
            print(f"  {wall:7.1f} {cpu:7.1f}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
