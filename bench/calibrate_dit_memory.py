"""Measure, on a CPU, the working memory of one training step of one full-size transformer block of
Flux.1 (a double-stream and a single-stream block) and of Z-Image (a main layer): the data behind the
``BLOCK_STEP`` table of trainer/training/memory/estimate.py.

    python bench/calibrate_dit_memory.py                         # both families, bf16, checkpointing off/on
    python bench/calibrate_dit_memory.py --family flux --precision bf16,fp32 --tokens 256,512,1024
    python bench/calibrate_dit_memory.py --family zimage --storage fp8   # base weights stored in fp8 (upcast per layer)

Why one block: the whole models (12B / 6B parameters) do not fit beside anything else on a small
machine, and their working memory is the blocks' memory times the block count plus a little around
them. Each point runs in a fresh process: the transformer of the shipped config is built with its
full width but ONE block of each kind (Flux: ``num_layers=1, num_single_layers=1``; Z-Image:
``n_layers=1, n_refiner_layers=1``), filled with random weights, given the trainer's own lierla
network (rank 16, every block, ``trainer/network``) and, with ``--storage fp8``, the trainer's fp8
weight storage (``trainer/network/storage.py``). One forward under ``no_grad`` captures each block's
real inputs at the given sequence length; then each block alone runs forward + backward on them
(inputs as leaves that need gradients, as inside the model), plain or through
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` as diffusers' ``enable_gradient_checkpointing``
calls it.

What is measured (bytes of tensors created during the block's step, inputs and the incoming gradient
excluded), with a ``TorchDispatchMode`` that sees every aten op on this thread, forward and backward:

- ``kept``: alive after the forward (saved activations + the outputs): what each block of a model
  keeps until the backward reaches it;
- ``peak``: the most alive at once during forward + backward; ``peak - kept`` is the transient of the
  one block the backward is working on.

A model of N blocks then needs about ``sum(kept) + max(peak - kept)``; the estimate fits both as
``a + b x tokens`` over the measured points (attention runs through SDPA's flash kernel on the CPU as
on a GPU, so the memory is linear in the sequence length; the printed fit shows how linear it is).
The resident-memory peak (Linux ``VmHWM`` minus the resident memory before the step) is printed
beside it: it adds the allocator's slack and the kernels' scratch buffers (and, for bf16 without
``--exact-kernels``, the fp32 copies below), so it is a rough upper bound, not the figure used.

bf16 on a CPU without bf16 matrix units (AVX512-BF16/AMX) is slow: a bf16 matrix product runs ~7x
slower than fp32 and a whole point takes minutes. Unless ``--exact-kernels`` is given, the bf16
matrix products and the flash-attention kernels run in fp32 under the tracker and their results are
cast back (``fp32_kernels``): the tracker sees the same bf16 tensors (checked on 2026-12-02: a
Z-Image layer at 320 tokens gives the same kept and peak bytes, to the byte, both ways).

These are CPU measurements: a GPU run of the same ops allocates the same tensors, but its kernels'
workspaces and the CUDA caching allocator's rounding are not in them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_point, vm_kb  # noqa: E402

MiB = 2**20




def live_tracker():
    """A TorchDispatchMode counting the bytes of tensor storages created inside it that are alive."""
    import itertools
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.alive: dict[int, int] = {}
            self._ids = itertools.count(1)

        def _free(self, token: int) -> None:
            self.live -= self.alive.pop(token, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                      if isinstance(a, torch.Tensor) and a.device.type != "meta"}
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                    continue
                storage = t.untyped_storage()
                if storage.data_ptr() in inputs or getattr(storage, "_counted", None) or not storage.nbytes():
                    continue  # a view or an in-place result: no new memory
                token = next(self._ids)
                storage._counted = token
                self.alive[token] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, token)
            return out

    return Live()


def fp32_kernels():
    """A TorchDispatchMode that runs bf16/fp16 matrix products and attention through their fp32 kernels
    and casts the results back: the same output tensors (shape, dtype), minutes faster on a CPU without
    bf16 matrix units. Entered *under* the tracker, its fp32 temporaries are invisible to the count
    (a GPU has no such temporaries: it multiplies bf16 directly)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
    half = (torch.bfloat16, torch.float16)

    class Fp32Kernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in half]
            if func not in ops or not dtypes:
                return func(*args, **kwargs)

            def up(a):
                return a.float() if isinstance(a, torch.Tensor) and a.dtype in half else a
            out = func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
            cast = (lambda t: t.to(dtypes[0]) if isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and t.dim() > 1 and not _is_logsumexp(func, t) else t)
            return tuple(cast(t) for t in out) if isinstance(out, tuple) else cast(out)

    def _is_logsumexp(func, t) -> bool:
        # flash attention's second output (logsumexp) is fp32 whatever the inputs
        return func is aten._scaled_dot_product_flash_attention_for_cpu.default and t.dim() == 3

    return Fp32Kernels()


