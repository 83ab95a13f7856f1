"""Speed and memory of TrainTrain against a diffusers + PEFT LoRA loop on the same job.

    python bench/bench_sd15.py                       # CPU: SD1.5 at 128 px, batch 1, 10 steps
    python bench/bench_sd15.py --device cuda --resolution 512 --batch 2 --steps 30
    python bench/bench_sd15.py --device cuda --family sdxl --resolution 1024
    python bench/bench_sd15.py --write-readme        # also put the table into README.md

Both trainers train the same full-size architecture (random weights, written once as a
single-file checkpoint under ``--cache-dir``) on the same images, resolution, rank, alpha,
batch, learning rate, AdamW, precision and number of steps. Each runs in its own process, one
after the other, so every peak belongs to one trainer. What the baseline is and how the module
sets are matched: see ``bench/runners.py`` and ``bench/README.md``.

Printed per trainer: time to the first finished step (model loading included), median seconds
per step after ``--warmup`` steps, peak resident memory of the whole process and while steps
ran, on CUDA ``torch.cuda.max_memory_allocated``, and the ratio ours / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from common import ROOT, BenchSpec, Measurement, limit_threads, write_checkpoint, write_images  # noqa: E402

FAMILIES = {"sd15": "sd1", "sdxl": "sdxl"}
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--threads", type=int, default=2, help="torch threads per trainer on CPU (0 = torch's default)")
    p.add_argument("--no-text-encoder", action="store_true",
                   help="train the U-Net only (the LoRA preset also trains the text encoder)")
    p.add_argument("--repeat", type=int, default=2,
                   help="alternate the trainers this many times (fastest run's times, largest peaks)")
    p.add_argument("--only", choices=("ours", "baseline"), help="run one trainer only (no ratios)")
    p.add_argument("--profiles", default="speed",
                   help="comma-separated memory_profile values to run ours with, each beside the baseline, "
                        "e.g. speed,balanced,low (default speed)")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "traintrain-bench"))
    p.add_argument("--write-readme", action="store_true", help="replace the results table in README.md")
    p.add_argument("--child", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot run, saying what to do instead."""
    on_gpu = args.device.startswith("cuda")
    if args.family == "sdxl" and not on_gpu:
        sys.exit("error: --family sdxl needs a GPU (--device cuda); the SDXL U-Net alone holds 2.6 billion "
                 "parameters, which a CPU cannot train in a benchmark's time")
    if on_gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"error: --device {args.device}: this torch install sees no CUDA GPU; use --device cpu")
    if args.resolution % 64 or args.resolution < 64:
        sys.exit(f"error: --resolution {args.resolution}: use a multiple of 64 (64, 128, 256, 512, 1024)")
    for name in ("steps", "batch", "rank", "images", "repeat"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be at least 1, not {getattr(args, name)}")
    from trainer.config.choices import MEMORY_PROFILES

    for name in args.profiles.split(","):
        if name not in MEMORY_PROFILES:
            sys.exit(f"error: --profiles {args.profiles}: {name!r} is not one of {', '.join(MEMORY_PROFILES)}")
    if args.steps <= args.warmup:
        sys.exit(f"error: --steps {args.steps} leaves no step after --warmup {args.warmup}")


def make_spec(args: argparse.Namespace) -> BenchSpec:
    family = FAMILIES[args.family]
    cache = Path(args.cache_dir)
    print(f"model file: writing or reusing a random-weight full-size {args.family} checkpoint in {cache} ...",
          flush=True)
    tic = time.perf_counter()
    checkpoint = write_checkpoint(family, cache)
    print(f"  {checkpoint.name}: {checkpoint.stat().st_size / 2**30:.2f} GiB ({time.perf_counter() - tic:.0f} s)")
    data = write_images(cache / f"images-{args.resolution}", args.images, args.resolution)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
    return BenchSpec(family=family, resolution=args.resolution, steps=args.steps, batch=args.batch, rank=args.rank,
                     alpha=args.alpha, device=args.device, threads=args.threads, images=args.images,
                     train_text_encoder=not args.no_text_encoder, warmup=args.warmup, checkpoint=str(checkpoint),
                     data_dir=str(data), work_dir=str(work))


def run_child(which: str, spec: BenchSpec) -> Measurement:
    """One trainer in a fresh interpreter; its measurement comes back as JSON."""
    work = Path(spec.work_dir)
    tag = which if which == "baseline" or spec.memory_profile == "speed" else f"{which}-{spec.memory_profile}"
    spec_file, out_file = work / f"spec-{tag}.json", work / f"{tag}.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if spec.threads > 0:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--spec", str(spec_file),
           "--out", str(out_file)]
    print(f"running {tag} ...", flush=True)
    tic = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        sys.exit(f"error: the {which} trainer failed (exit {done.returncode}); its output is above")
    m = Measurement.load(out_file)
    print(f"  {tag}: {time.perf_counter() - tic:.0f} s in all, loss at the end {m.loss:.4f}")
    return m


def child_main(args: argparse.Namespace) -> None:
    spec = BenchSpec(**json.loads(Path(args.spec).read_text()))
    limit_threads(spec.threads)
    # Heavy imports happen before the clock starts, the same for both trainers.
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from runners import run_baseline, run_ours

    m = run_ours(spec) if args.child == "ours" else run_baseline(spec)
    m.save(Path(args.out))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


@dataclass
class Summary:
    """One trainer's numbers over ``--repeat`` runs.

    Times: the fastest run's value (each run's own median per step), because other work on the
    machine can only slow a run down; memory: the largest peak of all runs.
    """

    trainer: str
    first_step_s: float
    step_s: float
    step_cpu_s: float
    peak_rss_mb: float
    train_rss_mb: float
    cuda_peak_mb: float | None
    cuda_train_peak_mb: float | None
    trainable_params: int
    modules: int
    runs: int

    @classmethod
    def of(cls, runs: list[Measurement], warmup: int) -> "Summary":
        def most(values):
            values = [v for v in values if v is not None]
            return max(values) if values else None
        return cls(runs[0].trainer, min(m.first_step_s for m in runs),
                   min(m.median_step(warmup) for m in runs), min(m.median_cpu(warmup) for m in runs),
                   max(m.peak_rss_mb for m in runs), max(m.train_rss_mb for m in runs),
                   most(m.cuda_peak_mb for m in runs), most(m.cuda_train_peak_mb for m in runs),
                   runs[0].trainable_params, runs[0].modules, len(runs))


COLUMNS = [  # (header, attribute, digits, GPU only)
    ("first step (s)", "first_step_s", 1, False), ("median s/step", "step_s", 3, False),
    ("median CPU s/step", "step_cpu_s", 3, False), ("peak RSS (MiB)", "peak_rss_mb", 0, False),
    ("RSS while training (MiB)", "train_rss_mb", 0, False),
    ("max_memory_allocated (MiB)", "cuda_peak_mb", 0, True), ("... while training (MiB)", "cuda_train_peak_mb", 0, True),
]


