"""Fake ``networks``: the built-in Lora extension's module (a top-level module in both hosts)."""

import os

from modules import shared

available_networks = {}
refresh_calls = 0


def list_available_networks():
    global refresh_calls
    refresh_calls += 1
    available_networks.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for file in files:
            stem, ext = os.path.splitext(file)
            if ext.lower() in (".pt", ".ckpt", ".safetensors"):
                available_networks[stem] = os.path.join(root, file)
