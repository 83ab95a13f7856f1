"""Fake ``modules`` package of a web UI (AUTOMATIC1111 or Forge, by ``FAKEHOST_FLAVOUR``)."""

import os

FLAVOUR = os.environ.get("FAKEHOST_FLAVOUR", "a1111")
if FLAVOUR not in ("a1111", "forge"):
    raise ImportError(f"FAKEHOST_FLAVOUR must be 'a1111' or 'forge', not {FLAVOUR!r}")
