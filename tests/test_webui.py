"""TrainTrain as an AUTOMATIC1111 / Forge extension, against the fake host in tests/fakehost.

Both flavours run every contract test: the tab registration, the host's lists and folders,
handing over the loaded weights (shared on A1111, cloned from inference tensors on Forge),
loading a chosen checkpoint file, and whole runs through ``WebUIHost.run`` that must leave the
user's model, the GPU lock and the job state exactly as they were, also after an error, a
Stop or the host's Interrupt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from helpers import image_folder, quick_config
from trainer.training.control import TrainControl
from trainer.training.job import run_job

ROOT = Path(__file__).resolve().parent.parent
FAKEHOST = Path(__file__).resolve().parent / "fakehost"
SCRIPT = ROOT / "scripts" / "traintrain.py"
_FAKE_MODULES = ("modules", "modules_forge", "backend", "networks", "fakehost_setup", "fakehost_models",
                 "fakehost_lora", "launch")


def _purge_fake_host() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _FAKE_MODULES:
            del sys.modules[name]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Checkpoint, VAE and config files, written once for all tests of this file."""
    sys.path.insert(0, str(FAKEHOST))
    try:
        import fakehost_setup

        return fakehost_setup.make_assets(tmp_path_factory.mktemp("fakehost_assets"))
    finally:
        sys.path.remove(str(FAKEHOST))
        _purge_fake_host()


@pytest.fixture(params=["a1111", "forge"])
def webui(request, assets, tmp_path, monkeypatch):
    """A started fake web UI of one flavour (modules imported fresh), cleaned up afterwards."""
    monkeypatch.setenv("FAKEHOST_FLAVOUR", request.param)
    monkeypatch.setenv("FAKEHOST_ROOT", str(tmp_path / "webui"))
    _purge_fake_host()
    monkeypatch.syspath_prepend(str(FAKEHOST))
    import fakehost_setup

    ui = fakehost_setup.start(tmp_path / "webui", assets)
    yield ui
    _purge_fake_host()


def _host(ui, **kwargs):
    from trainer.hosts.webui_session import WebUIHost

    messages = []
    host = WebUIHost(config_dir=ui.config_dir, log=messages.append, **kwargs)
    host.messages = messages
    return host


def _placement(sd_model) -> str:
    if hasattr(sd_model, "forge_objects"):
        return sd_model.forge_objects.unet.model.placement
    return sd_model.placement


def _submodule(root, path: str):
    """The module at a dotted ``path`` from ``root``, through plain attributes as well (forge_objects)."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _weights(sd_model) -> dict:
    if hasattr(sd_model, "forge_objects"):
        return {k: v.clone() for k, v in sd_model.forge_objects.unet.model.diffusion_model.state_dict().items()}
    return {k: v.clone() for k, v in sd_model.state_dict().items()}


def _lock():
    from modules import call_queue

    return call_queue.queue_lock


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def _te_out(te):
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 4])
    with torch.no_grad():
        return te(ids).last_hidden_state


# ----------------------------------------------------------------------------- registration

def _import_script() -> None:
    """Import scripts/traintrain.py the way the host's script loader does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("traintrain_script", SCRIPT)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


_IMPORT_PROBE = """
import importlib.util, sys
before = set(sys.modules)
basedir = sys.argv[1]
syspath = sys.path
sys.path = [basedir] + sys.path          # what the host does while it imports the script
spec = importlib.util.spec_from_file_location("traintrain_script", basedir + "/scripts/traintrain.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.path = syspath                         # and restores afterwards
from modules import script_callbacks
tabs = script_callbacks.callback_map["callbacks_ui_tabs"]
heavy = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("torch", "diffusers", "transformers", "gradio", "numpy", "safetensors"))
import trainer.hosts.webui_weights        # the package stays importable after the host restored sys.path
print(len(tabs), [t.name for t in tabs], heavy, trainer.__file__)
"""


@pytest.mark.parametrize("flavour", ["a1111", "forge"])
def test_script_registers_one_tab_without_heavy_imports(flavour, tmp_path):
    env = dict(os.environ, FAKEHOST_FLAVOUR=flavour, FAKEHOST_ROOT=str(tmp_path), PYTHONPATH=str(FAKEHOST))
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(ROOT)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 [None] [] "), out.stdout  # one tab, registered without name=, nothing heavy
    assert out.stdout.strip().endswith(str(ROOT / "trainer" / "__init__.py"))


