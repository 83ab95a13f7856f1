"""The standalone page in a real browser (Debian's chromium through Playwright).

Serves the page in-process on 127.0.0.1 with a host that hands out tiny models, then: switches
modes, loads a preset (the model choice must survive), saves one, queues two runs, trains
them, sees both done, and draws the loss chart of their CSV log. Screenshots go to
test-artifacts/browser/.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import TinyHost, image_folder, pattern_image, quick_config

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"

if not CHROMIUM.exists():
    pytest.skip(f"browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser test needs playwright (pip install playwright)")


class PageHost(TinyHost):
    """Tiny models with a model list; each step takes a moment so progress is visible."""

    def list_models(self):
        return ["tiny-sd1"]

    def list_vaes(self):
        return []

    def follow(self, control):
        """Joins each run (Host.follow) to slow its steps a little."""
        return control.listen(on_progress=lambda event: time.sleep(0.5))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    from trainer.ui import compat as ui_compat
    from trainer.ui.page import UiPaths, build_ui, page_css

    from trainer.training.queue import JobQueue

    paths = UiPaths.under(tmp_path)
    data = image_folder(tmp_path / "data", n=2)
    quick_config(lora_data_directory=str(data), train_iterations="3", train_batch_size="1",
                 logging_save_csv=True, save_lora_name="quick").to_json(paths.presets / "quick.json")
    demo = build_ui(PageHost("sd1", tmp_path / "out"), standalone=True, paths=paths, output_dir=tmp_path / "out",
                    poll_s=0.2)
    # Queued after the page was built (e.g. by `queue add`): a freshly loaded page must show it.
    JobQueue(paths.queue_file).add(quick_config(lora_data_directory=str(data), save_lora_name="preloaded"))
    ui_compat.enable_queue(demo)
    port = _free_port()
    ui_compat.launch(demo, css=page_css(), server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                     quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", paths, tmp_path
    finally:
        demo.close()


def _text(page, elem: str) -> str:
    return page.input_value(f"#{elem} textarea")


def _fill(page, elem: str, value: str) -> None:
    page.fill(f"#{elem} textarea", value)


def _wait_text(page, elem: str, needle: str, timeout_s: float = 30) -> str:
    page.wait_for_function(
        "([sel, needle]) => (document.querySelector(sel)?.value || '').includes(needle)",
        arg=[f"#{elem} textarea", needle], timeout=timeout_s * 1000)
    return _text(page, elem)


def _tab(page, name: str) -> None:
    """Open one of the page's tabs (gradio 4+ marks them role=tab, 3.x uses plain buttons)."""
    tab = page.get_by_role("tab", name=name)
    if tab.count():
        tab.first.click()
    else:
        page.click(f"#traintrain_tabs button:text-is('{name}')")


def _choose(page, elem: str, option: str) -> None:
    page.click(f"#{elem} input")
    page.click(f"#{elem} li:has-text('{option}')")


