"""The fake web-UI host against records taken from the real ones.

tests/data/hosts holds, per host flavour and model family, what a real AUTOMATIC1111 or Forge
showed with a full-size checkpoint loaded (module trees, state-dict key sets, wrapper classes,
tensor facts; see its README). Here the fake host's model objects are built from a full-size
checkpoint's key layout (meta tensors: no weights, no memory) and must show the same: the same
state-dict keys wherever the trainer reads them, the same wrappers on the same paths, the same
family flags, and inference tensors where Forge has them. A difference means the fake has
drifted from the hosts and the web-UI tests would prove less than they claim.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
RECORDS = sorted([*(HERE / "data" / "hosts").glob("*.json"), *(HERE / "data" / "hosts").glob("*.json.gz")])
FAKEHOST = HERE / "fakehost"
_FAKE_MODULES = ("modules", "modules_forge", "backend", "networks", "fakehost_setup", "fakehost_models",
                 "fakehost_lora", "launch")
# Classes of the hosts' own wrappers and containers; everything else on a recorded path (torch,
# transformers, ldm, Forge's layer and block classes) only has to be there.
_HOST_WRAPPER_PACKAGES = ("modules.", "backend.text_processing.", "backend.nn.clip.", "backend.patcher.clip.",
                          "backend.modules.k_model.")


def _record_id(path: Path) -> str:
    return path.name.split(".json")[0]


def _read(path: Path) -> dict:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(data.decode("utf-8"))


def _family(record: dict) -> str:
    if record.get("sd_model_type", "").endswith(".flux.Flux"):
        return "flux"
    return "sdxl" if record["is_sdxl"] is True else "sd2" if record["is_sd2"] is True else "sd1"


@pytest.fixture
def fake_models(monkeypatch, request):
    """The fake host's model module for a flavour (modules imported fresh, removed afterwards)."""

    def load(flavour: str, root: Path):
        for name in list(sys.modules):
            if name.split(".")[0] in _FAKE_MODULES:
                del sys.modules[name]
        monkeypatch.setenv("FAKEHOST_FLAVOUR", flavour)
        monkeypatch.setenv("FAKEHOST_ROOT", str(root))
        monkeypatch.syspath_prepend(str(FAKEHOST))
        import fakehost_models

        return fakehost_models

    yield load
    for name in list(sys.modules):
        if name.split(".")[0] in _FAKE_MODULES:
            del sys.modules[name]


def _full_size_ldm_state(family: str) -> dict:
    from ldm import ldm_state_dict
    from trainer.hosts.meta import meta_parts

    return ldm_state_dict(family, meta_parts(family))


def _path_types(root: torch.nn.Module, paths) -> dict[str, str]:
    found = {}
    for path in paths:
        try:
            module = root.get_submodule(path) if path else root
        except AttributeError:
            found[path] = "<missing>"
            continue
        found[path] = type(module).__name__
    return found


def _compare_paths(recorded: dict[str, str], root: torch.nn.Module) -> list[str]:
    """Problems: a recorded path the fake lacks or has while the host lacks it, or a host wrapper
    whose class the fake does not reproduce (by class name)."""
    fake = _path_types(root, recorded)
    problems = []
    for path, real in recorded.items():
        missing_here = fake[path] == "<missing>"
        missing_there = real.startswith("<missing")
        if missing_here != missing_there:
            problems.append(f"{path}: host {real}, fake {fake[path]}")
        elif not missing_there and real.startswith(_HOST_WRAPPER_PACKAGES) and real.rsplit(".", 1)[-1] != fake[path]:
            problems.append(f"{path}: host {real}, fake {fake[path]}")
    return problems