_OTHER_TRAINER_PROBE = """
import importlib.util, sys
basedir, other, imported_first = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sys.path.insert(0, other)                  # another package named trainer is installed
if imported_first:
    import trainer                         # ... and something imported it before the web UI loaded us
spec = importlib.util.spec_from_file_location("traintrain_script", basedir + "/scripts/traintrain.py")
try:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
except ImportError as error:
    print("refused:", error)
else:
    import trainer
    print("loaded:", trainer.__file__)
"""


@pytest.mark.parametrize("imported_first", [True, False])
def test_script_refuses_another_trainer_package_and_prefers_its_own(imported_first, tmp_path):
    """Another installed package named ``trainer`` never stands in for ours: already imported, the
    script says which one it is; only installed, the extension's own folder wins."""
    other = tmp_path / "site"
    (other / "trainer").mkdir(parents=True)
    (other / "trainer" / "__init__.py").write_text("")
    env = dict(os.environ, FAKEHOST_FLAVOUR="a1111", FAKEHOST_ROOT=str(tmp_path), PYTHONPATH=str(FAKEHOST))
    out = subprocess.run([sys.executable, "-c", _OTHER_TRAINER_PROBE, str(ROOT), str(other), str(int(imported_first))],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if imported_first:
        assert out.stdout.startswith("refused: another package named 'trainer'"), out.stdout
        assert str(other / "trainer" / "__init__.py") in out.stdout
    else:
        assert out.stdout.strip() == f"loaded: {ROOT / 'trainer' / '__init__.py'}", out.stdout


@pytest.mark.slow
def test_tab_callback_builds_the_ui_for_a_webui_host(webui, monkeypatch):
    """The callback hands a WebUIHost to trainer.ui.page.build_ui(standalone=False) and names the tab."""
    from modules import script_callbacks

    calls = []
    stand_in = types.ModuleType("trainer.ui.page")
    stand_in.build_ui = lambda host, standalone=True: calls.append((host, standalone)) or "BLOCKS"
    monkeypatch.setitem(sys.modules, "trainer.ui.page", stand_in)
    script_callbacks.clear_callbacks()
    _import_script()
    assert script_callbacks.ui_tabs_callback() == [("BLOCKS", "TrainTrain", "traintrain_tab")]
    from trainer.hosts.webui_session import WebUIHost

    assert len(calls) == 1 and isinstance(calls[0][0], WebUIHost) and calls[0][1] is False


def test_real_ui_module_builds_the_tab(webui):
    """What the host's on_ui_tabs gets from the registered callback: one tab titled TrainTrain, the
    web-UI page (no page title, no page CSS) working on the loaded model through a WebUIHost."""
    import gradio as gr
    from modules import script_callbacks

    from trainer.hosts.webui_session import WebUIHost

    script_callbacks.clear_callbacks()
    _import_script()
    [(blocks, title, elem_id)] = script_callbacks.ui_tabs_callback()
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("TrainTrain", "traintrain_tab")
    assert isinstance(blocks.traintrain.host, WebUIHost) and blocks.traintrain.standalone is False
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert "traintrain_tab" in ids and "traintrain_title" not in ids  # the host shows its own title


# ----------------------------------------------------------------------------- host facts

def test_lists_folders_and_flavour(webui):
    from trainer.hosts.webui import is_forge

    host = _host(webui)
    assert is_forge() == (webui.flavour == "forge")
    names = host.list_models()
    assert [n.split(" ")[0] for n in names] == ["base.safetensors", "other.safetensors", "sd2.safetensors",
                                                "xl.safetensors"]
    assert host.list_vaes() == ["tiny.vae.safetensors"]
    assert host.lora_dir() == webui.lora_dir
    assert host.loaded_model_name().startswith("base.safetensors [")


def test_family_and_prediction_come_from_the_host_model(webui):
    from modules import shared
    from trainer.hosts.base import ModelLoadError
    from trainer.hosts.webui import adapter

    host_adapter, sd_model = adapter(), shared.sd_model
    assert host_adapter.family(sd_model) == "sd1" and host_adapter.prediction(sd_model) == "epsilon"
    if webui.flavour == "forge":
        sd_model.forge_objects.unet.model.predictor.prediction_type = "v_prediction"
        sd_model.is_sd1, sd_model.is_sd3 = False, True
    else:
        sd_model.parameterization = "v"
        sd_model.is_sd3 = True
    assert host_adapter.prediction(sd_model) == "v_prediction"
    with pytest.raises(ModelLoadError, match="cannot be trained .*supported: SD1.x, SD2.x, SDXL base"):
        host_adapter.family(sd_model)


@pytest.mark.slow
def test_loaded_model_is_handed_over_and_put_back(webui):
    from modules import shared
    import networks

    host = _host(webui)
    sd_model = shared.sd_model
    before = _weights(sd_model)
    refreshes = networks.refresh_calls
    shared.opts.CLIP_stop_at_last_layers, shared.opts.emphasis = 2, "No norm"  # the host's prompt settings
    bundle = host.load(quick_config(model="", lora_data_directory="x"))
    try:
        options = bundle.text_options
        assert (options.clip_skip, options.emphasis) == (2, "No norm")
        assert options.clip_skip_sdxl == (webui.flavour == "forge")  # A1111 keeps SDXL on the penultimate layer
        assert options.embeddings_dir == shared.cmd_opts.embeddings_dir  # the host's textual inversions
        assert _lock().locked() and _placement(sd_model) == "cpu"
        assert shared.state.job == "TrainTrain"
        parts = webui.parts["base"]
        assert torch.allclose(_unet_out(bundle.unet), _unet_out(parts["unet"]), atol=1e-5)
        assert torch.allclose(_te_out(bundle.text_encoders[0]), _te_out(parts["text_encoders"][0]), atol=1e-5)
        # Shared with the host, no second copy in memory; Forge's inference tensors are shared
        # through ordinary tensors on the same storage, which autograd can save.
        unet_module = "model.diffusion_model" if webui.flavour == "a1111" else "forge_objects.unet.model.diffusion_model"
        host_conv = _submodule(sd_model, unet_module + ".input_blocks.0.0").weight
        assert bundle.unet.conv_in.weight.data_ptr() == host_conv.data_ptr()
        assert not any(p.is_inference() for p in bundle.unet.parameters())
        assert not any(p.is_inference() for p in bundle.text_encoders[0].parameters())
        assert bundle.metadata["name"] == "base" and bundle.metadata["sha256"]
    finally:
        host.restore()
    assert shared.sd_model is sd_model and _placement(sd_model) == "cuda"
    assert all(torch.equal(v, before[k]) for k, v in _weights(sd_model).items())
    assert not _lock().locked() and shared.state.job == ""
    assert networks.refresh_calls == refreshes + 1


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["xl", "sd2"])
def test_loaded_sdxl_and_sd2_weights_are_handed_over(webui, stem):
    """SDXL and SD2 as each host holds them: A1111's conditioner.embedders / cond_stage_model with hijack
    wrappers; Forge's clip_l/clip_g/clip_h in transformers layout, token embeddings wrapped for TI."""
    from modules import sd_models, shared
    from trainer.hosts.webui_session import WebUIHost

    info = sd_models.get_closet_checkpoint_match(f"{stem}.safetensors")
    if webui.flavour == "forge":
        sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info, additional_modules=[])
        sd_models.forge_model_reload()
    else:
        sd_models.reload_model_weights(info=info)
    assert shared.sd_model.is_sdxl if stem == "xl" else shared.sd_model.is_sd2
    placed = _placement(shared.sd_model)  # Forge moves a freshly loaded engine to the GPU only when it runs
    config_dir = webui.config_dir_xl if stem == "xl" else webui.config_dir_sd2
    host = WebUIHost(config_dir=config_dir, log=lambda m: None)
    bundle = host.load(quick_config(lora_data_directory="x", model_v_pred=True))
    try:
        assert bundle.family.name == ("sdxl" if stem == "xl" else "sd2")
        assert bundle.prediction_type == "v_prediction" and bundle.metadata["v_pred_source"] == "option"
        parts = webui.parts[stem]
        for mine, theirs in zip([bundle.unet, *bundle.text_encoders], [parts["unet"], *parts["text_encoders"]]):
            expected = theirs.state_dict()
            got = mine.state_dict()
            assert set(got) == set(expected)
            assert all(torch.equal(got[k], expected[k]) for k in expected)
    finally:
        host.restore()
    assert shared.sd_model.sd_checkpoint_info is info and _placement(shared.sd_model) == placed