def _model(family: str, dtype, storage: str):
    """The full-width transformer with one block of each kind, random weights, the trainer's network."""
    import torch

    from trainer.bundle import ModelBundle
    from trainer.families import get_family
    from trainer.hosts.components import read_json, shipped_config_dir
    from trainer.hosts.dit_parts import transformer_class
    from trainer.network.network import NetworkSpec, create_network

    config = read_json(shipped_config_dir(family) / "transformer" / "config.json")
    config.update({"num_layers": 1, "num_single_layers": 1} if family == "flux" else
                  {"n_layers": 1, "n_refiner_layers": 1})
    with torch.device("meta"):
        model = transformer_class(config).from_config(config)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
    model.requires_grad_(False)
    if storage == "fp8":
        from trainer.network.storage import store_weights

        store_weights(model, torch.float8_e4m3fn, dtype)
    fam = get_family(family)
    bundle = ModelBundle(family=fam, unet=model, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None)
    net = create_network(bundle, NetworkSpec(rank=16, alpha=8.0, blocks=fam.block_ids))
    net.apply_to()
    return model, net


class _Captured(Exception):
    pass


def _block_inputs(family: str, model, tokens: int, text: int, dtype) -> dict:
    """Each measured block's (args, kwargs) at ``tokens`` image tokens + ``text`` text tokens (batch 1)."""
    import torch

    blocks = ({"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
              if family == "flux" else {"layer": model.layers[0]})
    captured: dict = {}
    handles = []
    for name, block in blocks.items():
        def hook(mod, args, kwargs, name=name):
            captured[name] = (args, kwargs)
            if len(captured) == len(blocks):
                raise _Captured
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    side = int(tokens ** 0.5)
    h, w = side, tokens // side  # patch grid
    try:
        with torch.no_grad():
            if family == "flux":
                img_ids = torch.zeros(h * w, 3)
                model(hidden_states=torch.randn(1, h * w, 64, dtype=dtype), timestep=torch.tensor([0.5], dtype=dtype),
                      guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 768, dtype=dtype),
                      encoder_hidden_states=torch.randn(1, text, 4096, dtype=dtype), txt_ids=torch.zeros(text, 3),
                      img_ids=img_ids, return_dict=False)
            else:
                model([torch.randn(16, 1, 2 * h, 2 * w, dtype=dtype)], torch.tensor([0.5], dtype=dtype),
                      [torch.randn(text, 2560, dtype=dtype)], return_dict=False)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: (blocks[name], *captured[name]) for name in blocks}


def _positional(family: str, kind: str, args, kwargs) -> tuple:
    """The block's inputs in the positional order diffusers' checkpointing call uses."""
    if family == "flux":
        names = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
        merged = dict(zip(names, args), **kwargs)
        return tuple(merged.get(n) for n in names)
    return tuple(args)


def measure_block(block, args: tuple, grad_idx: tuple, checkpointing: bool, kernels) -> dict:
    import gc

    import torch
    from torch.utils._python_dispatch import _disable_current_modes
    from torch.utils.checkpoint import checkpoint

    args = list(args)
    for i in grad_idx:
        args[i] = args[i].detach().clone().requires_grad_(True)
    gc.collect()
    tracker = live_tracker()
    before = vm_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    with kernels, tracker:
        if checkpointing:
            out = checkpoint(block.__call__, *args, use_reentrant=False)
        else:
            out = block(*args)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
        kept = tracker.live
        with _disable_current_modes(), torch.no_grad():  # the incoming gradients are not the block's
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
    hwm = vm_kb("VmHWM")
    return {"kept": kept, "peak": tracker.peak, "rss_step": (hwm - before) * 1024,
            "out_bytes": sum(o.untyped_storage().nbytes() for o in outs)}