@pytest.mark.parametrize("record_path", RECORDS, ids=_record_id)
def test_fake_host_model_matches_the_recorded_real_one(record_path, fake_models, tmp_path):
    record = _read(record_path)
    family = _family(record)
    models = fake_models(record["flavour"], tmp_path / "webui")
    info = SimpleNamespace(filename=str(tmp_path / "model.safetensors"), shorthash="0123456789", title="model")
    if family == "flux":
        _compare_flux(record, models, info)
        return
    state = _full_size_ldm_state(family)
    if record["flavour"] == "a1111":
        model = models.FakeLatentDiffusion(state, info)
        assert {f: getattr(model, f) for f in ("is_sd1", "is_sd2", "is_sdxl")} == \
            {f: record[f] for f in ("is_sd1", "is_sd2", "is_sdxl")}
        assert sorted(model.state_dict()) == sorted(record["state_dict_keys"])
        assert _compare_paths(record["path_types"], model) == []
        assert not any(p.is_inference() for p in model.parameters())  # A1111 loads outside inference mode
        assert sum(p.requires_grad for p in model.parameters()) == record["tensors"]["n_requires_grad"]
        return
    with torch.inference_mode():
        engine = models.ForgeEngine(state, info)
    assert {f: getattr(engine, f) for f in ("is_sd1", "is_sd2", "is_sdxl")} == \
        {f: record[f] for f in ("is_sd1", "is_sd2", "is_sdxl")}
    objects = engine.forge_objects
    unet = objects.unet.model.diffusion_model
    assert sorted(unet.state_dict()) == sorted(record["unet_state_dict_keys"])
    assert sorted(objects.vae.first_stage_model.state_dict()) == sorted(record["vae_state_dict_keys"])
    assert _compare_paths(record["unet_path_types"], unet) == []
    encoders = objects.clip.cond_stage_model
    assert sorted(name for name, _ in encoders.named_children()) == sorted(record["text_encoders"])
    for name, facts in record["text_encoders"].items():
        encoder = getattr(encoders, name)
        assert type(encoder).__name__ == facts["type"].rsplit(".", 1)[-1]
        assert sorted(encoder.state_dict()) == sorted(facts["state_dict_keys"]), name
        assert _compare_paths(facts["path_types"], encoder) == [], name
        inference = facts["tensors"]["n_inference_params"] == facts["tensors"]["n_params"]
        assert all(p.is_inference() == inference for p in encoder.parameters()), name
    inference = record["unet_tensors"]["n_inference_params"] == record["unet_tensors"]["n_params"]
    assert all(p.is_inference() == inference for p in unet.parameters())
    assert sum(p.requires_grad for p in unet.parameters()) == record["unet_tensors"]["n_requires_grad"]
    vae = objects.vae.first_stage_model
    assert sum(p.requires_grad for p in vae.parameters()) == record["vae_tensors"]["n_requires_grad"]
    assert type(objects.unet.model).__name__ == record["kmodel_type"].rsplit(".", 1)[-1]
    assert objects.unet.model.predictor.prediction_type == record["prediction_type"]


def _full_size_flux_file(record: dict) -> dict:
    """An all-in-one Flux.1 file's keys and shapes at full size (meta tensors), written by the tests' own
    helpers from the shipped configs: BFL transformer (dev, or schnell without the guidance embedding; its
    tensors fp8 for an fp8 record), LDM VAE, CLIP-L and T5 under ``text_encoders.``."""
    from ldm import clip_to_ldm, vae_to_ldm
    from tiny_dit import flux_to_bfl, t5_state
    from trainer.hosts.meta import meta_parts

    parts = meta_parts("flux")
    bfl = flux_to_bfl(parts["unet"])
    if "guidance_in.in_layer.weight" not in record["unet_state_dict_keys"]:
        bfl = {k: v for k, v in bfl.items() if not k.startswith("guidance_in.")}
    if record["storage_dtype"].startswith("torch.float8"):
        bfl = {k: v.to(torch.bfloat16 if k.endswith(".scale") else torch.float8_e4m3fn) for k, v in bfl.items()}
    state = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    state.update(vae_to_ldm(parts["vae"], prefix="vae."))
    clip, t5 = parts["text_encoders"]
    state.update(clip_to_ldm(clip, "text_encoders.clip_l.transformer."))
    state.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_state(t5).items()})
    return state


