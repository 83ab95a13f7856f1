"""What both benchmark trainers share: the model file, the images, the settings and the meters.

``write_checkpoint`` writes a full-size SD1.5 (or SDXL) single-file checkpoint with random fp16
weights in the LDM key layout that downloaded files use. The key names come from the test
helper ``tests/ldm.py`` (diffusers names -> LDM names); the weights are cut from one shared
random pool, scaled by 1/sqrt(fan-in) so activations keep a realistic size, with norm weights 1
and biases 0. The file is cached: a rerun with the same family reuses it.

``Meter`` measures one trainer inside its own process: time to the first finished step, the
time of every step, peak resident memory (whole process, from ``getrusage``) and the peak while
steps run (Linux ``VmHWM``, reset after the first step), and on CUDA the allocator's peaks.
"""

from __future__ import annotations

import json
import math
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
CAPTIONS = ("a red and blue pattern, colourful", "waves of green light", "a striped texture",
            "soft orange gradient", "a swirl of purple and yellow", "checkered colours")


@dataclass
class BenchSpec:
    """One benchmark job: both trainers get exactly these values."""

    family: str = "sd1"
    resolution: int = 128
    steps: int = 10
    batch: int = 1
    rank: int = 16
    alpha: float = 8.0
    lr: float = 1e-4
    seed: int = 1
    device: str = "cpu"
    threads: int = 2
    images: int = 4
    train_text_encoder: bool = True   # the LoRA preset selects BASE, which trains the text encoder
    warmup: int = 2
    checkpoint: str = ""
    config_dir: str = ""              # diffusers-format config folder; "" = the shipped one of the family
    data_dir: str = ""
    work_dir: str = ""
    memory_profile: str = "speed"     # ours only: the memory_profile setting

    @property
    def half(self) -> bool:
        """GPU runs use the preset's fp16 model precision; CPU runs fp32 (what CPU users run)."""
        return self.device.startswith("cuda")


@dataclass
class Measurement:
    """What one trainer's process reports back."""

    trainer: str
    first_step_s: float = float("nan")
    step_times: list = field(default_factory=list)
    step_cpu: list = field(default_factory=list)     # process CPU seconds per step (all threads)
    peak_rss_mb: float = float("nan")
    train_rss_mb: float = float("nan")
    import_rss_mb: float = float("nan")
    cuda_peak_mb: float | None = None
    cuda_train_peak_mb: float | None = None
    trainable_params: int = 0
    modules: int = 0
    loss: float = float("nan")
    estimate_mb: float | None = None   # trainer/training/memory/estimate.py's estimate for this run (ours only)
    estimate_phase: str = ""
    notes: list = field(default_factory=list)

    def median_step(self, warmup: int) -> float:
        """Median seconds per step, leaving out the first ``warmup`` steps."""
        times = self.step_times[warmup:] or self.step_times
        return statistics.median(times) if times else float("nan")

    def median_cpu(self, warmup: int) -> float:
        """Median process CPU seconds per step after ``warmup``: steadier than wall time on a busy machine."""
        times = self.step_cpu[warmup:] or self.step_cpu
        return statistics.median(times) if times else float("nan")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Measurement":
        return cls(**json.loads(Path(path).read_text()))