def _t5(dtype, storage: str, layers: int = 1):
    """Flux's T5-XXL encoder with ``layers`` layers (full width), random weights, the trainer's network on it (T5)."""
    import torch

    from trainer.bundle import ModelBundle
    from trainer.families import get_family
    from trainer.hosts.components import read_json, shipped_config_dir
    from trainer.hosts.dit_parts import library_class, transformer_class
    from trainer.network.network import NetworkSpec, create_network

    folder = shipped_config_dir("flux")
    config = library_class("transformers", "AutoConfig").from_pretrained(str(folder / "text_encoder_2"))
    config.num_layers = layers
    with torch.device("meta"):
        t5 = library_class("transformers", "T5EncoderModel")(config)
        settings = read_json(folder / "transformer" / "config.json")
        transformer = transformer_class(settings).from_config(settings)  # names only: stays on meta
    t5 = t5.to(dtype=dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in t5.parameters():
            p.normal_(0, 0.02)
    t5.requires_grad_(False).eval()  # as the trainer holds it (ModelBundle.freeze): no dropout
    if storage == "fp8":
        from trainer.network.storage import store_weights

        store_weights(t5, torch.float8_e4m3fn, dtype)
    bundle = ModelBundle(family=get_family("flux"), unet=transformer, vae=None, text_encoders=[None, t5],
                         tokenizers=[], noise_scheduler=None)
    net = create_network(bundle, NetworkSpec(rank=16, alpha=8.0, blocks=("T5",), train_text_encoder=True))
    net.apply_to()
    return t5, net


def measure_t5(precision: str, tokens: int, storage: str, exact_kernels: bool, layers: int = 1) -> dict:
    """The step of the T5 encoder cut to ``layers`` layers (embedding, the layers, final norm) at ``tokens``;
    the difference between 2 layers and 1 is one layer's kept memory (the relative position bias and the
    embedding exist once)."""
    import contextlib
    import gc

    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    t5, net = _t5(dtype, storage, layers)
    kernels = (contextlib.nullcontext() if exact_kernels or dtype == torch.float32 else fp32_kernels())
    ids = torch.randint(0, 32000, (1, tokens))
    gc.collect()
    tracker = live_tracker()
    with kernels, tracker:
        out = t5(ids).last_hidden_state
        kept = tracker.live
        with _disable_current_modes(), torch.no_grad():
            grad = torch.randn_like(out)
        out.backward(grad)
    return {"family": "t5", "precision": precision, "tokens": tokens, "storage": storage,
            "blocks": {f"t5 encoder of {layers} layer(s)": {"kept": kept, "peak": tracker.peak, "rss_step": 0,
                                    "out_bytes": out.untyped_storage().nbytes()}}}


def measure_point(family: str, precision: str, tokens: int, text: int, checkpointing: bool, storage: str,
                  exact_kernels: bool = False, t5_layers: int = 1) -> dict:
    import contextlib
    import time

    import torch

    if family == "t5":
        return measure_t5(precision, tokens, storage, exact_kernels, t5_layers)

    started = time.process_time()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, net = _model(family, dtype, storage)
    sys.stderr.write(f"built in {time.process_time() - started:.0f} s CPU\n")
    kernels = (contextlib.nullcontext() if exact_kernels or dtype == torch.float32 else fp32_kernels())
    out = {}
    with kernels:
        inputs = _block_inputs(family, model, tokens, text, dtype)
    for kind, (block, args, kwargs) in inputs.items():
        sys.stderr.write(f"inputs at {time.process_time() - started:.0f} s CPU\n")
        pos = _positional(family, kind, args, kwargs)
        grad_idx = (0, 1) if family == "flux" else (0,)
        out[kind] = measure_block(block, pos, grad_idx, checkpointing, kernels)
        sys.stderr.write(f"{kind} measured at {time.process_time() - started:.0f} s CPU\n")
    return {"family": family, "precision": precision, "tokens": tokens, "text": text,
            "checkpointing": checkpointing, "storage": storage, "exact_kernels": exact_kernels, "blocks": out}


def print_table(resolutions=(512, 768, 1024), families=("flux", "zimage")) -> None:
    """The estimate (trainer/training/memory/estimate.py) of a LoRA run per family, profile and size:
    rank 16, batch 1, bf16 weights, AdamW, on a CUDA device with bf16 and bitsandbytes (as a table)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import quick_config
    from trainer.config.choices import BLOCKID26
    from trainer.training.memory import profiles
    from trainer.training.memory.estimate import GiB, estimate_peak

    every_block = [b for b in BLOCKID26 if b != "BASE"]  # names no transformer block: all of them train
    print("| family | size | profile | peak (GiB) | phase | training | caching latents |")
    print("|---|---|---|---|---|---|---|")
    for family in families:
        for size in resolutions:
            cfg = quick_config(**{"image_size(height, width)": str(size), "train_batch_size": "1",
                                  "network_rank": "16", "network_alpha": "8", "train_model_precision": "bf16",
                                  "network_blocks(BASE = TextEncoder)": every_block})
            est = estimate_peak(cfg, family, "cuda")
            for name, opt in profiles.options(cfg, "cuda", bf16=True, bnb=True).items():
                e = est.with_facts(**opt.facts) if opt.facts else est
                print(f"| {family} | {size} | {name} | {e.total / GiB:.1f} | {e.phase} | "
                      f"{e.phases['training'] / GiB:.1f} | {e.phases['caching latents'] / GiB:.1f} |")


def _fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="flux,zimage")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--tokens", default="256,576,1024", help="image tokens per point (total = these + --text)")
    p.add_argument("--text", type=int, default=64, help="text tokens (a multiple of 32 for Z-Image)")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--storage", default="none", help="none | fp8 (base weights stored in fp8, upcast per layer)")
    p.add_argument("--t5-layers", default="1,2", help="--family t5: encoder depths to measure (per layer = the difference)")
    p.add_argument("--exact-kernels", action="store_true",
                   help="bf16 matrix products with the bf16 kernels (slow on CPUs without bf16 units; same counts)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", action="store_true", help="print the estimate per family, size and profile, and stop")
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print_table()
        return 0
    if args.point:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure_point(**json.loads(args.point))))
        return 0
    for family in args.family.split(","):
        for precision in args.precision.split(","):
            for storage in args.storage.split(","):
                for ckpt in args.checkpointing.split(","):
                    rows: dict[str, list] = {}
                    depths = [int(d) for d in args.t5_layers.split(",")] if family == "t5" else [1]
                    for tokens, depth in ((int(t), d) for t in args.tokens.split(",") for d in depths):
                        point = dict(family=family, precision=precision, tokens=tokens, text=args.text,
                                     checkpointing=ckpt == "on", storage=storage, exact_kernels=args.exact_kernels,
                                     t5_layers=depth)
                        r = run_point(__file__, point, args.threads)
                        if r is None:
                            return 1
                        total = tokens + (0 if family == "t5" else args.text)
                        for kind, m in r["blocks"].items():
                            rows.setdefault(kind, []).append((total, m))
                            print(f"{family} {kind} {precision} storage {storage} checkpointing {ckpt} "
                                  f"tokens {total}: kept {m['kept'] / MiB:.1f} MiB, peak {m['peak'] / MiB:.1f} MiB, "
                                  f"transient {(m['peak'] - m['kept']) / MiB:.1f} MiB, resident peak "
                                  f"{m['rss_step'] / MiB:.1f} MiB", flush=True)
                    for kind, points in rows.items():
                        xs = [t for t, _ in points]
                        for what in ("kept", "transient"):
                            ys = [m["kept"] if what == "kept" else m["peak"] - m["kept"] for _, m in points]
                            a, b = _fit(xs, ys)
                            worst = max(abs(a + b * x - y) for x, y in zip(xs, ys))
                            print(f"  fit {family} {kind} {precision} storage {storage} checkpointing {ckpt} "
                                  f"{what}: {a / MiB:.1f} MiB + {b / 1024:.2f} KiB per token "
                                  f"(largest misfit {worst / MiB:.1f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
