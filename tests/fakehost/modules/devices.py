"""Fake ``modules.devices``. ``device`` names a GPU the fake does not have: models only record it."""

import torch

cpu = torch.device("cpu")
device = torch.device("cuda")
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
torch_gc_calls = 0


def torch_gc():
    global torch_gc_calls
    torch_gc_calls += 1