def table(spec: BenchSpec, results: list[Summary]) -> str:
    """A Markdown table of the summaries, with the ratio row when both trainers ran."""
    gpu = spec.device.startswith("cuda")
    cols = [c for c in COLUMNS if gpu or not c[3]]
    head = ["trainer"] + [c[0] for c in cols] + ["trained params", "modules"]
    rows = [[r.trainer] + [_fmt(getattr(r, c[1]), c[2]) for c in cols] + [f"{r.trainable_params:,}", str(r.modules)]
            for r in results]
    base = next((r for r in results if r.trainer == "diffusers+PEFT"), None)

    def ratio(a, b):
        return "n/a" if not a or not b or a != a or b != b else f"**{a / b:.2f}x**"
    for ours in results if base is not None else []:
        if ours is not base:
            name = "ours" if ours.trainer == "TrainTrain" else ours.trainer.replace("TrainTrain", "ours")
            rows.append([f"{name} / baseline"] + [ratio(getattr(ours, c[1]), getattr(base, c[1])) for c in cols]
                        + ["", ""])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def describe(spec: BenchSpec, repeat: int = 1) -> str:
    """Which machine and which settings, for the README."""
    import torch

    if spec.device.startswith("cuda"):
        machine = torch.cuda.get_device_name(torch.device(spec.device))
    else:
        machine = f"{_cpu_name()}, {os.cpu_count()} cores, " \
                  f"{spec.threads or torch.get_num_threads()} torch threads per trainer"
    fam = "SD1.5" if spec.family == "sd1" else "SDXL"
    te = "U-Net + text encoder" if spec.train_text_encoder else "U-Net only"
    prec = "fp16 weights, autocast, fp32 LoRA" if spec.half else "fp32"
    return (f"Machine: {machine}; torch {torch.__version__}. Job: full-size {fam} (random weights, "
            f"single-file checkpoint), {spec.images} images at {spec.resolution} px, batch {spec.batch}, "
            f"rank {spec.rank} / alpha {spec.alpha:g}, lierla Full ({te}), AdamW lr {spec.lr:g}, {prec}, "
            f"{spec.steps} steps (median over steps after the first {spec.warmup}; each trainer's fastest of "
            f"{repeat} alternating runs). Baseline: the loop of diffusers' LoRA example with PEFT adapters on "
            f"the same modules (bench/README.md). A row 'TrainTrain <profile>' is ours with that memory_profile "
            f"(trainer/training/memory/profiles.py); plain 'TrainTrain' is the default, speed.")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_readme(text: str, readme: Path = ROOT / "README.md", heading: str = "## Speed and memory") -> None:
    """Replace what lies between the bench markers (adding a section with them when absent)."""
    content = readme.read_text(encoding="utf-8")
    if START not in content or END not in content:
        content = content.rstrip("\n") + f"\n\n{heading}\n\n{START}\n{END}\n"
    before, rest = content.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{text}\n{END}{after}", encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    check_args(args)
    spec = make_spec(args)
    print(describe(spec, args.repeat), flush=True)
    from dataclasses import replace

    ours = [replace(spec, memory_profile=p) for p in args.profiles.split(",")]
    jobs = {f"ours-{s.memory_profile}": ("ours", s) for s in ours} if args.only != "baseline" else {}
    if args.only != "ours":
        jobs["baseline"] = ("baseline", spec)
    which = list(jobs)
    runs: dict[str, list[Measurement]] = {w: [] for w in which}
    try:
        for _ in range(args.repeat):
            for w in which:
                runs[w].append(run_child(*jobs[w]))
    finally:
        shutil.rmtree(spec.work_dir, ignore_errors=True)  # the trained files; model and images stay cached
    results = [Summary.of(runs[w], spec.warmup) for w in which]
    raw = Path(args.cache_dir) / "last-results.json"
    raw.write_text(json.dumps({"spec": asdict(spec), "runs": {w: [asdict(m) for m in runs[w]] for w in which}}, indent=1))
    print(f"raw measurements: {raw}")
    text = table(spec, results)
    print()
    print(text)
    notes = sorted({n for w in which for m in runs[w] for n in m.notes if n})
    for w in which:
        if w == "baseline" or not runs[w]:
            continue
        m = runs[w][0]
        measured = m.cuda_peak_mb if spec.device.startswith("cuda") else m.peak_rss_mb
        if m.estimate_mb and measured:
            notes.append(f"memory estimate (trainer/training/memory/estimate.py) for {m.trainer}: {m.estimate_mb:.0f} MiB ({m.estimate_phase}); "
                         f"measured peak {measured:.0f} MiB ({(m.estimate_mb - measured) / measured:+.0%})")
    for note in notes:
        print(f"note: {note}")
    if args.write_readme:
        command = "python bench/bench_sd15.py " + " ".join(a for a in (argv or sys.argv[1:]) if a != "--write-readme")
        block = f"{describe(spec, args.repeat)}\n\n{text}\n\nRegenerate with `{command.strip()} --write-readme`."
        write_readme(block)
        write_readme(block, ROOT / "README_ja.md", "## 速度とメモリ")  # the two READMEs stay in step
        print(f"README.md and README_ja.md updated between {START} and {END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