def test_unknown_wrapper_holding_another_tensor_is_named():
    """Two keys that unwrap to one name must be one tensor (Forge's TI wrapper); otherwise say so."""
    from trainer.hosts.base import ModelLoadError
    from trainer.hosts.webui_weights import normalise_keys

    weight = torch.ones(3, 2)
    same = normalise_keys({"e.token_embedding.weight": weight, "e.token_embedding.wrapped.weight": weight[:]})
    assert list(same) == ["e.token_embedding.weight"]
    with pytest.raises(ModelLoadError, match="two different tensors for e.token_embedding.weight"):
        normalise_keys({"e.token_embedding.weight": weight, "e.token_embedding.wrapped.weight": weight.clone()})


@pytest.mark.slow
def test_chosen_checkpoint_and_vae_are_read_from_files(webui):
    from modules import sd_models, shared

    host = _host(webui)
    sd_model = shared.sd_model
    other = next(n for n in host.list_models() if n.startswith("other"))
    bundle = host.load(quick_config(model=other, vae="tiny.vae.safetensors", lora_data_directory="x"))
    try:
        assert _placement(sd_model) == "cpu"
        assert torch.allclose(_unet_out(bundle.unet), _unet_out(webui.parts["other"]["unet"]), atol=1e-5)
        expected_vae = webui.parts["vae"]["vae"].state_dict()
        assert all(torch.equal(v, expected_vae[k]) for k, v in bundle.vae.state_dict().items())
        assert bundle.metadata["name"] == "other"
    finally:
        host.restore()
    assert shared.sd_model is sd_model and _placement(sd_model) == "cuda" and not _lock().locked()
    assert sd_models.load_calls == [str(webui.base)]  # the host itself loaded nothing more


