"""Fake ``launch`` of a web UI: the two helpers an extension's install.py may use.

Same signatures and behaviour as AUTOMATIC1111's ``launch_utils`` (which Forge keeps):
``is_installed(package)`` looks for a distribution, then an importable module;
``run_pip(command, desc=None, live=False)`` runs ``python -m pip <command> --prefer-binary``
through the shell and raises RuntimeError with pip's output when it fails.
"""

import importlib.metadata
import importlib.util
import subprocess
import sys

pip_commands = []


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=False):
    pip_commands.append(command)
    print(f"Installing {desc}")
    result = subprocess.run(f'"{sys.executable}" -m pip {command} --prefer-binary', shell=True,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Couldn't install {desc}.\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result.stdout
