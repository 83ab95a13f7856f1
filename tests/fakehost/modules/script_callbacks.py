"""Fake ``modules.script_callbacks`` (imports nothing heavy, like registering a tab must not)."""

from collections import namedtuple

from modules import FLAVOUR

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {"callbacks_ui_tabs": [], "callbacks_model_loaded": []}


def add_callback(callbacks, fun, *, name=None):
    callbacks.append(ScriptCallback("extension", fun, name))


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c.callback() or []
    return res


def model_loaded_callback(sd_model):
    for c in callback_map["callbacks_model_loaded"]:
        c.callback(sd_model)


if FLAVOUR == "forge":  # Forge and A1111 >= 1.9 take a keyword-only name
    def on_ui_tabs(callback, *, name=None):
        add_callback(callback_map["callbacks_ui_tabs"], callback, name=name)

    def on_model_loaded(callback, *, name=None):
        add_callback(callback_map["callbacks_model_loaded"], callback, name=name)
else:  # A1111 1.8
    def on_ui_tabs(callback):
        add_callback(callback_map["callbacks_ui_tabs"], callback)

    def on_model_loaded(callback):
        add_callback(callback_map["callbacks_model_loaded"], callback)
