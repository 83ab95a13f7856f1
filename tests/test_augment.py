"""The Image tab's augmentation helper: the copies it writes, and what it refuses to write."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import pattern_image
from trainer.data.augment import AugmentOptions, augment_file, augment_folder, transform
from trainer.data.errors import DataError
from trainer.ui.actions import UiPaths
from trainer.ui.page import build_ui

import random


def _folder(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    pattern_image(folder / "a.png", 1, size=(48, 32))
    pattern_image(folder / "b.jpg", 2, size=(40, 40))
    (folder / "a.txt").write_text("a red thing", encoding="utf-8")
    return folder


def test_folder_copies_are_written_next_to_the_originals_with_their_captions(tmp_path):
    folder = _folder(tmp_path)
    before = {p: p.read_bytes() for p in folder.iterdir()}
    result = augment_folder(folder, AugmentOptions(count=3, seed=0))
    names = sorted(p.name for p in result.written)
    assert names == ["a_id_0.png", "a_id_1.png", "a_id_2.png", "b_id_0.jpg", "b_id_1.jpg", "b_id_2.jpg"]
    assert sorted(p.name for p in result.captions) == ["a_id_0.txt", "a_id_1.txt", "a_id_2.txt"]
    assert (folder / "a_id_1.txt").read_text(encoding="utf-8") == "a red thing"
    assert all(p.read_bytes() == data for p, data in before.items())  # originals untouched
    # rotation expands the canvas; the PNG keeps the transparent corners, the JPEG is flattened on white
    png = Image.open(folder / "a_id_0.png")
    assert png.mode == "RGBA" and np.asarray(png)[..., 3].min() == 0
    assert Image.open(folder / "b_id_0.jpg").mode == "RGB"


def test_a_second_run_refuses_and_replaces_nothing(tmp_path):
    folder = _folder(tmp_path)
    augment_folder(folder, AugmentOptions(count=2, seed=0))
    written = {p: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DataError, match=r"exist and are never replaced: .*a_id_0\.png"):
        augment_folder(folder, AugmentOptions(count=2, seed=1))
    assert {p: p.read_bytes() for p in folder.iterdir()} == written  # nothing new, nothing changed


def test_copies_go_into_a_chosen_folder_and_one_existing_name_stops_all(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_id_1.jpg").write_bytes(b"mine")
    with pytest.raises(DataError, match="b_id_1.jpg"):
        augment_folder(folder, AugmentOptions(count=2), out)
    assert sorted(p.name for p in out.iterdir()) == ["b_id_1.jpg"] and (out / "b_id_1.jpg").read_bytes() == b"mine"
    (out / "b_id_1.jpg").unlink()
    result = augment_folder(folder, AugmentOptions(count=2), out)
    assert {p.parent for p in result.written} == {out} and len(result.written) == 4


def test_mirror_and_shrink_without_rotation_keep_the_size_and_flip_every_other_copy(tmp_path):
    image = Image.open(pattern_image(tmp_path / "p.png", 3, size=(32, 24))).convert("RGBA")
    plain = AugmentOptions(change_angle=False, change_scale=False, mirror=True)
    rng = random.Random(0)
    assert np.array_equal(np.asarray(transform(image, plain, rng, 0)), np.asarray(image))
    assert np.array_equal(np.asarray(transform(image, plain, rng, 1)), np.asarray(image)[:, ::-1])
    pinned = AugmentOptions(change_angle=False, min_scale=0.5, fix_side="left")
    out = np.asarray(transform(image, pinned, rng, 0))
    assert out.shape == (24, 32, 4)
    assert out[:, 0, 3].max() == 255 and out[:, -1, 3].max() == 0  # on the left edge, empty on the right


def test_one_uploaded_file_is_copied_under_the_given_name_and_bad_options_are_named(tmp_path):
    source = pattern_image(tmp_path / "upload.png", 4)
    result = augment_file(source, AugmentOptions(count=2, seed=3), tmp_path / "dest", name="cat")
    assert [p.name for p in result.written] == ["cat_id_0.png", "cat_id_1.png"]
    with pytest.raises(DataError, match="minimum downscale ratio.*number of images|number of images"):
        augment_file(source, AugmentOptions(count=0, min_scale=0), tmp_path / "dest")
    with pytest.raises(DataError, match="nothing to change"):
        augment_file(source, AugmentOptions(change_angle=False, change_scale=False), tmp_path / "dest")


def test_the_image_tab_is_on_the_page_and_its_buttons_answer(tmp_path):
    from helpers import TinyHost

    folder = _folder(tmp_path)
    demo = build_ui(TinyHost("sd1", tmp_path / "out"), standalone=False, paths=UiPaths.under(tmp_path))
    w = demo.traintrain_widgets
    assert w["aug_dir"].elem_id == "traintrain_aug_dir"
    ui = demo.traintrain
    options = (2, True, 30, True, 0.5, "none", True)
    assert ui.augment_folder(str(folder), "", *options).startswith("Wrote 4 image(s) and 2 caption file(s)")
    assert ui.augment_folder(str(folder), "", *options).startswith("Error: not written")
    assert ui.augment_folder(str(tmp_path / "nope"), "", *options).startswith("Error:")
    assert "Output directory" in ui.augment_file(str(folder / "a.png"), "", "", *options)
    assert ui.augment_file(str(folder / "a.png"), str(tmp_path / "o"), "x", *options).startswith("Wrote 2 image(s)")
