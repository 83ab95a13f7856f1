"""Fake Forge ``backend.patcher``."""
