"""A tiny world for effect tests: a small text-to-image model that draws coloured shapes.

The model is trained once (about 150 CPU-seconds: 450 steps of 64 images; two torch threads
where two cores are free) on synthetic 64-pixel images of a circle or a square, small or
large, in one of four colours, captioned "a small red circle", "a blue square" (size left out
of some captions), or "" (so unguided sampling and classifier-free guidance work). Pieces:

- ``PoolVAE``: the demo's identity-like autoencoder (``trainer.hosts.tiny.PoolAutoencoder``). It
  averages 8x8 pixel cells and mixes RGB into four latent channels with a fixed matrix; decoding
  inverts the mix and repeats each cell. Flat coloured shapes survive it, and nothing has to be
  trained for it.
- An SD1-layout ``UNet2DConditionModel`` (the shape of tests/tiny.py) trained from scratch, and a
  random frozen CLIP text encoder (the shipped CLIP tokenizer; hidden size 32), whose distinct
  outputs for distinct words are all the U-Net needs.
- ``sample``: a short deterministic DDIM sampler with classifier-free guidance and fixed seeds.
- ``classify``: plain pixel rules that name the colour, size and shape of the drawn object.
- ``WorldHost``: a host double for ``trainer.training.job.run_job`` that hands over a fresh copy of the
  world's bundle, so runs go through the trainer's real code path.

The trained weights are cached in a folder keyed on a hash of this file, so a changed world is
retrained and an unchanged one loads in a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from trainer.hosts import tiny as tiny_host
from trainer.hosts.tiny import PoolAutoencoder

SIZE = 64            # pixels
FACTOR = tiny_host.FACTOR   # pixels per latent cell (the autoencoder's, as in every SD family)
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "yellow": (1.0, 1.0, -1.0)}
UNSEEN = {"purple": (1.0, -1.0, 1.0)}          # never drawn in the base world's training data
PALETTE = {**COLOURS, **UNSEEN}
BACKGROUND = (0.0, 0.0, 0.0)                   # mid grey
RADII = {"small": 7, "large": 15}              # half-widths in pixels
SHAPES = ("circle", "square")
TRAIN = dict(steps=450, batch=64, lr=4e-3, seed=0, p_no_size=0.4, p_empty=0.1, n_images=3000)
# attention_head_dim is diffusers' name for the number of heads: two heads of 8 and 16 channels
# cost half the time of eight narrow ones in CPU attention, for the same colour accuracy.
UNET = dict(layers_per_block=2, block_out_channels=(16, 32), attention_head_dim=2)



def world_key() -> str:
    """Hash of everything the trained weights depend on (settings, drawing, autoencoder, model
    and training code): the cache folder's name changes whenever the world does, and not when
    only the classifier or the sampler does."""
    import inspect

    parts = [repr((SIZE, FACTOR, COLOURS, BACKGROUND, RADII, SHAPES, TRAIN, UNET, tiny_host._MIX))]
    parts += [inspect.getsource(f) for f in (draw, caption, _dataset, PoolVAE, _components, _train)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- drawing and classifying ------------------------------------------------------------------

def draw(colour: str, size: str, shape: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """An RGB image (H, W, 3) in [-1, 1]: one shape on a grey background."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUND
    r = RADII[size]
    cy = cx = SIZE / 2 - 0.5
    if rng is not None:
        cy += rng.integers(-3, 4)
        cx += rng.integers(-3, 4)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 0.5) ** 2
    else:
        inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    img[inside] = PALETTE[colour]
    return img