def test_bad_choices_are_named_and_leave_the_host_alone(webui):
    from modules import shared
    from trainer.hosts.base import ModelLoadError

    host = _host(webui)
    sd_model = shared.sd_model
    with pytest.raises(ModelLoadError, match=r"model: 'nope\.safetensors' is not a checkpoint .*base\.safetensors"):
        host.load(quick_config(model="nope.safetensors", lora_data_directory="x"))
    with pytest.raises(ModelLoadError, match=r"vae: 'missing\.pt' is not a VAE .*tiny\.vae\.safetensors"):
        host.load(quick_config(vae="missing.pt", lora_data_directory="x"))
    broken = webui.root / "models" / "Stable-diffusion" / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="broken.safetensors could not be read"):
        host.load(quick_config(model=str(broken), lora_data_directory="x"))
    assert shared.sd_model is sd_model and _placement(sd_model) == "cuda"
    assert not _lock().locked() and host._session is None


def test_wrong_names_are_reported_before_the_host_model_moves(webui, tmp_path, monkeypatch):
    """A run with a model or VAE the host does not have stops before load: the user's model never moves."""
    from modules import shared
    from trainer.hosts.base import ModelLoadError
    from trainer.hosts.webui_session import WebUIHost

    loads = []
    monkeypatch.setattr(WebUIHost, "load", lambda self, config: loads.append(config))
    host = _host(webui)
    data = image_folder(tmp_path / "data", n=2)
    for bad, match in (({"model": "nope.safetensors"}, "model: 'nope.safetensors' is not a checkpoint"),
                       ({"vae": "missing.pt"}, "vae: 'missing.pt' is not a VAE")):
        with pytest.raises(ModelLoadError, match=match):
            run_job(quick_config(lora_data_directory=str(data), **bad), host=host, logs_dir=tmp_path / "logs")
    assert loads == [] and _placement(shared.sd_model) == "cuda" and not _lock().locked()


def test_a_flux_or_zimage_model_is_refused_on_a1111_before_anything_moves(webui):
    """AUTOMATIC1111 has neither Flux.1 nor Z-Image: choosing such a transformer file stops at the check,
    naming the reason and where to train it; Forge passes the check (it loads Flux itself)."""
    import ldm
    from modules import sd_models, shared
    from trainer.hosts.base import ModelLoadError

    folder = webui.root / "models" / "Stable-diffusion"
    ldm.keys_file(folder / "flux-dev.safetensors", {"double_blocks.0.img_attn.norm.key_norm.scale": (128,)})
    ldm.keys_file(folder / "zimage.safetensors", {"context_refiner.0.attention.k_norm.weight": (128,)})
    sd_models.list_models()
    host = _host(webui)
    for name, title in (("flux-dev.safetensors", "Flux.1"), ("zimage.safetensors", "Z-Image")):
        if webui.flavour == "a1111":
            with pytest.raises(ModelLoadError, match=f"is a {title} model, and AUTOMATIC1111 has no {title} support"
                                                     ".*Forge.*standalone page"):
                host.check({"model": name, "vae": "None"})
        else:
            host.check({"model": name, "vae": "None"})
    host.check({"model": "base.safetensors", "vae": "None"})  # an SD checkpoint still passes
    assert _placement(shared.sd_model) == "cuda" and not _lock().locked()