@pytest.mark.slow
@pytest.mark.xdist_group("browser")  # one chromium at a time; they share the screenshot folder
def test_train_queue_and_plot_in_the_browser(served):
    url, paths, tmp_path = served
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(20_000)
        page.goto(url, wait_until="networkidle")
        page.wait_for_selector("#traintrain_mode")
        assert page.input_value("#traintrain_model input") == "tiny-sd1"

        # The queue file's items show at load, without pressing Reload Queue.
        _tab(page, "Queue")
        page.wait_for_function("() => (document.querySelector('#traintrain_queue_table')?.innerText || '')"
                               ".includes('preloaded')")
        _choose(page, "traintrain_queue_item", "1: preloaded (pending)")
        page.click("#traintrain_delete_item")
        _wait_text(page, "traintrain_queue_message", "Deleted: item 1 ('preloaded')")
        _tab(page, "Train")

        # Mode switch: iLECO shows the prompts and hides the image-folder settings.
        assert page.is_visible("#traintrain_lora_data_directory")
        page.click("#traintrain_mode label:has-text('iLECO')")
        page.wait_for_selector("#traintrain_original_prompt", state="visible")
        assert not page.is_visible("#traintrain_lora_data_directory")
        page.screenshot(path=str(SHOTS / "1_ileco.png"))
        page.click("#traintrain_mode label:has-text('LoRA')")
        page.wait_for_selector("#traintrain_lora_data_directory", state="visible")

        # Load a preset (it holds no model): the settings arrive, the model choice stays.
        page.click("#traintrain_refresh_presets")
        _choose(page, "traintrain_preset", "quick")
        page.click("#traintrain_load_preset")
        _wait_text(page, "traintrain_message", "Loaded")
        assert _text(page, "traintrain_train_iterations") == "3"
        assert _text(page, "traintrain_lora_data_directory") == str(tmp_path / "data")
        assert page.input_value("#traintrain_model input") == "tiny-sd1"

        # Save a preset under a new name: it goes to the user presets, not beside the shipped ones;
        # saving it again asks for the box to be ticked.
        _fill(page, "traintrain_save_lora_name", "browser_a")
        page.click("#traintrain_save_preset")
        _wait_text(page, "traintrain_message", "Preset saved")
        saved = json.loads((paths.user_presets / "browser_a.json").read_text(encoding="utf-8"))
        assert (saved["save_lora_name"], saved["model"], saved["train_iterations"]) == ("browser_a", "tiny-sd1", "3")
        assert not (paths.presets / "browser_a.json").exists()
        page.click("#traintrain_save_preset")
        _wait_text(page, "traintrain_message", "Not saved: your preset 'browser_a' exists")
        page.check("#traintrain_preset_overwrite input")
        page.click("#traintrain_save_preset")
        _wait_text(page, "traintrain_message", "replaced your earlier preset")
        page.wait_for_function("() => !document.querySelector('#traintrain_preset_overwrite input').checked")

        # Queue two runs; the same name again is refused.
        page.click("#traintrain_add_queue")
        _wait_text(page, "traintrain_message", "Added to Queue: item 1")
        page.click("#traintrain_add_queue")
        _wait_text(page, "traintrain_message", "Duplicated LoRA name!")
        _fill(page, "traintrain_save_lora_name", "browser_b")
        page.click("#traintrain_add_queue")
        _wait_text(page, "traintrain_message", "Added to Queue: item 2")
        page.screenshot(path=str(SHOTS / "2_train_tab.png"))

        # Run the queue and watch the progress until both are done.
        _tab(page, "Queue")
        page.click("#traintrain_refresh_queue")
        page.wait_for_function("() => ['browser_a', 'browser_b', 'pending'].every(word => "
                               "(document.querySelector('#traintrain_queue_table')?.innerText || '').includes(word))")
        page.click("#traintrain_run_queue")
        progress_seen = set()
        deadline = time.time() + 60
        while time.time() < deadline:
            progress_seen.add(_text(page, "traintrain_queue_progress"))
            if _text(page, "traintrain_queue_message").count("Finished: saved") == 2:
                break
            page.wait_for_timeout(100)
        table = page.inner_text("#traintrain_queue_table")
        page.screenshot(path=str(SHOTS / "3_queue_done.png"), full_page=True)
        # (gradio 4 draws the table twice, one copy for measuring, so look for words, not counts)
        assert "done" in table and "pending" not in table and "running" not in table, table
        assert any("step 2/3" in line for line in progress_seen), progress_seen
        assert (tmp_path / "out" / "browser_a.safetensors").is_file()
        assert (tmp_path / "out" / "browser_b.safetensors").is_file()

        # Start shows live progress on the Train tab, and Stop ends the run and saves it.
        _tab(page, "Train")
        _fill(page, "traintrain_save_lora_name", "browser_stop")
        _fill(page, "traintrain_train_iterations", "500")
        page.click("#traintrain_start")
        _wait_text(page, "traintrain_progress", "step 2/500")
        page.click("#traintrain_stop")
        message = _wait_text(page, "traintrain_message", "Stopped at step")
        page.screenshot(path=str(SHOTS / "4_stopped.png"))
        assert "browser_stop_" in message and list((tmp_path / "out").glob("browser_stop_*steps.safetensors"))

        # Difference mode: uploaded images are kept as files that the queued settings point to.
        page.click("#traintrain_mode label:has-text('Difference')")
        page.wait_for_selector("#traintrain_original_image", state="visible")
        for elem, seed in (("traintrain_original_image", 1), ("traintrain_target_image", 2)):
            page.set_input_files(f"#{elem} input[type=file]", str(pattern_image(tmp_path / f"{seed}.png", seed)))
        page.wait_for_selector("#traintrain_target_image img", state="visible")
        _fill(page, "traintrain_save_lora_name", "browser_diff")
        page.click("#traintrain_add_queue")
        _wait_text(page, "traintrain_message", "Added to Queue: item 3 ('browser_diff', Difference)")
        page.screenshot(path=str(SHOTS / "5_difference.png"), full_page=True)
        item = json.loads(paths.queue_file.read_text(encoding="utf-8"))["items"][2]["config"]
        for key in ("original image", "target image"):
            kept = Path(item[key])
            assert kept.parent == paths.inputs and Image.open(kept).size == (64, 64)
        _tab(page, "Queue")
        page.click("#traintrain_refresh_queue")
        _choose(page, "traintrain_queue_item", "3: browser_diff (pending)")
        page.click("#traintrain_delete_item")
        _wait_text(page, "traintrain_queue_message", "Deleted: item 3 ('browser_diff')")

        # The Plot tab draws the newest CSV log.
        _tab(page, "Plot")
        page.click("#traintrain_refresh_logs")
        page.click("#traintrain_draw_plot")
        _wait_text(page, "traintrain_plot_message", "Showing")
        page.wait_for_selector("#traintrain_plot img", state="visible")
        assert "browser_stop" in _text(page, "traintrain_plot_message")
        page.screenshot(path=str(SHOTS / "6_plot.png"), full_page=True)

        # A page reloaded during a run shows the run at once (no "Show progress" needed).
        _tab(page, "Train")
        page.click("#traintrain_mode label:has-text('LoRA')")
        _fill(page, "traintrain_save_lora_name", "browser_live")
        _fill(page, "traintrain_train_iterations", "500")
        page.click("#traintrain_start")
        _wait_text(page, "traintrain_progress", "step 2/500")
        page.reload(wait_until="load")  # a live run keeps a stream open: the network never idles
        _wait_text(page, "traintrain_progress", "browser_live (LoRA) — main: step")
        assert _text(page, "traintrain_message").startswith("Training browser_live (LoRA), started")
        page.screenshot(path=str(SHOTS / "7_reloaded_during_run.png"))
        page.click("#traintrain_stop")
        message = _wait_text(page, "traintrain_message", "Stopped at step")
        assert "--resume" not in message and "tick 'resume the stopped run'" in message

        # "Run again" answers and says what comes next.
        _tab(page, "Queue")
        _choose(page, "traintrain_queue_item", "1: browser_a (done)")
        page.click("#traintrain_requeue_item")
        _wait_text(page, "traintrain_queue_message", "Pending again: item 1 ('browser_a'); press Run queue")
        browser.close()


