"""The mode registry: every mode declared once, checked when registered, and asked by the rest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.config import choices as C
from trainer.config import PARAMS, TrainConfig
from trainer.modes import Mode, all_modes, get_mode, register_mode

ROOT = Path(__file__).resolve().parent.parent


def test_every_reference_mode_is_registered_in_order():
    assert [m.name for m in all_modes()] == list(C.MODES)
    assert [m.letter for m in all_modes()] == [C.MODE_LETTERS[name] for name in C.MODES]
    with pytest.raises(KeyError, match="unknown mode 'Dreambooth'; one of LoRA, iLECO"):
        get_mode("Dreambooth")


@pytest.mark.parametrize("mode, message", [
    (Mode(name="LoRA", tasks="trainer.modes.lora", inputs="video"), "inputs 'video' is not one of"),
    (Mode(name="LoRA", tasks="trainer.modes.lora", inputs="images", passes=("main", "copy")),
     "the last pass must be 'main'"),
    (Mode(name="Dreambooth", tasks="trainer.modes.lora", inputs="images"), "not one of choices.MODES"),
    (Mode(name="LoRA", tasks="trainer.modes.lora", inputs="images"), "'LoRA' is already registered"),
])
def test_registering_checks_the_descriptor(mode, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        register_mode(mode)
    assert len(all_modes()) == len(C.MODES)


def test_facts_the_rest_of_the_trainer_asks():
    assert [m.name for m in all_modes() if m.has_second_pass] == ["Difference"]
    assert [m.name for m in all_modes() if m.text_encoder] == ["LoRA"]
    assert [m.name for m in all_modes() if m.takes_images] == ["Difference", "ADDifT"]
    assert [m.name for m in all_modes() if m.takes_prompts] == ["iLECO"]
    resume = next(p for p in PARAMS if p.name == "network_resume")
    assert [m.name for m in all_modes() if not m.reads(resume)] == ["iLECO"]
    shown_only = next(p for p in PARAMS if p.name == "network_train_text_encoder")
    assert get_mode("iLECO").shows(shown_only) and not get_mode("iLECO").reads(shown_only)


def test_run_problems_come_from_the_mode():
    problems = get_mode("Multi-ADDifT").run_problems(TrainConfig(mode="Multi-ADDifT"))
    assert [p.split(" ")[0] for p in problems] == ["lora_data_directory", "diff_target_name"]
    assert "Multi-ADDifT trains on the images of a folder" in problems[0]
    assert get_mode("ADDifT").run_problems(TrainConfig(mode="ADDifT", original_image="a.png")) == [
        "target image is not set; ADDifT learns the change from the original image to the target image, "
        "so give both image files"]


def test_no_mode_comparisons_outside_the_modes_package():
    """Mode facts are asked of the registry, not spelled as string comparisons elsewhere."""
    pattern = re.compile(r"(?<!image\.)\bmode\s*(==|!=)|\bmode\s+(not\s+)?in\s*\(")
    found = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "trainer").rglob("*.py")
             if "modes" not in path.relative_to(ROOT / "trainer").parts[:1]
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []
