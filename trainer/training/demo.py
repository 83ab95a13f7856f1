"""A first run without a model: a tiny model, a few drawn images, a short LoRA run, the results.

``run_demo`` writes into one folder (a new temporary one unless given): ``images/`` (six captioned
pictures of a red circle on grey, made here), ``output/demo.safetensors`` (the trained LoRA),
``logs/`` (the CSV loss log, the previews under ``<date>/demo/previews/``, ``loss.png``). The model
is :func:`trainer.hosts.tiny.tiny_model`, built in memory; the run goes through ``run_job`` like
any other, so progress, previews, the save and the load check are the real ones. About a minute
on two CPU cores.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TRIGGER = "ttdemo"
NAME = "demo"
STEPS = 200
SIZE = 64
PROMPTS = (f"{TRIGGER}, a red circle", "a red circle")


@dataclass
class DemoResult:
    folder: Path
    images: Path
    message: str = ""
    file: Path | None = None
    csv: Path | None = None
    plot: Path | None = None
    previews: list = field(default_factory=list)
    load_check: object = None
    stopped: bool = False

    def lines(self) -> list[str]:
        """Where everything is, one line each."""
        out = [f"demo folder:   {self.folder}", f"images:        {self.images}"]
        if self.file:
            out.append(f"trained LoRA:  {self.file}")
        if self.load_check is not None:
            out.append(f"load check:    {self.load_check.summary()}")
        if self.csv:
            out.append(f"loss log:      {self.csv}")
        if self.plot:
            out.append(f"loss plot:     {self.plot}")
        if self.previews:
            out.append(f"previews:      {len(self.previews)} in {self.previews[-1].parent} "
                       "(each row a prompt; network on left, off right)")
        return out


def make_images(folder: Path, count: int = 6, size: int = SIZE) -> Path:
    """``count`` pictures of a red circle (varied size and place) on grey, each with a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        radius = rng.uniform(0.18, 0.32) * size
        cy, cx = rng.uniform(radius, size - radius, 2)
        img = np.full((size, size, 3), 128, np.uint8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = (220, 30, 30)
        Image.fromarray(img, "RGB").save(folder / f"circle{i}.png")
        (folder / f"circle{i}.txt").write_text("a red circle", encoding="utf-8")
    return folder


def demo_config(images: Path, steps: int = STEPS):
    from trainer.config import TrainConfig

    return TrainConfig.from_dict({
        "mode": "LoRA", "model": "", "lora_data_directory": str(images), "lora_trigger_word": TRIGGER,
        "image_size(height, width)": str(SIZE), "image_min_length": str(SIZE), "image_buckets_step": str(SIZE),
        "train_iterations": str(steps), "train_batch_size": "2", "train_learning_rate": "2e-3",
        "train_optimizer": "AdamW", "train_lr_scheduler": "constant", "network_rank": "8", "network_alpha": "8",
        "train_model_precision": "fp32", "train_lora_precision": "fp32", "save_precision": "fp32",
        "train_VAE_precision": "fp32", "train_seed": "1", "save_lora_name": NAME, "save_as_json": False,
        "logging_save_csv": True,
        "preview_prompts": "\n".join(PROMPTS), "preview_every_steps": str(max(1, steps // 4)),
        "preview_size": str(SIZE), "preview_steps": "12", "preview_seed": "3",
    })


def new_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="traintrain-demo-"))


def run_demo(folder: Path | None = None, *, steps: int = STEPS, control=None, device=None) -> DemoResult:
    """Make the images, train, save, check, plot; see the module docstring. ``control`` (a
    ``TrainControl``) carries stop requests in and progress, messages and previews out."""
    from trainer.hosts.tiny import TinyModelHost
    from trainer.training.control import TrainControl
    from trainer.training.job import run_job

    control = control or TrainControl()
    log = control.log

    folder = Path(folder) if folder else new_folder()
    images = make_images(folder / "images")
    result = DemoResult(folder=folder, images=images)
    log(f"Demo: a tiny random model (built in memory) learns '{TRIGGER}' from {len(list(images.glob('*.png')))} "
        f"pictures of a red circle, {steps} steps.")
    config = demo_config(images, steps)
    host = TinyModelHost(folder / "output")
    threads = torch.get_num_threads()
    # The tiny model gains little from a second thread, and two threads beside other work on a
    # two-core machine run ten times slower; one thread keeps the demo near a minute everywhere.
    torch.set_num_threads(1)
    try:
        job = run_job(config, host=host, control=control, output_dir=folder / "output", logs_dir=folder / "logs",
                      device=device)
    finally:
        torch.set_num_threads(threads)
    result.message, result.stopped = job.message, job.stopped
    result.file = job.saved[-1] if job.saved else None
    result.load_check = job.load_checks[-1] if job.load_checks else None
    result.previews = list(job.previews)
    result.csv = job.csv_paths[-1] if job.csv_paths else None
    if result.csv is not None:
        try:
            from trainer.plot import plot_log

            result.plot = result.csv.with_suffix(".png")
            plot_log(result.csv, 0.6).savefig(result.plot)
        except Exception as error:  # no matplotlib/pandas: the rest of the demo stands
            log(f"note: no loss plot ({type(error).__name__}: {error})")
            result.plot = None
    return result
