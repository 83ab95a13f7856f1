"""Fake ``modules.paths``: the web-UI root and its models folder."""

import os

script_path = os.environ.get("FAKEHOST_ROOT", os.getcwd())
data_path = script_path
models_path = os.path.join(data_path, "models")