@pytest.mark.slow
def test_merged_lora_makes_the_host_read_the_file(webui):
    from modules import shared

    host = _host(webui)
    sd_model = shared.sd_model
    if webui.flavour == "forge":
        sd_model.forge_objects.unet.lora_loader.backup = {"input_blocks.1.1.proj_in.weight": torch.zeros(1)}
    else:
        sd_model.get_submodule("model.diffusion_model.input_blocks.1.1.proj_in").network_current_names = (("style", 1.0, 1.0, None),)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert any("LoRA merged" in m for m in host.messages)
        assert torch.allclose(_unet_out(bundle.unet), _unet_out(webui.parts["base"]["unet"]), atol=1e-5)
    finally:
        host.restore()
    assert _placement(sd_model) == "cuda"


def test_a_lora_merged_by_a_patcher_on_an_a1111_style_model_is_seen(webui):
    """reForge keeps A1111's model but merges a prompt's LoRA through ldm_patched patchers, whose
    ``backup`` holds the original weights until the next unpatch: that model is not the user's."""
    from types import SimpleNamespace

    from modules import shared
    from trainer.hosts.webui import A1111Adapter

    if webui.flavour != "a1111":
        pytest.skip("the patcher check is the A1111-style adapter's")
    sd_model, adapter = shared.sd_model, A1111Adapter()
    clean = SimpleNamespace(unet=SimpleNamespace(backup={}), clip=SimpleNamespace(patcher=SimpleNamespace(backup={})))
    sd_model.forge_objects = clean
    assert not adapter.lora_merged(sd_model)
    for patched in (clean.unet, clean.clip.patcher):
        patched.backup["diffusion_model.out.2.weight"] = torch.zeros(1)
        assert adapter.lora_merged(sd_model)
        patched.backup.clear()


def test_inference_tensors_in_an_a1111_style_model_are_shared_as_ordinary_tensors(webui):
    """A patcher-based host (reForge) may put inference tensors into an A1111-style model (a LoRA
    patched in and out during a generation); training on the loaded model still works."""
    from modules import shared

    if webui.flavour != "a1111":
        pytest.skip("Forge's weights are all inference tensors: covered by the hand-over test")
    sd_model = shared.sd_model
    layer = sd_model.get_submodule("model.diffusion_model.input_blocks.1.1.proj_in")
    with torch.inference_mode():
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    assert layer.weight.is_inference()
    host = _host(webui)
    bundle = host.load(quick_config(lora_data_directory="x"))
    try:
        assert not any(p.is_inference() for p in bundle.unet.parameters())
        shared_weight = bundle.unet.get_submodule("down_blocks.0.attentions.0.proj_in").weight
        assert shared_weight.data_ptr() == layer.weight.data_ptr()  # no copy
        assert torch.allclose(_unet_out(bundle.unet), _unet_out(webui.parts["base"]["unet"]), atol=1e-5)
    finally:
        host.restore()


def test_nothing_loaded_yet_loads_through_the_host_or_says_what_to_do(webui):
    from modules import sd_models, shared
    from trainer.hosts.base import ModelLoadError

    if webui.flavour == "forge":
        sd_models.model_data.sd_model = sd_models.FakeInitialModel()
        sd_models.model_data.forge_hash = ""
    else:
        sd_models.model_data.sd_model = None
        sd_models.model_data.was_loaded_at_least_once = False
    host = _host(webui)
    host.load(quick_config(lora_data_directory="x"))  # the host's own lazy loading runs
    host.restore()
    assert sd_models.load_calls == [str(webui.base)] * 2 and shared.sd_model.sd_checkpoint_info.filename == str(webui.base)
    if webui.flavour == "forge":  # no checkpoint chosen in the host at all
        sd_models.model_data.sd_model = sd_models.FakeInitialModel()
        sd_models.model_data.forge_loading_parameters = {}
        with pytest.raises(ModelLoadError, match="has no model loaded; choose a checkpoint"):
            host.load(quick_config(lora_data_directory="x"))
        assert not _lock().locked()