def _compare_flux(record: dict, models, info) -> None:
    """The fake Forge's Flux engine against the record of real Forge's (tests/data/hosts/forge_flux*)."""
    state = _full_size_flux_file(record)
    with torch.inference_mode():
        engine = models.Flux(state, info)
    assert type(engine).__name__ == record["sd_model_type"].rsplit(".", 1)[-1]
    flags = ("is_sd1", "is_sd2", "is_sdxl", "is_sd3", "use_distilled_cfg_scale")
    assert {f: getattr(engine, f) for f in flags} == {f: record[f] for f in flags}
    assert engine.model_config.huggingface_repo == record["huggingface_repo"]
    objects = engine.forge_objects
    kmodel = objects.unet.model
    assert type(kmodel).__name__ == record["kmodel_type"].rsplit(".", 1)[-1]
    assert type(kmodel.predictor).__name__ == record["predictor_type"].rsplit(".", 1)[-1]
    predictor = kmodel.predictor
    assert (predictor.prediction_type, predictor.mu) == (record["prediction_type"], record["predictor_mu"])
    assert str(kmodel.storage_dtype) == record["storage_dtype"]
    dit = kmodel.diffusion_model
    shapes = {k: [list(v.shape), str(v.dtype)] for k, v in dit.state_dict().items()}
    assert shapes == {k: v[:2] for k, v in record["unet_state_dict"].items()}  # names, full-size shapes, dtypes
    assert _compare_paths(record["unet_path_types"], dit) == []
    assert sorted(name for name, _ in dit.named_modules()) == sorted(record["unet_module_types"])  # the whole tree
    assert all(p.is_inference() for p in dit.parameters()) and record["unet_tensors"]["n_inference_params"] == \
        record["unet_tensors"]["n_params"]
    assert sum(p.requires_grad for p in dit.parameters()) == record["unet_tensors"]["n_requires_grad"]
    vae = objects.vae.first_stage_model
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == \
        {k: v[0] for k, v in record["vae_state_dict"].items()}
    encoders = objects.clip.cond_stage_model
    assert sorted(name for name, _ in encoders.named_children()) == sorted(record["text_encoders"])
    for name, facts in record["text_encoders"].items():
        encoder = getattr(encoders, name)
        assert type(encoder).__name__ == facts["type"].rsplit(".", 1)[-1], name
        assert {k: list(v.shape) for k, v in encoder.state_dict().items()} == \
            {k: v[0] for k, v in facts["state_dict"].items()}, name
        assert _compare_paths(facts["path_types"], encoder) == [], name
    assert type(objects.clip.tokenizer).__name__ == record["clip_tokenizer_type"].rsplit(".", 1)[-1]
    assert sorted(vars(objects.clip.tokenizer)) == sorted(record["tokenizers"])


def test_records_cover_both_hosts():
    """The records this file checks against exist for both flavours (the fidelity claim needs them)."""
    flavours = {_read(p)["flavour"] for p in RECORDS}
    assert {"a1111", "forge"} <= flavours


# ----------------------------------------------------------------------------- txt2img and the LoRA loaders

API = json.loads((HERE / "data" / "hosts" / "api" / "txt2img.json").read_text(encoding="utf-8"))


def _params(fn) -> list[str]:
    import inspect

    out = []
    for p in inspect.signature(fn).parameters.values():
        out.append({p.VAR_POSITIONAL: f"*{p.name}", p.VAR_KEYWORD: f"**{p.name}"}.get(p.kind, p.name))
    return out


def _quotes(line: str) -> str:
    return line.replace('"', "'")


