"""The trainable network (LoRA "lierla", LoCon "c3lier", LoHa) in kohya format.

- ``layers``: the module kinds and how they wrap a base layer's forward.
- ``network``: which layers get modules (type, element and block filters), the ``Network``.
- ``io``: kohya state dict, safetensors save/load with hashes, atomic writes.
- ``metadata``: the ``ss_*`` / ``modelspec.*`` header.
- ``resume``: a network started from an existing file.

Heavy libraries load only when these submodules are imported.
"""

from trainer.network.io import load_network_weights, network_state_dict, read_network_file, save_network
from trainer.network.metadata import build_metadata
from trainer.network.network import Network, NetworkSpec, create_network
from trainer.network.resume import resume_network

__all__ = [
    "Network", "NetworkSpec", "build_metadata", "create_network", "load_network_weights", "network_state_dict",
    "read_network_file", "resume_network", "save_network",
]