def test_replaced_host_model_is_reloaded_on_restore(webui):
    from modules import sd_models, shared

    host = _host(webui)
    host.load(quick_config(lora_data_directory="x"))
    if webui.flavour == "forge":
        sd_models.model_data.sd_model = sd_models.FakeInitialModel()
    else:
        sd_models.model_data.sd_model = None
    host.restore()
    assert shared.sd_model.sd_checkpoint_info.filename == str(webui.base)
    assert sd_models.load_calls == [str(webui.base)] * 2 and not _lock().locked()


@pytest.mark.parametrize("webui", ["a1111"], indirect=True)  # the same lock object on both hosts
def test_waits_for_the_gpu_lock_held_by_a_generation(webui):
    host = _host(webui)
    lock = _lock()
    lock.acquire()
    loaded = threading.Event()
    worker = threading.Thread(target=lambda: (host.load(quick_config(lora_data_directory="x")), loaded.set()))
    worker.start()
    time.sleep(0.3)
    assert not loaded.is_set() and "Waiting for the web UI to finish its current job..." in host.messages
    lock.release()
    worker.join(30)
    assert loaded.is_set() and lock.locked()
    host.restore()
    assert not lock.locked()


@pytest.mark.slow
@pytest.mark.parametrize("webui", ["forge"], indirect=True)  # the same State API on both hosts
def test_host_interrupt_is_seen_without_progress_events(webui):
    from modules import shared

    host = _host(webui, poll_s=0.02)
    control = TrainControl()
    leave = host.follow(control)
    host.load(quick_config(lora_data_directory="x"))
    try:
        assert not control.stop_requested
        shared.state.interrupt()
        deadline = time.time() + 2.0
        while not control.stop_requested and time.time() < deadline:  # the watcher, with no step to ask it
            time.sleep(0.01)
        assert control.stop_requested
    finally:
        host.restore()
        leave()


# ----------------------------------------------------------------------------- whole runs

def _run(webui, tmp_path, host, *, on_step=None, **values):
    data = image_folder(tmp_path / "data", n=2)
    values.setdefault("host_check", False)  # the check in the host's txt2img: tests/test_webui_txt2img.py
    cfg = quick_config(lora_data_directory=str(data), train_iterations="3", train_batch_size="1", **values)
    seen = []
    control = TrainControl()

    def on_progress(event):
        if event.message:
            return
        from modules import shared

        seen.append((event.step, _lock().locked(), _placement(shared.sd_model), shared.state.sampling_step))
        if on_step is not None:
            on_step(event, control)

    control.listen(on_progress=on_progress)
    result = run_job(cfg, host=host, logs_dir=tmp_path / "logs", control=control)
    return result, seen


def _assert_host_back(webui, sd_model, before, refreshes):
    from modules import shared
    import networks

    assert shared.sd_model is sd_model and _placement(sd_model) == "cuda"
    assert all(torch.equal(v, before[k]) for k, v in _weights(sd_model).items())
    assert not _lock().locked() and shared.state.job == "" and shared.state.jobs_ended == 1
    assert networks.refresh_calls == refreshes + 1


@pytest.mark.slow
def test_run_saves_into_the_host_lora_folder(webui, tmp_path):
    from modules import shared
    import networks

    host = _host(webui)
    sd_model, before, refreshes = shared.sd_model, _weights(shared.sd_model), networks.refresh_calls
    result, seen = _run(webui, tmp_path, host, save_lora_name="web_lora")
    assert result.saved == [webui.lora_dir / "web_lora.safetensors"] and result.saved[0].is_file()
    assert [s[0] for s in seen] == [1, 2, 3]
    assert all(locked and where == "cpu" and shown == step for step, locked, where, shown in seen)
    assert "web_lora" in networks.available_networks
    _assert_host_back(webui, sd_model, before, refreshes)


