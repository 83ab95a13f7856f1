"""Fake Forge ``modules_forge`` package; AUTOMATIC1111 has none."""

import os

if os.environ.get("FAKEHOST_FLAVOUR", "a1111") != "forge":
    raise ImportError("No module named 'modules_forge' (AUTOMATIC1111 has no Forge modules)")