def vm_kb(field_name: str) -> int:
    """A ``/proc/self/status`` memory field of this process (VmRSS, VmHWM, ...) in KiB; 0 if absent."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{field_name}:\s+(\d+)", text)
    return int(match[1]) if match else 0


def run_point(script: str, point: dict, threads: int) -> dict | None:
    """Run ``script --point <json> --threads N`` in a fresh process (each measuring script measures
    one point so) and return the JSON object its last output line holds; None, with its stderr
    tail written out, when it fails."""
    import subprocess

    run = subprocess.run([sys.executable, script, "--point", json.dumps(point), "--threads", str(threads)],
                         capture_output=True, text=True)
    if run.returncode:
        sys.stderr.write(run.stderr[-3000:])
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def rss_mb() -> float:
    """Current resident memory of this process (MiB)."""
    return vm_kb("VmRSS") / 1024


class Meter:
    """Clocks and memory peaks of the training call in this process (see the module docstring)."""

    def __init__(self, trainer: str, device: str):
        import torch

        self.m = Measurement(trainer)
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.m.import_rss_mb = rss_mb()
        self.t0 = self.last = self.cpu_last = 0.0
        self.before_reset_mb = 0.0

    def start(self) -> None:
        """Call right before the training call (model loading included)."""
        self.t0 = self.last = time.perf_counter()
        self.cpu_last = time.process_time()

    def step_done(self, loss: float = float("nan")) -> None:
        """Call when an optimizer step has finished."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if not self.m.step_times and math.isnan(self.m.first_step_s):
            self.m.first_step_s = now - self.t0
            self._reset_train_peaks()
        cpu = time.process_time()
        self.m.step_times.append(now - self.last)
        self.m.step_cpu.append(cpu - self.cpu_last)
        self.last, self.cpu_last = now, cpu
        self.m.loss = float(loss)

    def _reset_train_peaks(self) -> None:
        import torch

        # The reset below also resets getrusage's ru_maxrss (both read the kernel's hiwater mark),
        # so the peak so far (model loading, caching, first step) is kept here first.
        self.before_reset_mb = max(vm_kb("VmHWM") / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        try:  # Linux: writing 5 resets VmHWM, so later readings cover the training steps only
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.m.notes.append("VmHWM could not be reset; train peak = whole-process peak")
        if self.cuda:
            self.m.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()

    def finish(self) -> Measurement:
        """Collect the peaks once training is over."""
        import torch

        self.m.train_rss_mb = vm_kb("VmHWM") / 1024
        self.m.peak_rss_mb = max(self.before_reset_mb, self.m.train_rss_mb,
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if self.cuda:
            train = torch.cuda.max_memory_allocated() / 2**20
            self.m.cuda_train_peak_mb = train
            self.m.cuda_peak_mb = max(self.m.cuda_peak_mb or 0.0, train)
        return self.m


def limit_threads(threads: int) -> None:
    """Torch intra-op threads of a child (2 on this 2-core machine, all cores elsewhere)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- model file
def _random_like(key: str, like, pool, offset: int):
    """A tensor shaped like ``like``: weights ~ N(0, 1/fan_in), norm weights 1, biases 0."""
    import torch

    if not like.dtype.is_floating_point:
        return torch.arange(like.shape[-1])[None].to(torch.int64)
    if like.ndim <= 1:
        leaf = key.rsplit(".", 1)[-1]
        is_norm = any(t in key for t in ("norm", "ln_", "layer_norm", ".gn.")) and leaf == "weight"
        return (torch.ones if is_norm else torch.zeros)(like.shape, dtype=torch.float16)
    fan_in = max(1, like[0].numel())
    start = offset % (pool.numel() - like.numel())
    return (pool[start:start + like.numel()].view(like.shape) * (1.0 / math.sqrt(fan_in))).half()


def write_checkpoint(family: str, folder: Path) -> Path:
    """A cached full-size random-weight LDM single file for ``family`` ("sd1" or "sdxl")."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{family}-random-full.safetensors"
    if path.is_file() and path.stat().st_size > 1_000_000_000:
        return path
    sys.path.insert(0, str(TESTS))
    import ldm  # the LDM key layout (test helper)

    from trainer.hosts.meta import meta_parts

    names = ldm.ldm_state_dict(family, meta_parts(family))
    # one shared random pool, sliced per tensor; it must hold the largest tensor (SDXL's CLIP-G
    # token embedding, 49408 x 1280 = 63.2M values)
    largest = max(like.numel() for like in names.values())
    pool = torch.randn(max(60_000_000, largest + 1_000_000), generator=torch.Generator().manual_seed(0))
    state = {k: _random_like(k, like, pool, i * 7_919_999) for i, (k, like) in enumerate(names.items())}
    del pool
    tmp = path.with_suffix(".partial")
    save_file(state, str(tmp))
    tmp.replace(path)  # a crash mid-write never leaves a file that looks complete
    return path


def write_images(folder: Path, count: int, size: int) -> Path:
    """``count`` square pattern images of ``size`` px, each with a caption file."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:size, 0:size] / size
        chans = [0.5 + 0.5 * np.sin(a * xx * 6 + b * yy * 6 + c) for a, b, c in rng.uniform(-3, 3, (3, 3))]
        Image.fromarray((np.stack(chans, -1) * 255).astype(np.uint8), "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)], encoding="utf-8")
    return folder


def read_images(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of ``folder`` in name order."""
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in sorted(folder.glob("*.png"))]
