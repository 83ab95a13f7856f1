"""The few places where gradio 3.41 (AUTOMATIC1111), 4.x (Forge) and 5/6 (standalone) differ.

The UI itself uses only what all of them accept: ``gr.update``, Blocks/Row/Column/Tab/
Accordion/Group and plain components with common arguments, ``.click(fn, inputs, outputs)``.
What differs is kept here:

- page CSS: ``gr.Blocks(css=...)`` up to 5.x, ``launch(css=...)`` from 6.0 (web-UIs inject
  style.css themselves, so this matters only for the standalone page);
- queue concurrency: 3.x runs one event at a time unless ``queue(concurrency_count=n)``, which
  would make Stop wait for the training generator; 4.x+ gives every event its own limit.

Checked by running tests/test_ui.py and tests/test_browser.py on gradio 3.41.2, 4.44.1 and 6.31.
"""

from __future__ import annotations

import os

import gradio as gr

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


GRADIO_MAJOR = _major(getattr(gr, "__version__", "0"))


def blocks(css: str | None = None, title: str = "TrainTrain") -> gr.Blocks:
    """A Blocks container; ``css`` is attached here where gradio takes it in the constructor."""
    kwargs = {"analytics_enabled": False, "title": title}
    if css and GRADIO_MAJOR < 6:
        kwargs["css"] = css
    return gr.Blocks(**kwargs)


def enable_queue(demo: gr.Blocks) -> gr.Blocks:
    """Turn on the event queue (needed for generators) so that Stop can run beside Start."""
    if GRADIO_MAJOR < 4:
        return demo.queue(concurrency_count=4)
    return demo.queue()


def launch(demo: gr.Blocks, *, css: str | None = None, **kwargs) -> object:
    """``demo.launch(**kwargs)``, passing ``css`` where gradio 6 expects it."""
    if css and GRADIO_MAJOR >= 6:
        kwargs["css"] = css
    return demo.launch(**kwargs)