@pytest.mark.slow
@pytest.mark.xdist_group("browser")
def test_the_preview_gallery_fills_during_a_run_and_the_image_tab_answers(served):
    url, paths, tmp_path = served
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(20_000)
        page.goto(url, wait_until="networkidle")
        page.wait_for_selector("#traintrain_mode")
        assert not page.is_visible("#traintrain_demo")  # a model is listed: no demo button

        page.click("#traintrain_refresh_presets")
        _choose(page, "traintrain_preset", "quick")
        page.click("#traintrain_load_preset")
        _wait_text(page, "traintrain_message", "Loaded")
        for elem, value in (("traintrain_save_lora_name", "browser_previews"), ("traintrain_train_iterations", "20"),
                            ("traintrain_preview_every_steps", "2"), ("traintrain_preview_size", "32"),
                            ("traintrain_preview_steps", "2")):
            _fill(page, elem, value)
        page.click("#traintrain_start")
        count = "() => document.querySelectorAll('#traintrain_previews img').length"
        page.wait_for_function(f"() => ({count})() >= 1", timeout=60_000)
        running = _text(page, "traintrain_progress")
        page.locator("#traintrain_previews").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "8_previews_during_run.png"))
        assert "(finished)" not in running  # the gallery filled while the run went on
        _wait_text(page, "traintrain_message", "Finished: saved", timeout_s=90)
        page.wait_for_function(f"() => ({count})() >= 10", timeout=20_000)
        page.screenshot(path=str(SHOTS / "9_previews_done.png"), full_page=True)
        folder = next(paths.logs.glob("*/browser_previews/previews"))
        assert sorted(f.name for f in folder.iterdir()) == sorted(f"step_{k}.png" for k in range(2, 21, 2))

        # The Image tab writes copies next to the images and refuses to write them twice.
        _tab(page, "Image")
        _fill(page, "traintrain_aug_dir", str(tmp_path / "data"))
        page.click("#traintrain_aug_from_dir")
        _wait_text(page, "traintrain_aug_message", "Wrote 10 image(s) and 10 caption file(s)")
        page.click("#traintrain_aug_from_dir")
        _wait_text(page, "traintrain_aug_message", "Error: not written")
        page.screenshot(path=str(SHOTS / "10_image_tab.png"))
        assert len(list((tmp_path / "data").glob("img*_id_*.png"))) == 10
        browser.close()