def save_png(img: np.ndarray, path: Path) -> Path:
    from PIL import Image

    arr = np.clip((img + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return Path(path)


def classify(img: np.ndarray) -> dict:
    """Colour, size and shape of the drawn object, by pixel rules.

    Object pixels are those far from the background grey; their mean gives the colour (the
    nearest palette entry; "none" when there are too few). Size comes from the object's *soft
    area*: every pixel counts by how far it is from the background toward the object's colour
    (0 to 1), which averaging over the autoencoder's 8-pixel cells leaves unchanged, so a
    blurred small shape is still small. "large" when it is above the geometric mean of a small
    circle's and a large square's area. Shape: how much of the bounding box of the object's
    far pixels its soft area fills (pi/4 for a circle, 1 for a square); coarse, since a small
    shape spans only two or three cells.
    """
    img = np.asarray(img, np.float32)
    bg = np.asarray(BACKGROUND, np.float32)
    far = np.abs(img - bg).max(-1) > 0.5
    if int(far.sum()) < 12:
        return {"colour": "none", "size": "none", "shape": "none", "area": 0.0}
    mean = img[far].mean(0)
    colour = min(PALETTE, key=lambda c: float(((mean - np.asarray(PALETTE[c])) ** 2).sum()))
    direction = np.asarray(PALETTE[colour], np.float32) - bg
    soft = np.clip((img - bg) @ direction / float(direction @ direction), 0.0, 1.0)
    area = float(soft.sum())
    small = np.pi * (RADII["small"] + 0.5) ** 2
    large = (2 * RADII["large"] + 1) ** 2
    size = "large" if area > np.sqrt(small * large) else "small"
    ys, xs = np.nonzero(far)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    shape = "square" if area / box > 0.89 else "circle"
    return {"colour": colour, "size": size, "shape": shape, "area": area}


def fraction(images, key: str, value: str) -> float:
    """Share of ``images`` whose ``key`` ("colour", "size", "shape") is ``value``."""
    labels = [classify(img)[key] for img in images]
    return sum(v == value for v in labels) / max(1, len(labels))


# --- the identity-like autoencoder: the demo's weightless one (trainer/hosts/tiny.py) ---------

PoolVAE = PoolAutoencoder

# --- the model ----------------------------------------------------------------------------------

def _components(seed: int):
    """Untrained unet, the frozen random text encoder, tokenizer, scheduler, autoencoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from tiny import HIDDEN, _text_config, tiny_scheduler, tiny_tokenizer

    torch.manual_seed(seed)
    te = CLIPTextModel(_text_config(hidden_act="quick_gelu"))
    unet = UNet2DConditionModel(
        sample_size=SIZE // FACTOR, in_channels=4, out_channels=4, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, **UNET,
    )
    return unet, te, tiny_tokenizer(), tiny_scheduler(), PoolVAE()


def caption(colour: str, size: str | None, shape: str) -> str:
    return " ".join(["a", *([size] if size else []), colour, shape])


def _dataset(cfg: dict):
    rng = np.random.default_rng(cfg["seed"])
    images, captions = [], []
    for _ in range(cfg["n_images"]):
        colour = rng.choice(list(COLOURS))
        size = rng.choice(list(RADII))
        shape = rng.choice(SHAPES)
        images.append(draw(colour, size, shape, rng))
        u = rng.random()
        captions.append("" if u < cfg["p_empty"] else
                        caption(colour, None if u < cfg["p_empty"] + cfg["p_no_size"] else size, shape))
    return np.stack(images), captions


class World:
    """The trained tiny world: ``bundle()`` gives a fresh ModelBundle of it."""

    def __init__(self, unet_state: dict, te_state: dict, build_s: float, cached: bool):
        self.unet_state, self.te_state = unet_state, te_state
        self.build_s, self.cached = build_s, cached
        self._base = None
        self._images = {}

    def bundle(self):
        """A fresh, frozen ModelBundle (own module copies: a run may free or move them)."""
        from trainer.bundle import ModelBundle
        from trainer.families import get_family

        unet, te, tok, sched, vae = _components(0)
        unet.load_state_dict(self.unet_state)
        te.load_state_dict(self.te_state)
        family = dataclasses.replace(get_family("sd1"), latent_scale=1.0)
        return ModelBundle(family=family, unet=unet, vae=vae, text_encoders=[te], tokenizers=[tok],
                           noise_scheduler=sched, prediction_type="epsilon",
                           source="tinyworld").freeze()

    @property
    def base(self):
        """One shared bundle for generating (never handed to a run)."""
        if self._base is None:
            self._base = self.bundle()
        return self._base

    def images(self, prompt: str, *, n: int, seed: int = 0) -> np.ndarray:
        """The base model's images for ``prompt`` (``sample``'s defaults), generated once per
        session and shared by every test that asks for the same ones."""
        key = (prompt, n, seed)
        if key not in self._images:
            self._images[key] = sample(self.base, prompt, n=n, seed=seed)
            self._images[key].setflags(write=False)
        return self._images[key]


def train_world(cfg: dict | None = None, log=print) -> tuple[dict, dict]:
    """Train the world's U-Net from scratch; returns (unet state, text-encoder state)."""
    cfg = {**TRAIN, **(cfg or {})}
    threads = torch.get_num_threads()
    torch.set_num_threads(build_threads())
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)


