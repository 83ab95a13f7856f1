"""End to end in a real, running AUTOMATIC1111 or Forge with TrainTrain installed as an extension.

Set ``TRAINTRAIN_HOST_URL`` (e.g. ``http://127.0.0.1:7860``) to a host started with ``--api`` and a
checkpoint loaded; without it every test here is skipped (CI has no host). Optional:
``TRAINTRAIN_HOST_LOG``, the file the host's console goes to (Forge's LoRA loader reports
"skipped N keys" there); ``TRAINTRAIN_HOST_PID``, the host's process id (its resident memory
is then compared before and after the runs); ``TRAINTRAIN_HOST_SETTINGS``, a JSON object of
settings for every run (e.g. ``{"train_model_precision": "bf16"}`` for SDXL on a small machine).
The host runs on this machine: the test writes its training images into a temporary folder the
host reads.

The tab is driven through its ``api_name`` endpoints with gradio_client (use a Python whose
gradio_client matches the host's gradio: 0.5.x for gradio 3.41, 1.x for gradio 4, e.g. the
host's own venv with pytest added), and the host through its REST API (``/sdapi/v1/...``).
Every run trains on the loaded model (Model "(the loaded model)"), a few steps at 64 px.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

URL = os.environ.get("TRAINTRAIN_HOST_URL", "").rstrip("/")
HOST_LOG = os.environ.get("TRAINTRAIN_HOST_LOG", "")
HOST_PID = os.environ.get("TRAINTRAIN_HOST_PID", "")
HOST_SETTINGS = json.loads(os.environ.get("TRAINTRAIN_HOST_SETTINGS", "") or "{}")

pytestmark = pytest.mark.skipif(not URL, reason="TRAINTRAIN_HOST_URL is not set: no running web UI to test against")

PROMPT = "a photo of a cat"
RUN_ID = uuid.uuid4().hex[:6]


# ----------------------------------------------------------------------------- host access

def rest(path: str, payload: dict | None = None, timeout: float = 1800) -> object:
    """GET (no payload) or POST a JSON payload to the host's REST API; the decoded answer."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body = answer.read()
    return json.loads(body) if body else None


def txt2img(prompt: str = PROMPT, seed: int = 1234):
    """One small image through the host's own txt2img, as pixels (numpy array)."""
    import numpy as np
    from PIL import Image

    out = rest("/sdapi/v1/txt2img", {"prompt": prompt, "negative_prompt": "", "seed": seed, "steps": 3,
                                     "width": 64, "height": 64, "cfg_scale": 5, "sampler_name": "Euler",
                                     "batch_size": 1, "n_iter": 1})
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB"), dtype=np.int16)


def loras() -> dict[str, Path]:
    """name -> file of the LoRAs the host lists now (without asking it to rescan)."""
    return {item["name"]: Path(item["path"]) for item in rest("/sdapi/v1/loras")}


def log_size() -> int:
    return Path(HOST_LOG).stat().st_size if HOST_LOG else 0