@pytest.mark.slow
def test_error_inside_training_puts_everything_back(webui, tmp_path, monkeypatch):
    from modules import shared
    import networks
    from trainer.modes import lora

    def broken(self, step):
        raise RuntimeError("injected failure in the mode step")

    monkeypatch.setattr(lora.LoraTask, "compute_loss", broken)
    host = _host(webui)
    sd_model, before, refreshes = shared.sd_model, _weights(shared.sd_model), networks.refresh_calls
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(webui, tmp_path, host, save_lora_name="never")
    assert not (webui.lora_dir / "never.safetensors").exists()
    _assert_host_back(webui, sd_model, before, refreshes)


@pytest.mark.slow
@pytest.mark.parametrize("webui, how", [("a1111", "host interrupt"), ("forge", "host interrupt"),
                                         ("a1111", "our stop")], indirect=["webui"])
def test_stop_and_host_interrupt_end_the_run_after_the_step(webui, tmp_path, how):
    from modules import shared
    import networks

    def on_step(event, control):
        if event.step == 1:
            shared.state.interrupt() if how == "host interrupt" else control.stop()

    host = _host(webui)
    sd_model, before, refreshes = shared.sd_model, _weights(shared.sd_model), networks.refresh_calls
    result, seen = _run(webui, tmp_path, host, on_step=on_step, save_lora_name="halted")
    assert result.stopped and result.steps == 1 and [s[0] for s in seen] == [1]
    assert result.saved == [webui.lora_dir / "halted_1steps.safetensors"] and result.saved[0].is_file()
    _assert_host_back(webui, sd_model, before, refreshes)


@pytest.mark.slow
@pytest.mark.parametrize("webui", ["forge", "a1111"], indirect=True)
def test_nothing_of_a_run_stays_alive_after_it(webui, tmp_path, monkeypatch):
    """Run after run, host memory must not grow: once a run is over (finished, or failed), the
    trainer's copy of the model, the network and the optimizer are all collectable."""
    import gc
    import weakref

    import torch.optim
    from trainer.hosts import webui_session
    from trainer.network import network as network_module

    kept = []
    make_network = network_module.create_network
    original_load = webui_session.WebUIHost.load
    original_init = torch.optim.Optimizer.__init__

    def create_network(bundle, spec):
        net = make_network(bundle, spec)
        kept.append(weakref.ref(net))
        return net

    def load(self, config):
        bundle = original_load(self, config)
        kept.extend(weakref.ref(m) for m in (bundle, bundle.unet, bundle.vae, *bundle.text_encoders))
        kept.extend(weakref.ref(p) for p in bundle.unet.parameters())
        return bundle

    def optimizer_init(self, *args, **kwargs):
        kept.append(weakref.ref(self))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(network_module, "create_network", create_network)
    monkeypatch.setattr(webui_session.WebUIHost, "load", load)
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", optimizer_init)
    host = _host(webui)
    _run(webui, tmp_path / "one", host, save_lora_name="first")
    from trainer.modes import lora

    def broken(self, step):
        raise RuntimeError("injected failure in the mode step")

    monkeypatch.setattr(lora.LoraTask, "compute_loss", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(webui, tmp_path / "two", host, save_lora_name="second")
    gc.collect()
    alive = [type(ref()).__name__ for ref in kept if ref() is not None]
    assert len(kept) > 10 and alive == []


_RESIDENT_PROBE = """
import gc, torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
torch.set_num_threads(1)
host = [torch.randn(1280, 1280) for _ in range(60)]   # the host's weights (390 MB of 6.5 MB tensors)
before = rss()
for run in range(3):                                    # runs, each cloning the weights: the first run's
    clones, kept = [], []                               # frees raise glibc's mmap threshold, so later
    for weight in host:                                 # copies come from the heap
        clones.append(weight.clone())
        kept.append(torch.randn(64))                    # small things the host keeps meanwhile
    del clones
    gc.collect()
grown = rss() - before
from trainer.heap import return_freed_memory
trimmed = return_freed_memory()
print(grown, rss() - before, trimmed)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim exists on Linux only")
def test_freed_copies_of_the_weights_leave_resident_memory():
    """The trainer's copy of the host's weights, once freed, leaves the host's resident memory."""
    out = subprocess.run([sys.executable, "-c", _RESIDENT_PROBE], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown, after, trimmed = out.stdout.split()
    copy = 60 * 1280 * 1280 * 4
    assert trimmed == "True"
    assert int(grown) > copy // 2          # without the trim the freed copy stays resident
    assert int(after) < copy // 20          # with it, within 5% of the copy's size of where it started