def build_threads() -> int:
    """Torch threads for the build: two where two cores are free, else one (on a machine that
    is busy with other work, a second thread mostly waits for a core and makes the build slower)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return 2 if cores >= 2 and busy <= cores - 1.5 else 1


def _train(cfg: dict, log) -> tuple[dict, dict]:
    from trainer.bundle import ModelBundle
    from trainer.conditioning import PromptEncoder
    from trainer.families import get_family

    unet, te, tok, sched, vae = _components(cfg["seed"])
    te.requires_grad_(False).eval()
    images, captions = _dataset(cfg)
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
        bundle = ModelBundle(family=get_family("sd1"), unet=unet, vae=vae, text_encoders=[te],
                             tokenizers=[tok], noise_scheduler=sched)
        enc = PromptEncoder(bundle)
        distinct = sorted(set(captions))
        table = enc.encode(distinct).hidden
        index = torch.tensor([distinct.index(c) for c in captions])
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
    lr_at = lambda s: cfg["lr"] * min(1.0, (s + 1) / 100) * (0.1 + 0.9 * (1 - s / cfg["steps"]))  # noqa: E731
    gen = torch.Generator().manual_seed(cfg["seed"])
    unet.train()
    ema, t0 = None, time.perf_counter()
    for step in range(cfg["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, len(latents), (cfg["batch"],), generator=gen)
        z = latents[idx]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (cfg["batch"],), generator=gen)
        pred = unet(sched.add_noise(z, noise, t), t, table[index[idx]]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 250 == 0:
            log(f"tiny world: step {step + 1}/{cfg['steps']} loss {ema:.4f} ({time.perf_counter() - t0:.0f} s)")
    unet.eval()
    return ({k: v.detach().clone() for k, v in unet.state_dict().items()},
            {k: v.detach().clone() for k, v in te.state_dict().items()})


def load_or_train(cache_dir: Path, log=print) -> World:
    """The world from ``cache_dir`` (a folder named by ``world_key()``), trained there if absent.
    Processes that ask at once (pytest-xdist workers, two test runs) take turns: one trains it,
    the others wait for it and load it."""
    from filelock import FileLock

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / "build.lock")):
        return _load_or_train(cache_dir, log)


def _load_or_train(cache_dir: Path, log) -> World:
    from safetensors.torch import load_file, save_file

    unet_file, te_file = cache_dir / "unet.safetensors", cache_dir / "text_encoder.safetensors"
    t0 = time.perf_counter()
    if unet_file.is_file() and te_file.is_file():
        return World(load_file(str(unet_file)), load_file(str(te_file)), time.perf_counter() - t0, True)
    unet_state, te_state = train_world(log=log)
    save_file({k: v.contiguous() for k, v in te_state.items()}, str(te_file) + ".tmp")
    save_file({k: v.contiguous() for k, v in unet_state.items()}, str(unet_file) + ".tmp")
    Path(str(te_file) + ".tmp").replace(te_file)
    Path(str(unet_file) + ".tmp").replace(unet_file)
    build = time.perf_counter() - t0
    (cache_dir / "build_seconds.txt").write_text(f"{build:.1f}\n", encoding="utf-8")
    return World(unet_state, te_state, build, False)


# --- generating ---------------------------------------------------------------------------------

@torch.no_grad()
def sample(bundle, prompt: str, *, n: int = 32, seed: int = 0, steps: int = 12, guidance: float = 3.0,
           network=None, multiplier: float = 1.0) -> np.ndarray:
    """``n`` images (n, H, W, 3) in [-1, 1] for ``prompt``: DDIM, fixed seeds, CFG.

    With ``network`` it is on at ``multiplier`` for the prompt and the unguided branch alike
    (as a web-UI applies a LoRA to the whole model), and off afterwards.
    """
    from diffusers import DDIMScheduler

    from trainer.conditioning import PromptEncoder

    enc = PromptEncoder(bundle)
    cond, uncond = enc.encode([prompt]).hidden, enc.encode([""]).hidden
    hidden = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
    ddim = DDIMScheduler.from_config(bundle.noise_scheduler.config, clip_sample=False,
                                     set_alpha_to_one=False, steps_offset=1)
    ddim.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    side = SIZE // FACTOR
    x = torch.randn((n, 4, side, side), generator=gen)
    if network is not None:
        network.multiplier = multiplier
    try:
        for t in ddim.timesteps:
            eps = bundle.unet(torch.cat([x, x]), t, hidden).sample
            e_u, e_c = eps.chunk(2)
            x = ddim.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    finally:
        if network is not None:
            network.multiplier = 0.0
    return bundle.vae.decode(x).sample.permute(0, 2, 3, 1).numpy()


def load_network(bundle, path, config=None):
    """A saved network file applied to ``bundle`` (multiplier 0 until set)."""
    from trainer.network.network import spec_from_config
    from trainer.network.resume import resume_network

    from helpers import quick_config

    net = resume_network(bundle, spec_from_config(config or quick_config(), train_text_encoder=True), str(path))
    net.apply_to()
    net.multiplier = 0.0
    return net


class WorldHost:
    """A Host for ``run_job`` that hands over a fresh copy of the tiny world's bundle."""

    def __init__(self, world: World, out: Path):
        self.world, self.out = world, Path(out)
        self.loads = self.restored = 0

    def load(self, config):
        self.loads += 1
        return self.world.bundle()

    def restore(self) -> None:
        self.restored += 1

    def lora_dir(self) -> Path:
        return self.out