@pytest.mark.parametrize("flavour, record", [("a1111", "a1111-1.8"), ("forge", "forge")])
def test_fake_txt2img_and_lora_loader_have_the_real_names(flavour, record, fake_models, tmp_path):
    """The fake's processing, extra networks and LoRA loader offer only what the real host has, with
    the same parameters, and print Forge's loader report in Forge's own words."""
    import dataclasses
    import inspect

    real = API[record]
    fake_models(flavour, tmp_path / "webui")
    import networks
    from modules import extra_networks, processing

    txt2img = {f.name for f in dataclasses.fields(processing.StableDiffusionProcessingTxt2Img) if f.init}
    real_fields = set(real["processing.StableDiffusionProcessing.fields"]) | \
        set(real["processing.StableDiffusionProcessingTxt2Img.fields"])
    assert txt2img <= real_fields and ("scheduler" in txt2img) == ("scheduler" in real_fields)
    assert _params(processing.process_images) == real["processing.process_images"]
    assert set(_params(processing.Processed.__init__)) <= set(real["processing.Processed.__init__"])
    for name, params in real["extra_networks.functions"].items():
        assert _params(getattr(extra_networks, name)) == params, name
    for name, params in real["networks.functions"].items():
        if hasattr(networks, name):
            assert _params(getattr(networks, name)) == params, name
    used = {"a1111": ("load_networks", "network_restore_weights_from_backup", "network_reset_cached_weight",
                      "list_available_networks"),
            "forge": ("load_networks", "load_lora_for_models", "load_lora_state_dict", "list_available_networks")}
    assert all(name in real["networks.functions"] and hasattr(networks, name) for name in used[flavour])
    assert {g for g in real["networks.globals"] if hasattr(networks, g)} == set(real["networks.globals"])
    if flavour == "a1111":  # its loader prints no report (unmatched keys go to logging.debug)
        assert real["networks.prints"] == []
        return
    fake_prints = [_quotes(line.strip()) for line in inspect.getsource(networks).splitlines()
                   if "print(f" in line and "[LORA]" in line]
    assert fake_prints == [_quotes(line) for line in real["networks.prints"]]
    from backend.patcher import lora
    from modules import shared
    from modules_forge import main_thread

    import fakehost_models

    for name, params in real["backend.patcher.lora.functions"].items():
        assert _params(getattr(lora, name)) == params, name
    for cls, recorded in ((lora.LoraLoader, real["backend.patcher.lora.LoraLoader"]),
                          (fakehost_models.ModelPatcher, real["backend.patcher.base.ModelPatcher"]),
                          (fakehost_models.CLIP, real["backend.patcher.clip.CLIP"])):
        for name, params in recorded.items():
            if name != "__init__":
                assert _params(getattr(cls, name)) == params, f"{cls.__name__}.{name}"
    assert ["shallow_copy"] == [m for m in real["backend.diffusion_engine.base.ForgeObjects"] if m != "__init__"]
    assert _params(main_thread.run_and_wait_result) == real["modules_forge.main_thread.run_and_wait_result"]
    assert {k for k in shared.opts.data if "_t2i_" in k} <= set(real["forge_ui_preset_options"])


@pytest.mark.parametrize("record_name", ["forge_flux.json.gz", "forge_flux-schnell.json.gz"])
def test_forges_full_size_flux_model_becomes_the_diffusers_bundle(record_name, fake_models, tmp_path):
    """What Forge holds for a full-size Flux.1 model (the fake, equal to the record above; meta tensors)
    goes through the adapter and the bundle builder with the shipped configs: every tensor finds its place
    in diffusers' FluxTransformer2DModel, AutoencoderKL, CLIPTextModel and T5EncoderModel, none is left over."""
    from trainer.hosts.meta import meta_parts
    from trainer.hosts.webui import ForgeAdapter
    from trainer.hosts.webui_dit import flux_bundle_from_host_state
    from trainer.hosts.webui_weights import normalise_keys

    record = _read(HERE / "data" / "hosts" / record_name)
    models = fake_models("forge", tmp_path / "webui")
    info = SimpleNamespace(filename=str(tmp_path / "model.safetensors"), shorthash="0123456789", title="model")
    with torch.inference_mode():
        engine = models.Flux(_full_size_flux_file(record), info)
    assert ForgeAdapter().family(engine) == "flux"
    state, _ = ForgeAdapter().weights(engine, "flux", None)
    bundle = flux_bundle_from_host_state(normalise_keys(state), tokenizers=["clip", "t5"], source="full size")
    schnell = "schnell" in record_name
    assert bundle.family.variant == ("schnell" if schnell else bundle.family.variant) and \
        bool(bundle.unet.config.guidance_embeds) is not schnell
    full = meta_parts("flux")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    guidance = sum(p.numel() for n, p in full["unet"].named_parameters() if "guidance_embedder" in n)
    assert count(bundle.unet) == count(full["unet"]) - (guidance if schnell else 0)
    assert count(bundle.vae) == count(full["vae"])
    assert [count(te) for te in bundle.text_encoders] == [count(te) for te in full["text_encoders"]]
