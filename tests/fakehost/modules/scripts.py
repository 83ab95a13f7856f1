"""Fake ``modules.scripts``: ``basedir()`` is the folder of the script being loaded."""

from modules import paths

current_basedir = paths.script_path


def basedir():
    return current_basedir
