"""Every shipped preset trains from the CLI on a tiny model, end to end (settings shrunk to CPU size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import image_folder, pattern_image
from tiny import save_tiny_diffusers
from trainer.cli import main
from trainer.config import TrainConfig

PRESETS = sorted((Path(__file__).resolve().parent.parent / "presets").glob("*.json"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_diffusers(kind, root / kind) for kind in ("sd1", "sdxl")}


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_from_the_cli(preset, tmp_path, tiny_models, capsys):
    cfg = TrainConfig.from_json(preset)
    model = tiny_models["sdxl" if "XL" in preset.stem else "sd1"]
    sets = {
        "model": str(model), "train_iterations": "2", "train_batch_size": "2",
        "image_size(height, width)": "64", "image_min_length": "64", "image_buckets_step": "64",
        "train_model_precision": "fp32", "save_precision": "fp32", "train_VAE_precision": "fp32",
        "save_per_steps": "0", "logging_save_csv": "true",
    }
    if cfg.mode == "LoRA":
        sets["lora_data_directory"] = str(image_folder(tmp_path / "data", n=2))
    if cfg.mode == "iLECO":
        sets["original prompt"], sets["target prompt"] = "a photo of a cat", "a photo of a dog"
    if cfg.mode in ("Difference", "ADDifT"):
        sets["original image"] = str(pattern_image(tmp_path / "a.png", 1))
        sets["target image"] = str(pattern_image(tmp_path / "b.png", 2))
    if cfg.mode == "Multi-ADDifT":
        pairs = tmp_path / "pairs"
        pairs.mkdir()
        for i in range(2):
            pattern_image(pairs / f"p{i}.png", i)
            pattern_image(pairs / f"p{i}{cfg.diff_target_name or '_target'}.png", i + 5)
        sets["lora_data_directory"] = str(pairs)
        if not cfg.diff_target_name:
            sets["diff_target_name"] = "_target"
    source = preset
    if cfg.second_pass is not None:  # --set reaches the 1st pass; shrink the 2nd-pass panel in a copy
        raw = json.loads(preset.read_text(encoding="utf-8"))
        raw["2nd pass"].update({k: sets[k] for k in ("train_iterations", "train_batch_size",
                                                      "train_model_precision", "save_precision",
                                                      "train_VAE_precision", "save_per_steps")})
        source = tmp_path / preset.name
        source.write_text(json.dumps(raw, indent=4), encoding="utf-8")
    args = ["train", str(source), "--output-dir", str(tmp_path / "out"), "--logs-dir", str(tmp_path / "logs"),
            "--device", "cpu"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err[-1500:]
    name = cfg.save_lora_name or "untitled"
    saved = tmp_path / "out" / f"{name}.safetensors"
    assert saved.is_file(), out.out
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    assert meta["traintrain_mode"] == cfg.mode
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if "XL" in preset.stem else "sd_v1")