def log_since(offset: int) -> str:
    if not HOST_LOG:
        return ""
    with open(HOST_LOG, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", "replace")


def resident_bytes() -> int | None:
    if not HOST_PID:
        return None
    pages = int(Path(f"/proc/{HOST_PID}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client

    return Client(URL, verbose=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from helpers import image_folder

    return image_folder(tmp_path_factory.mktemp("live_host_images"), n=2)


@pytest.fixture(scope="module")
def baseline():
    """The same-seed image before any run (the host's model exactly as the user had it)."""
    return txt2img()


def form(**settings) -> list:
    """The tab's Start inputs (resume box + every form field, in the tab's order) for ``settings``."""
    from helpers import quick_config
    from trainer.ui.form import FIELD_NAMES, LOADED_MODEL, values_from_config

    config = quick_config(model="", **{**HOST_SETTINGS, **settings})
    values = values_from_config(config, keep_model=(LOADED_MODEL, ""))
    return [values.get(name) for name in FIELD_NAMES]


def start(client, **settings) -> tuple[str, str]:
    """Press Start Training with ``settings`` and wait for the run to end; (progress, message)
    (the tab's other outputs, such as the preview gallery, are left out)."""
    return tuple(client.predict(False, *form(**settings), api_name="/traintrain_start"))[:2]


def start_in_background(client, settings: dict, min_step: int = 0):
    """Press Start Training and return once the host shows the run (at ``min_step`` or later); the job."""
    job = client.submit(False, *form(**settings), api_name="/traintrain_start")
    deadline = time.time() + 1800
    while time.time() < deadline:
        state = rest("/sdapi/v1/progress?skip_current_image=true")["state"]
        if state.get("job") == "TrainTrain" and int(state.get("sampling_step") or 0) >= min_step:
            break
        time.sleep(0.5)
    return job


def lora_settings(data_dir: Path, name: str, **more) -> dict:
    base = {"mode": "LoRA", "lora_data_directory": str(data_dir), "save_lora_name": name,
            "train_iterations": "2", "train_batch_size": "1", "network_rank": "2", "network_alpha": "2",
            "host_check": False}
    base.update(more)
    return base


def ileco_settings(name: str) -> dict:
    return {"mode": "iLECO", "original_prompt": "cat", "target_prompt": "dog", "save_lora_name": name,
            "train_iterations": "2", "train_batch_size": "1", "network_rank": "2", "network_alpha": "2",
            "host_check": False}


def assert_host_unchanged(baseline) -> None:
    import numpy as np

    again = txt2img()
    assert np.array_equal(again, baseline), "the same-seed image changed: the host's model is not as it was"


# ----------------------------------------------------------------------------- tests

def test_tab_and_endpoints_are_there(client):
    config = rest("/config")
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert "tab_traintrain_tab" in ids or "traintrain_tab" in ids
    api = json.dumps(client.view_api(return_format="dict", print_info=False))
    for name in ("/traintrain_start", "/traintrain_stop", "/traintrain_add_queue", "/traintrain_run_queue"):
        assert name in api


def test_lora_run_on_the_loaded_model_loads_in_the_host(client, data_dir, baseline):
    import numpy as np

    name = f"live_lora_{RUN_ID}"
    memory_before = resident_bytes()
    run_log = log_size()
    progress, message = start(client, **lora_settings(data_dir, name, train_learning_rate="1e-2"))
    assert "Error" not in message and name in message, (progress, message)
    said = log_since(run_log)  # the after-save load check runs on the host's own diffusers
    assert "could not run" not in said and "WARNING" not in said, said
    listed = loras()
    assert name in listed and listed[name].is_file()          # saved into the LoRA folder, list refreshed
    assert_host_unchanged(baseline)
    if memory_before is not None:  # measured before a LoRA generation (the host then keeps a weight backup)
        assert resident_bytes() < memory_before * 1.05, "the host kept the run's memory"
    offset = log_size()
    with_lora = txt2img(f"{PROMPT} <lora:{name}:1>")
    assert not np.array_equal(with_lora, baseline), "the LoRA changed nothing in the host's txt2img"
    report = log_since(offset)
    if HOST_LOG:
        skipped = re.findall(r"\[LORA\] Loaded .*?" + re.escape(name) + r".*?skipped (\d+) keys", report)
        if skipped:  # Forge reports every load; A1111 logs nothing for a match
            assert all(int(n) == 0 for n in skipped), report
        assert "couldn't find" not in report.lower() and "not found" not in report.lower(), report


def test_host_check_renders_the_saved_file_in_the_hosts_txt2img(client, data_dir, baseline):
    """host_check: after the save, the tab renders the file through the host's own txt2img and
    reports what the host's LoRA loader matched (after the memory check above: the host keeps a
    weight backup once it has applied a LoRA)."""
    name = f"live_check_{RUN_ID}"
    progress, message = start(client, **lora_settings(data_dir, name, host_check=True, preview_prompts=PROMPT,
                                                      preview_size="64"))
    assert "Error" not in message and name in message, (progress, message)
    assert re.search(r"loaded in \S+: \d+ modules, 0 keys skipped", message), message
    assert "WARNING" not in message, message
    assert_host_unchanged(baseline)


def test_ileco_run_on_the_loaded_model(client, baseline):
    name = f"live_ileco_{RUN_ID}"
    progress, message = start(client, **ileco_settings(name))
    assert "Error" not in message and name in message, (progress, message)
    assert name in loras()
    assert_host_unchanged(baseline)


def test_interrupt_saves_what_was_learned(client, data_dir, baseline):
    name = f"live_stop_{RUN_ID}"
    job = start_in_background(client, lora_settings(data_dir, name, train_iterations="40"), min_step=1)
    rest("/sdapi/v1/interrupt", {})
    progress, message = job.result(timeout=1800)[:2]
    assert "Stopped" in message, (progress, message)
    folder = next(iter(loras().values())).parent
    steps_files = sorted(folder.glob(f"{name}_*steps.safetensors"))
    assert steps_files, f"no {name}_<k>steps file in {folder}: {message}"
    assert_host_unchanged(baseline)


def test_failing_run_leaves_the_host_intact(client, tmp_path, baseline):
    empty = tmp_path / "no_images"
    empty.mkdir()
    progress, message = start(client, **lora_settings(empty, f"live_fail_{RUN_ID}"))
    assert "Error" in message and str(empty) in message, (progress, message)
    assert_host_unchanged(baseline)


def test_queue_of_two(client, data_dir, baseline):
    names = [f"live_queue_a_{RUN_ID}", f"live_queue_b_{RUN_ID}"]
    for name in names:
        client.predict(*form(**lora_settings(data_dir, name)), api_name="/traintrain_add_queue")
    progress, message, *_ = client.predict(api_name="/traintrain_run_queue")
    listed = loras()
    assert all(name in listed for name in names), (progress, message)
    assert_host_unchanged(baseline)


def test_generation_waits_for_a_run(client, data_dir, baseline):
    """A txt2img sent while a run holds the model is served after it, with the model as it was."""
    import numpy as np

    name = f"live_wait_{RUN_ID}"
    job = start_in_background(client, lora_settings(data_dir, name, train_iterations="6"))
    image = {}
    thread = threading.Thread(target=lambda: image.setdefault("pixels", txt2img()))
    thread.start()
    progress, message = job.result(timeout=1800)[:2]
    thread.join(timeout=1800)
    assert name in message, (progress, message)
    assert np.array_equal(image["pixels"], baseline)
