"""LoRA mode end to end on tiny models: the loss falls, stop/resume is exact, caching, CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import TinyHost, image_folder, quick_config
from trainer.training.control import TrainControl
from trainer.training.errors import JobError
from trainer.training.job import run_job


def _losses(csv_path):
    rows = list(csv.reader(open(csv_path, encoding="utf-8")))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Step")
    return [float(r[2]) for r in rows[head + 1:]]


@pytest.mark.slow
@pytest.mark.parametrize("network_type", ["lierla", "c3lier", "loha"])
def test_lora_mode_loss_falls(tmp_path, network_type):
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), network_type=network_type, train_iterations="60",
                       train_learning_rate="3e-3", logging_save_csv=True, train_min_timesteps="400",
                       train_max_timesteps="600", save_lora_name=f"fall_{network_type}",
                       lora_trigger_word="pat")
    host = TinyHost("sd1", tmp_path / "out")
    result = run_job(cfg, host=host, logs_dir=tmp_path / "logs")
    assert result.saved and result.saved[-1].name == f"fall_{network_type}.safetensors"
    assert host.restored == 1
    losses = _losses(result.csv_paths[0])
    assert len(losses) == 60  # exactly train_iterations optimizer steps
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)


def _final_weights(path):
    return {k: v.float() for k, v in load_file(str(path)).items()}


@pytest.mark.slow
def test_stop_and_resume_match_uninterrupted_run(tmp_path):
    data = image_folder(tmp_path / "data", n=3)
    common = dict(lora_data_directory=str(data), train_iterations="10", save_overwrite=True,
                  train_lr_scheduler="cosine", logging_save_csv=True)
    full = run_job(quick_config(save_lora_name="full", **common), host=TinyHost("sd1", tmp_path / "a"),
                   logs_dir=tmp_path / "logs")

    stop = TrainControl()

    def stop_at_4(event):
        if event.step == 4 and not event.message:
            stop.stop()

    stop.listen(on_progress=stop_at_4)
    cfg = quick_config(save_lora_name="part", **common)
    first = run_job(cfg, host=TinyHost("sd1", tmp_path / "b"), logs_dir=tmp_path / "logs", control=stop)
    assert first.stopped and first.steps == 4
    assert (tmp_path / "b" / "part_4steps.safetensors").is_file()
    assert (tmp_path / "logs" / "state" / "part.pt").is_file()

    second = run_job(cfg, host=TinyHost("sd1", tmp_path / "b"), logs_dir=tmp_path / "logs", resume=True)
    assert not second.stopped and second.steps == 10
    assert not (tmp_path / "logs" / "state" / "part.pt").exists()
    a, b = _final_weights(full.saved[-1]), _final_weights(second.saved[-1])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    # the resumed run appended to the same CSV: 10 rows in all
    assert len(_losses(second.csv_paths[0])) == 10


@pytest.mark.slow
def test_latents_are_encoded_once_and_disk_cache_matches_memory(tmp_path, monkeypatch):
    from trainer.data import cache as cache_mod

    data = image_folder(tmp_path / "data", n=3)
    calls = {"n": 0}
    real = cache_mod.encode_latents

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "encode_latents", counting)
    losses = []
    for disk in (False, True, True):
        calls["n"] = 0
        cfg = quick_config(lora_data_directory=str(data), train_iterations="5", image_mirroring=True,
                           cache_latents_to_disk=disk, logging_save_csv=True, save_overwrite=True)
        res = run_job(cfg, host=TinyHost("sd1", tmp_path / "o"), logs_dir=tmp_path / "logs")
        losses.append(_losses(res.csv_paths[0])[0])
        if disk and len(losses) == 3:
            assert calls["n"] == 0  # second disk run: every latent read back
        else:
            assert calls["n"] == 6  # 3 images + 3 mirrored copies, once each, not once per step
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)


def _cache_first(monkeypatch):
    """Make the job cache every latent before training (as the low profile on a GPU does)."""
    from trainer.training.memory import profiles

    real = profiles.plan

    def plan(*args, **kwargs):
        memory = real(*args, **kwargs)
        memory.defer_unet = True  # on the CPU the U-Net is where it is going already; only the caching moves
        return memory

    monkeypatch.setattr(profiles, "plan", plan)


@pytest.mark.slow
def test_latents_on_first_use_train_the_same_weights_as_caching_first(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "data", n=3)
    common = dict(lora_data_directory=str(data), train_iterations="5", image_mirroring=True, save_overwrite=True)
    messages = []
    control = TrainControl(on_log=messages.append,
                           on_progress=lambda e: messages.append(e.message or f"step {e.step}"))
    lazy = run_job(quick_config(save_lora_name="lazy", **common), host=TinyHost("sd1", tmp_path / "o"),
                   logs_dir=tmp_path / "logs", control=control)
    first = next(i for i, m in enumerate(messages) if m.startswith("latents: 6 to cache"))
    done = messages.index("caching latents 6/6 (all cached)")
    assert first < messages.index("step 1") < done  # a step was taken before the last latent was cached
    with monkeypatch.context() as patch:
        _cache_first(patch)
        messages.clear()
        eager = run_job(quick_config(save_lora_name="eager", **common), host=TinyHost("sd1", tmp_path / "o"),
                        logs_dir=tmp_path / "logs", control=control)
        assert messages.index("caching latents 6/6") < messages.index("step 1")
    # and from a disk cache written by a lazy run (a second lazy run reads every latent back)
    for name in ("disk1", "disk2"):
        disk = run_job(quick_config(save_lora_name=name, cache_latents_to_disk=True, **common),
                       host=TinyHost("sd1", tmp_path / "o"), logs_dir=tmp_path / "logs")
    a, b, c = (_final_weights(r.saved[-1]) for r in (lazy, eager, disk))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k


@pytest.mark.slow
def test_stop_and_resume_with_latents_cached_on_first_use(tmp_path):
    """The stop comes before the first epoch ends: the resumed run encodes the rest as it goes."""
    data = image_folder(tmp_path / "data", n=4)
    common = dict(lora_data_directory=str(data), train_iterations="6", save_overwrite=True, image_mirroring=True)
    full = run_job(quick_config(save_lora_name="full", **common), host=TinyHost("sd1", tmp_path / "a"),
                   logs_dir=tmp_path / "logs")
    stop = TrainControl()
    stop.listen(on_progress=lambda e: stop.stop() if e.step == 2 and not e.message else None)
    cfg = quick_config(save_lora_name="part", **common)
    first = run_job(cfg, host=TinyHost("sd1", tmp_path / "b"), logs_dir=tmp_path / "logs", control=stop)
    assert first.stopped and first.steps == 2
    second = run_job(cfg, host=TinyHost("sd1", tmp_path / "b"), logs_dir=tmp_path / "logs", resume=True)
    a, b = _final_weights(full.saved[-1]), _final_weights(second.saved[-1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_latent_cache_gives_each_sample_the_same_latent_in_any_order(tmp_path):
    from tiny import tiny_vae
    from trainer.data.buckets import plan_samples
    from trainer.data.cache import LatentCache
    from trainer.data.images import discover_images

    data = image_folder(tmp_path / "data", n=3)
    specs = plan_samples(discover_images(data), (64, 64), 64, 64, 2.0, mirroring=True)
    vae = tiny_vae().eval()
    upfront = LatentCache(vae, specs, scale=0.18).build()
    assert upfront.complete and upfront.vae_calls == len(specs)
    seen = []
    lazy = LatentCache(vae, specs, scale=0.18, progress=lambda done, total: seen.append((done, total)))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    lazy.ensure([4, 1])
    assert lazy.done == 2 and not lazy.complete and lazy.latents[0] is None
    lazy.get([1, 5, 0, 2, 3])  # 1 is not encoded again
    assert lazy.complete and lazy.vae_calls == len(specs) and seen[-1] == (len(specs), len(specs))
    assert torch.equal(torch.get_rng_state(), before)  # the run's random state is left alone
    for x, y in zip(upfront.latents, lazy.latents):
        assert torch.equal(x, y)


def test_refuses_to_overwrite_existing_network(tmp_path):
    data = image_folder(tmp_path / "data", n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.safetensors").write_bytes(b"user's file")
    cfg = quick_config(lora_data_directory=str(data), train_iterations="2")
    with pytest.raises(JobError, match="already exists"):
        run_job(cfg, host=TinyHost("sd1", out), logs_dir=tmp_path / "logs")
    assert (out / "tiny.safetensors").read_bytes() == b"user's file"


@pytest.mark.slow
def test_text_encoder_trained_when_base_selected(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="3", train_textencoder_learning_rate="5e-4")
    assert "BASE" in cfg.network_blocks
    res = run_job(cfg, host=TinyHost("sd1", tmp_path / "o"), logs_dir=tmp_path / "logs")
    sd = load_file(str(res.saved[-1]))
    te_up = [v for k, v in sd.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_up and any(v.abs().sum() > 0 for v in te_up)  # trained away from the zero init


@pytest.mark.slow
def test_sdxl_and_v_prediction_train(tmp_path, monkeypatch):
    """SDXL trains with its pooled text embedding and size/crop time ids and saves LDM (kohya SDXL)
    names; SD2 trains on the v target; both networks moved away from their zero start."""
    from safetensors import safe_open

    from trainer.modes import lora

    seen = []
    real_target, real_forward = lora.training_target, lora.unet_forward

    def target(scheduler, latents, noise, timesteps, prediction_type):
        out = real_target(scheduler, latents, noise, timesteps, prediction_type)
        seen.append(("target", prediction_type, torch.equal(out, scheduler.get_velocity(latents, noise, timesteps))))
        return out

    def forward(bundle, noisy, t, cond, time_ids=None):
        seen.append(("forward", cond.pooled is not None, None if time_ids is None else tuple(time_ids.shape)))
        return real_forward(bundle, noisy, t, cond, time_ids)

    monkeypatch.setattr(lora, "training_target", target)
    monkeypatch.setattr(lora, "unet_forward", forward)
    data = image_folder(tmp_path / "data", n=2, size=(64, 48))
    for kind in ("sdxl", "sd2"):
        seen.clear()
        cfg = quick_config(lora_data_directory=str(data), train_iterations="3", save_lora_name=kind,
                           image_buckets_step="16", image_min_length="32")
        res = run_job(cfg, host=TinyHost(kind, tmp_path / "o"), logs_dir=tmp_path / "logs")
        targets = [s for s in seen if s[0] == "target"]
        forwards = [s for s in seen if s[0] == "forward"]
        assert len(targets) == len(forwards) == 3
        weights = load_file(str(res.saved[-1]))
        with safe_open(str(res.saved[-1]), "pt") as f:
            meta = f.metadata()
        ups = [v for k, v in weights.items() if k.endswith("lora_up.weight")]
        assert ups and max(v.abs().max().item() for v in ups) > 0  # it trained
        if kind == "sdxl":
            assert targets == [("target", "epsilon", False)] * 3
            assert forwards == [("forward", True, (2, 6))] * 3  # pooled embedding and 6 time ids per image
            assert any("_input_blocks_" in k for k in weights) and not any("_down_blocks_" in k for k in weights)
            assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.prediction_type"] == "epsilon"
        else:
            assert targets == [("target", "v_prediction", True)] * 3  # the v target, not the noise
            assert meta["ss_v2"] == "True" and meta["modelspec.prediction_type"] == "v"


@pytest.mark.slow
def test_cli_train_end_to_end(tmp_path, capsys, monkeypatch):
    from tiny import save_tiny_diffusers
    from trainer import paths
    from trainer.cli import main

    monkeypatch.setattr(paths, "jsons_dir", lambda: tmp_path / "jsons")
    model = save_tiny_diffusers("sd1", tmp_path / "model")
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="3", logging_save_csv=True,
                       save_lora_name="cli_run")
    cfg_path = tmp_path / "run.json"
    cfg.to_json(cfg_path)
    args = ["train", str(cfg_path), "--set", f"model={model}", "--output-dir", str(tmp_path / "out"),
            "--logs-dir", str(tmp_path / "logs"), "--device", "cpu"]
    assert main(args) == 0
    assert (tmp_path / "out" / "cli_run.safetensors").is_file()
    assert "Finished: saved " in capsys.readouterr().out
    # a second run refuses to overwrite before training: bad input, a one-line reason, exit 2
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "already exists" in err[-1]
    # bad settings: exit 2 and the parameter named
    assert main(["train", str(cfg_path), "--set", "network_rank=-3"]) == 2
    assert "network_rank" in capsys.readouterr().err
    # the run's config JSON beside the LoRA when save_as_json is on
    assert main(args + ["--set", "save_as_json=true", "--set", "save_lora_name=with_json"]) == 0
    saved = json.loads((tmp_path / "out" / "with_json.json").read_text(encoding="utf-8"))
    assert saved["save_lora_name"] == "with_json"
    # ... and under jsons/<date>/ where load-by-name finds it
    assert len(list((tmp_path / "jsons").glob("*/with_json-*.json"))) == 1


@pytest.mark.slow
def test_out_of_memory_saves_what_was_learned_and_says_what_to_do(tmp_path, monkeypatch):
    from trainer.training.loop import TrainingOutOfMemory
    from trainer.modes import lora

    real = lora.LoraTask.compute_loss

    def failing(self, step):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, step)

    monkeypatch.setattr(lora.LoraTask, "compute_loss", failing)
    data = image_folder(tmp_path / "data", n=2)
    host = TinyHost("sd1", tmp_path / "out")
    cfg = quick_config(lora_data_directory=str(data), train_iterations="6", save_lora_name="oom")
    with pytest.raises(TrainingOutOfMemory) as caught:
        run_job(cfg, host=host, logs_dir=tmp_path / "logs")
    assert caught.value.saved == tmp_path / "out" / "oom_3steps.safetensors"
    assert caught.value.saved.is_file()
    text = str(caught.value)
    assert text.startswith("at step 4: Out of memory: CUDA out of memory")
    assert "To need less:" in text and str(caught.value.saved) in text
    assert host.restored == 1  # the host's model is back even after the error


def _first_grads(tmp_path, monkeypatch, **values):
    """Loss and network gradients of the first step of a tiny LoRA run."""
    from trainer.training import loop

    grabbed = {}
    real = loop._one_step

    def spy(task, opts, dist, step, *rest):
        optimizer = rest[2]
        def keep_grads(opt, args, kwargs):
            grabbed.setdefault("grads", [p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])

        handle = optimizer.register_step_pre_hook(keep_grads)
        try:
            loss = real(task, opts, dist, step, *rest)  # a device tensor, read back by the loop
            grabbed.setdefault("loss", float(loss))
        finally:
            handle.remove()
        return loss

    monkeypatch.setattr(loop, "_one_step", spy)
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="1", save_overwrite=True, **values)
    run_job(cfg, host=TinyHost("sd1", tmp_path / "o"), logs_dir=tmp_path / "logs")
    return grabbed["loss"], grabbed["grads"]


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, monkeypatch):
    loss_a, grads_a = _first_grads(tmp_path, monkeypatch)
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss_b, grads_b = _first_grads(tmp_path, monkeypatch, use_gradient_checkpointing=True)
    assert calls  # the UNet really recomputed its blocks
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_bf16_model_precision_trains_with_fp32_network(tmp_path, monkeypatch):
    """train_model_precision bf16: the frozen U-Net and text encoder are bf16 and run under bf16
    autocast, while the network's weights, gradients and optimizer stay fp32."""
    from trainer.training import loop
    from trainer.modes import lora

    seen = {}
    real_loss, real_step = lora.LoraTask.compute_loss, loop._one_step

    def compute_loss(self, step):
        bundle = self.ctx.bundle
        seen.setdefault("unet", {p.dtype for p in bundle.unet.parameters()})
        seen.setdefault("network", {p.dtype for p in self.network.parameters()})
        seen.setdefault("autocast", torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        loss = real_loss(self, step)
        seen.setdefault("loss", loss.dtype)
        return loss

    def one_step(task, opts, dist, step, accum, scaler, optimizer, *rest):
        def grads(opt, args, kwargs):
            seen.setdefault("grads", {p.grad.dtype for g in opt.param_groups for p in g["params"]})
            seen.setdefault("optimizer", {p.dtype for g in opt.param_groups for p in g["params"]})

        handle = optimizer.register_step_pre_hook(grads)
        try:
            return real_step(task, opts, dist, step, accum, scaler, optimizer, *rest)
        finally:
            handle.remove()

    monkeypatch.setattr(lora.LoraTask, "compute_loss", compute_loss)
    monkeypatch.setattr(loop, "_one_step", one_step)
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="3", train_model_precision="bf16",
                       logging_save_csv=True, save_precision="fp16")
    res = run_job(cfg, host=TinyHost("sd1", tmp_path / "o"), logs_dir=tmp_path / "logs")
    assert seen["unet"] == {torch.bfloat16} and seen["autocast"] == torch.bfloat16
    assert seen["network"] == seen["grads"] == seen["optimizer"] == {torch.float32}
    assert seen["loss"] == torch.float32  # the element loss is taken in fp32
    losses = _losses(res.csv_paths[0])
    assert len(losses) == 3 and all(l == l and l < 10 for l in losses)  # finite
    saved = load_file(str(res.saved[-1]))
    assert all(v.dtype == torch.float16 for v in saved.values())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("lora_up.weight"))  # it trained
