"""Data layer: discovery, captions, bucket frames, sample plans, masks, batching, pairs."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.cli import main as cli_main
from trainer.data import (
    BucketBatcher, DataError, DataWarning, difference_mask, discover_images, find_pairs, fit_to_bucket,
    group_by_bucket, iter_loaded, make_buckets, nearest_bucket, nearest_sub_buckets, parse_image_size,
    plan_pair_samples, plan_samples, probe_image, tag_frequency,
)

# ---------------------------------------------------------------- helpers


def rgb(path: Path, w: int, h: int, color=(200, 100, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)
    return path


def gradient(w: int, h: int) -> Image.Image:
    """An RGB image whose left and right halves differ, so flips and crops are visible."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    arr = np.stack([x, y, 255 - x], axis=2).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def rgba_half_clear(path: Path, w: int, h: int) -> Path:
    """RGBA: left half fully transparent, then columns of alpha 20 and 30, the rest opaque."""
    arr = np.zeros((h, w, 4), np.uint8)
    arr[:, :, 0] = 255
    arr[:, :, 3] = 255
    arr[:, : w // 2, 3] = 0
    arr[:, w // 2, 3] = 20  # 20/255 < 0.1: masked out
    arr[:, w // 2 + 1, 3] = 30  # 30/255 > 0.1: kept
    Image.fromarray(arr, "RGBA").save(path)
    return path


def truncated_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient(64, 64).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    rgb(root / "a.png", 64, 64)
    (root / "a.txt").write_text("  cat, sitting\n", encoding="utf-8")
    rgb(root / "b.jpg", 64, 96)
    (root / "b.caption").write_text("dog\n", encoding="utf-8")
    rgba_half_clear(root / "c.PNG", 64, 64)
    (root / "c.txt").write_text("from txt", encoding="utf-8")
    (root / "c.caption").write_text("from caption", encoding="utf-8")
    (root / "sub").mkdir()
    Image.new("L", (64, 64), 128).save(root / "sub" / "d.png")
    rgb(root / ".hidden.png", 64, 64)
    rgb(root / ".cache" / "e.png", 64, 64)
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    (root / "xpng").write_bytes(b"no extension")
    return root


# ---------------------------------------------------------------- discovery and captions


def test_discovery_finds_images_case_insensitively_and_skips_hidden(folder):
    items = discover_images(folder)
    assert [i.path.name for i in items] == ["a.png", "b.jpg", "c.PNG", "d.png"]
    assert items[3].path == folder / "sub" / "d.png"


def test_captions_txt_wins_caption_stripped_and_no_leading_comma(folder):
    by_name = {i.path.name: i for i in discover_images(folder)}
    assert by_name["a.png"].prompt == "cat, sitting"
    assert by_name["a.png"].tags == ("cat", "sitting")
    assert by_name["b.jpg"].prompt == "dog"
    assert by_name["c.PNG"].prompt == "from txt"
    assert by_name["c.PNG"].caption_file == folder / "c.txt"
    assert by_name["d.png"].prompt == ""
    assert by_name["d.png"].tags == ()


def test_trigger_word_joins_with_comma_space_and_stands_alone(folder):
    by_name = {i.path.name: i for i in discover_images(folder, trigger_word="sks")}
    assert by_name["a.png"].prompt == "sks, cat, sitting"
    assert by_name["d.png"].prompt == "sks"
    items = list(by_name.values())
    expected = {"sks": 4, "cat": 1, "sitting": 1, "dog": 1, "from txt": 1}
    # per dataset folder, as sd-scripts writes it; an image planned twice still counts once
    assert tag_frequency(items + items[:1], folder) == {folder.name: expected}


def test_filename_as_tag_cuts_at_id_and_splits_underscores(tmp_path):
    rgb(tmp_path / "blue_hair_smile_id_3.png", 32, 32)
    (tmp_path / "blue_hair_smile_id_3.txt").write_text("ignored", encoding="utf-8")
    [item] = discover_images(tmp_path, trigger_word="sks", use_filename_as_tag=True)
    assert item.prompt == "sks, blue,hair,smile"
    assert item.tags == ("sks", "blue", "hair", "smile")


def test_caption_that_is_not_utf8_is_named(tmp_path):
    rgb(tmp_path / "a.png", 32, 32)
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(DataError, match=r"a\.txt is not UTF-8"):
        discover_images(tmp_path)


def test_missing_folder_file_and_empty_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_images(tmp_path / "nope")
    f = rgb(tmp_path / "one.png", 8, 8)
    with pytest.raises(DataError, match="is a file, not a folder"):
        discover_images(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found in .*empty; supported: jpg, jpeg, png"):
        discover_images(empty)


def test_corrupt_images_warn_by_name_and_all_corrupt_is_an_error(tmp_path):
    good = tmp_path / "good"
    rgb(good / "ok.png", 64, 64)
    truncated_png(good / "broken.png")
    (good / "text.jpg").write_text("this is not a jpeg")
    items = discover_images(good)
    assert len(items) == 3
    with pytest.warns(DataWarning) as record:
        specs = plan_samples(items, "64", 32, 32, 2.0)
    messages = " ".join(str(w.message) for w in record)
    assert "broken.png" in messages and "text.jpg" in messages
    assert {s.item.path.name for s in specs} == {"ok.png"}

    bad = tmp_path / "bad"
    truncated_png(bad / "broken.png")
    (bad / "text.jpg").write_text("this is not a jpeg")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="none of the 2 images could be read"):
        plan_samples(discover_images(bad), "64", 32, 32, 2.0)


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 80 wide, shown 80 tall
    gradient(80, 40).save(tmp_path / "r.jpg", exif=exif)
    info = probe_image(tmp_path / "r.jpg")
    assert (info.width, info.height) == (40, 80)
    [spec] = plan_samples(discover_images(tmp_path), "64,32", 32, 32, 2.0)
    assert spec.original_size == (80, 40)
    pixels, _ = spec.load()
    assert pixels.shape == (3, 64, 32)


# ---------------------------------------------------------------- bucket frames


def test_worked_example_step_128_min_256():
    main, sub = make_buckets("768,512", 128, 256, 2)
    assert main == [(384, 768), (512, 768), (512, 640), (512, 512), (640, 512), (768, 512), (768, 384)]
    assert sub == [(256, 512), (384, 640), (256, 384), (384, 512), (384, 384), (256, 256), (512, 384),
                   (384, 256), (640, 384), (512, 256)]


def test_worked_example_step_128_default_min_length():
    assert make_buckets("768,512", 128, 512, 2) == (
        [(512, 768), (512, 640), (512, 512), (640, 512), (768, 512)], [])


def test_worked_example_three_buckets():
    assert make_buckets("768,512", 256, 512, 2) == ([(512, 768), (512, 512), (768, 512)], [])


def test_worked_example_default_size():
    assert make_buckets("512", 256, 512, 2) == ([(512, 512)], [])


def test_worked_example_1024():
    main, sub = make_buckets("1024", 256, 512, 2)
    assert main == [(512, 1024), (768, 1024), (1024, 1024), (1024, 768), (1024, 512)]
    assert sub == [(512, 768), (768, 768), (512, 512), (768, 512)]


def test_size_order_is_ignored_like_the_reference():
    assert make_buckets("512,768", 128, 256, 2) == make_buckets((768, 512), 128, 256, 2.0)


@pytest.mark.parametrize("step", [0, -128, "x", 1.5])
def test_bad_step_raises_instead_of_hanging(step):
    with pytest.raises(ValueError, match="image_buckets_step"):
        make_buckets("512", step, 256, 2)


@pytest.mark.parametrize("args, key", [((0, 2), "image_min_length"), ((256, 0.5), "image_max_ratio"),
                                       ((256, "two"), "image_max_ratio")])
def test_bad_min_length_or_ratio(args, key):
    with pytest.raises(ValueError, match=key):
        make_buckets("512", 128, *args)


def test_parse_image_size():
    assert parse_image_size("768,512") == (768, 512)
    assert parse_image_size(" 768 , 512 ") == (768, 512)
    assert parse_image_size("640") == (640, 640)
    assert parse_image_size(1024) == (1024, 1024)
    for bad in ("", "abc", "1,2,3", "0", "-5,512", "512x768", "12.5"):
        with pytest.raises(ValueError, match=r"image_size\(height, width\)"):
            parse_image_size(bad)


def test_buckets_command_prints_height_width(capsys):
    assert cli_main(["buckets", "--size", "768,512", "--step", "128", "--min-length", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:7] == ["(768, 384)", "(768, 512)", "(640, 512)", "(512, 512)", "(512, 640)", "(512, 768)",
                         "(384, 768)"]
    assert lines[7] == "# sub-image frames"
    assert lines[8:] == ["(512, 256)", "(640, 384)", "(384, 256)", "(512, 384)", "(384, 384)", "(256, 256)",
                         "(384, 512)", "(256, 384)", "(384, 640)", "(256, 512)"]


def test_buckets_command_bad_input(capsys):
    assert cli_main(["buckets", "--size", "768,512", "--step", "0"]) == 2
    err = capsys.readouterr().err
    assert "--step" in err and "0 is not valid" in err
    assert cli_main(["buckets", "--size", "big"]) == 2
    assert "--size" in capsys.readouterr().err


def test_nearest_bucket_and_crop_geometry():
    main, _ = make_buckets("768,512", 128, 256, 2)
    assert nearest_bucket(600, 800, main) == (512, 640)
    # Frame wider than the image: scale the width to 512, centre-crop the height.
    assert fit_to_bucket(600, 800, (512, 640)) == ((512, 682), (0, 21, 512, 661))
    # Frame narrower than the image: scale the height, centre-crop the width.
    assert fit_to_bucket(1000, 500, (768, 384)) == ((768, 384), (0, 0, 768, 384))
    assert fit_to_bucket(1000, 400, (768, 384)) == ((960, 384), (96, 0, 864, 384))


def test_sub_bucket_picks_for_manual_example():
    main, sub = make_buckets("768,512", 128, 256, 2)
    assert nearest_bucket(700, 900, main) == (512, 640)
    assert nearest_sub_buckets(700, 900, sub, 3) == [(384, 512), (256, 384), (384, 640)]
    assert len(nearest_sub_buckets(700, 900, sub, 50)) == len(sub)


# ---------------------------------------------------------------- sample plans


def test_one_image_three_subs_mirrored_makes_eight_samples(tmp_path):
    gradient(700, 900).save(tmp_path / "p.png")
    specs = plan_samples(discover_images(tmp_path), "768,512", 128, 256, 2, sub_image_num=3, mirroring=True)
    assert len(specs) == 8
    assert [s.bucket for s in specs] == [(512, 640)] * 2 + [(384, 512)] * 2 + [(256, 384)] * 2 + [(384, 640)] * 2
    assert [s.flip for s in specs] == [False, True] * 4
    assert [s.sub for s in specs] == [False] * 2 + [True] * 6
    assert [s.index for s in specs] == list(range(8))
    for spec in specs:
        pixels, mask = spec.load()
        assert pixels.shape == (3, spec.bucket[1], spec.bucket[0]) and pixels.dtype == np.float32
        assert mask is None
    assert set(group_by_bucket(specs)) == {(512, 640), (384, 512), (256, 384), (384, 640)}


def test_sample_geometry_for_600x800(tmp_path):
    gradient(600, 800).save(tmp_path / "g.png")
    [spec, mirrored] = plan_samples(discover_images(tmp_path), "768,512", 128, 256, 2, mirroring=True)
    assert spec.bucket == (512, 640)
    assert spec.resized_size == (512, 682)
    assert spec.crop_box == (0, 21, 512, 661)
    assert spec.original_size == (800, 600)
    assert spec.crop_top_left == (21, 0)
    assert mirrored.crop_top_left == (21, 0)
    pixels, _ = spec.load()
    expected = np.asarray(gradient(600, 800).resize((512, 682), Image.Resampling.BICUBIC).crop((0, 21, 512, 661)))
    np.testing.assert_allclose(pixels, expected.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_mirroring_flips_pixels_and_mask(tmp_path):
    rgba_half_clear(tmp_path / "m.png", 64, 64)
    plain, flipped = plan_samples(discover_images(tmp_path), "64", 32, 32, 2, mirroring=True)
    p1, m1 = plain.load()
    p2, m2 = flipped.load()
    np.testing.assert_array_equal(p2, p1[:, :, ::-1])
    np.testing.assert_array_equal(m2, m1[:, ::-1])
    assert m1[0, 0] == 0 and m2[0, 0] == 1


def test_alpha_mask_values_and_alpha_is_dropped(tmp_path):
    rgba_half_clear(tmp_path / "a.png", 64, 64)
    rgb(tmp_path / "b.png", 64, 64, color=(255, 0, 0))
    specs = plan_samples(discover_images(tmp_path), "64", 32, 32, 2)
    (pa, mask), (pb, mask_b) = specs[0].load(), specs[1].load()
    expected = np.ones((64, 64), np.float32)
    expected[:, :33] = 0  # transparent half and the alpha-20 column
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == np.float32 and pa.shape == (3, 64, 64)
    assert mask_b is None
    np.testing.assert_allclose(pb[:, 10, 10], [1.0, -1.0, -1.0])
    assert pb.min() >= -1 and pb.max() <= 1


def test_grayscale_becomes_rgb(tmp_path):
    Image.new("L", (32, 32), 51).save(tmp_path / "g.png")
    [spec] = plan_samples(discover_images(tmp_path), "32", 32, 32, 2)
    pixels, mask = spec.load()
    assert pixels.shape == (3, 32, 32) and mask is None
    np.testing.assert_allclose(pixels[:, 0, 0], [51 / 127.5 - 1] * 3, atol=1e-6)


def test_disable_upscale_skips_small_images_with_a_named_warning(tmp_path):
    rgb(tmp_path / "small.png", 300, 300)
    rgb(tmp_path / "big.png", 600, 600)
    items = discover_images(tmp_path)
    assert len(plan_samples(items, "512", 256, 512, 2)) == 2  # upscaling allowed
    with pytest.warns(DataWarning, match=r"small\.png \(300x300\).*image_disable_upscale"):
        specs = plan_samples(items, "512", 256, 512, 2, disable_upscale=True)
    assert [s.item.path.name for s in specs] == ["big.png"]
    with pytest.warns(DataWarning), pytest.raises(DataError, match="image_disable_upscale is on"):
        plan_samples(items[1:], "512", 256, 512, 2, disable_upscale=True)


def test_sub_image_num_without_sub_frames_warns(tmp_path):
    rgb(tmp_path / "a.png", 64, 64)
    with pytest.warns(DataWarning, match="no sub-image frames"):
        specs = plan_samples(discover_images(tmp_path), "512", 256, 512, 2, sub_image_num=2)
    assert len(specs) == 1
    with pytest.raises(ValueError, match="sub_image_num"):
        plan_samples(discover_images(tmp_path), "512", 256, 512, 2, sub_image_num=-1)


def test_iter_loaded_decodes_once_and_skips_files_broken_after_planning(tmp_path):
    gradient(64, 64).save(tmp_path / "a.png")
    gradient(64, 64).save(tmp_path / "b.png")
    specs = plan_samples(discover_images(tmp_path), "64", 32, 32, 2, mirroring=True)
    (tmp_path / "b.png").write_text("gone bad")
    skipped = []
    with pytest.warns(DataWarning, match=r"b\.png"):
        loaded = dict(iter_loaded(specs, on_skip=lambda i, e: skipped.append(i)))
    assert sorted(loaded) == [0, 1] and skipped == [2, 3]
    np.testing.assert_array_equal(loaded[1][0], specs[1].load()[0])


# ---------------------------------------------------------------- batching


def test_batcher_covers_every_sample_once_per_epoch():
    groups = {(512, 512): list(range(0, 7)), (512, 768): list(range(7, 12)), (768, 512): [12]}
    b = BucketBatcher(groups, batch_size=2, seed=3)
    assert b.batches_per_epoch == 4 + 3 + 1
    seen, batches = [], []
    for _ in range(b.batches_per_epoch):
        batch = next(b)
        batches.append(batch)
        seen += batch
        assert 1 <= len(batch) <= 2
        assert len({next(k for k, v in groups.items() if i in v) for i in batch}) == 1  # one bucket a batch
    assert b.epoch == 1 and b.position == 0
    counts = Counter(seen)
    assert set(counts) == set(range(13))
    assert counts[12] == 2  # the one-image bucket is repeated to fill its batch
    assert all(counts[i] == 1 for i in range(12))
    second = [next(b) for _ in range(b.batches_per_epoch)]
    assert second != batches and sorted(sum(second, [])) == sorted(seen)


def test_batcher_num_multiply_and_full_batches():
    b = BucketBatcher({"a": list(range(8))}, batch_size=4, num_multiply=3, seed=0)
    batches = [next(b) for _ in range(b.batches_per_epoch)]
    assert [len(x) for x in batches] == [4] * 6
    assert Counter(sum(batches, [])) == {i: 3 for i in range(8)}


def test_batcher_resumes_at_the_same_place():
    groups = {"a": list(range(10)), "b": list(range(10, 13)), "c": list(range(13, 30))}
    run = BucketBatcher(groups, batch_size=3, seed=42)
    for _ in range(17):
        next(run)
    state = run.state_dict()
    expected = [next(run) for _ in range(25)]
    resumed = BucketBatcher(groups, batch_size=3, seed=999)
    resumed.load_state_dict(state)
    assert resumed.epoch == state["epoch"]
    assert [next(resumed) for _ in range(25)] == expected
    with pytest.raises(ValueError, match="bucket_sizes"):
        BucketBatcher({"a": list(range(11))}, batch_size=3).load_state_dict(state)


def test_batcher_is_seeded_and_accepts_planned_samples(tmp_path):
    gradient(64, 64).save(tmp_path / "a.png")
    gradient(64, 32).save(tmp_path / "b.png")
    specs = plan_samples(discover_images(tmp_path), "64", 32, 32, 2, mirroring=True)
    b1 = BucketBatcher(group_by_bucket(specs), batch_size=2, seed=7)
    b2 = BucketBatcher(group_by_bucket(specs), batch_size=2, seed=7)
    out1, out2 = [next(b1) for _ in range(6)], [next(b2) for _ in range(6)]
    assert out1 == out2
    for batch in out1:
        assert len({specs[i].bucket for i in batch}) == 1
    with pytest.raises(ValueError, match="train_batch_size"):
        BucketBatcher(group_by_bucket(specs), batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        BucketBatcher({"a": []}, batch_size=1)


# ---------------------------------------------------------------- pairs


@pytest.fixture
def pair_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pairs"
    root.mkdir()
    base = gradient(80, 96)
    base.save(root / "image1.png")
    changed = np.asarray(gradient(84, 100)).copy()
    changed[10:20, 10:20] = (0, 255, 0)
    Image.fromarray(changed).save(root / "image1_closed_eyes.png")
    (root / "image1.txt").write_text("open eyes", encoding="utf-8")
    (root / "image1_closed_eyes.txt").write_text("closed eyes", encoding="utf-8")
    rgb(root / "image2.jpg", 64, 64)
    rgb(root / "image2_closed_eyes.JPG", 64, 64)
    rgb(root / "image3_closed_eyes.png", 64, 64)  # target without an original
    rgb(root / "image4.png", 64, 64)  # original without a target
    rgb(root / "image5.png", 64, 64)
    rgb(root / "image5_closed_eyes.jpg", 64, 64)  # other extension: no pair
    rgb(root / "image1_closed_eyes_closed_eyes.png", 64, 64)  # a target is never an original
    rgb(root / "deep" / "image6.webp", 64, 64)
    rgb(root / "deep" / "image6_closed_eyes.webp", 64, 64)
    return root


def test_find_pairs_with_decoys(pair_folder):
    scan = find_pairs(pair_folder, "_closed_eyes")
    got = [(o.relative_to(pair_folder).as_posix(), t.relative_to(pair_folder).as_posix()) for o, t in scan.pairs]
    assert got == [("image1.png", "image1_closed_eyes.png"), ("image2.jpg", "image2_closed_eyes.JPG"),
                   ("deep/image6.webp", "deep/image6_closed_eyes.webp")]
    assert sorted(p.name for p in scan.unmatched) == [
        "image1_closed_eyes_closed_eyes.png", "image3_closed_eyes.png", "image4.png", "image5.png",
        "image5_closed_eyes.jpg"]


def test_find_pairs_errors(pair_folder, tmp_path):
    with pytest.raises(DataError, match="diff_target_name is empty"):
        find_pairs(pair_folder, "")
    with pytest.raises(DataError) as info:
        find_pairs(pair_folder, "_smile")
    message = str(info.value)
    assert "image1.png + image1_smile.png" in message
    assert "without a partner: image1.png, image1_closed_eyes.png" in message and "and 6 more" in message
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(tmp_path / "missing", "_x")


def test_pair_samples_share_geometry_and_keep_own_captions(pair_folder):
    scan = find_pairs(pair_folder, "_closed_eyes")
    specs = plan_pair_samples(scan.pairs[:1], "96,80", 16, 48, 2, sub_image_num=1, mirroring=True,
                              trigger_word="sks")
    assert len(specs) == 4
    first = specs[0]
    assert first.common_size == (80, 96) and first.original_size == (96, 80)
    assert first.orig.prompt == "sks, open eyes" and first.target.prompt == "sks, closed eyes"
    for spec in specs:
        orig, target, orig_mask, target_mask = spec.load()
        width, height = spec.bucket
        assert orig.shape == target.shape == (3, height, width)
        assert orig_mask is None and target_mask is None
        # Same crop and flip for both: they differ only around the painted square (rows and
        # columns 10..20 of 100 before resizing), on the mirrored side for flipped samples.
        rows, cols = np.nonzero(difference_mask(orig, target))
        assert len(rows) > 0 and rows.max() < 0.25 * height
        if spec.flip:
            assert cols.min() > 0.7 * width
        else:
            assert cols.max() < 0.3 * width


def test_pair_difference_mask_is_exact_without_resizing(tmp_path):
    orig = gradient(64, 64).convert("RGBA")
    orig.putalpha(Image.fromarray(np.pad(np.zeros((4, 4), np.uint8), ((0, 60), (0, 60)), constant_values=255)))
    orig.save(tmp_path / "x.png")
    target = np.asarray(gradient(64, 64)).copy()
    target[8:16, 40:56] = (0, 255, 0)
    Image.fromarray(target).save(tmp_path / "x_t.png")
    plain, mirrored = plan_pair_samples(find_pairs(tmp_path, "_t").pairs, "64", 32, 32, 2, mirroring=True)
    expected = np.zeros((64, 64), np.float32)
    expected[8:16, 40:56] = 1
    p_orig, p_target, _, _ = plain.load()
    m_orig, m_target, _, _ = mirrored.load()
    np.testing.assert_array_equal(difference_mask(p_orig, p_target), expected)
    np.testing.assert_array_equal(difference_mask(m_orig, m_target), expected[:, ::-1])
    np.testing.assert_array_equal(m_target, p_target[:, :, ::-1])
    _, _, orig_mask, target_mask = plain.load()
    assert target_mask is None
    assert orig_mask[:4, :4].sum() == 0 and orig_mask.sum() == 64 * 64 - 16


def test_pair_samples_with_unreadable_image_are_skipped(pair_folder):
    (pair_folder / "image2_closed_eyes.JPG").write_text("broken")
    scan = find_pairs(pair_folder, "_closed_eyes")
    with pytest.warns(DataWarning, match="image2_closed_eyes.JPG"):
        specs = plan_pair_samples(scan.pairs, "64", 32, 32, 2)
    assert [s.orig.path.name for s in specs] == ["image1.png", "image6.webp"]


def test_difference_mask_threshold():
    orig = np.zeros((3, 2, 2), np.float32) - 1
    target = orig.copy()
    target[0, 0, 0] += 10 / 127.5  # total 10: not above the threshold
    target[:, 1, 1] += 4 / 127.5  # total 12: above
    np.testing.assert_array_equal(difference_mask(orig, target), [[0, 0], [0, 1]])
    assert difference_mask(orig, target, threshold=11).sum() == 1
    with pytest.raises(ValueError, match="same shape"):
        difference_mask(orig, target[:, :1])


def test_no_warnings_on_a_clean_folder(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = plan_samples(discover_images(folder), "64", 32, 32, 2)
    assert len(specs) == 4


def test_a_16bit_png_is_scaled_to_8_bits_however_pillow_opens_it(tmp_path, monkeypatch):
    """Pillow 10+ opens a 16-bit grayscale PNG as I;16, Pillow 9 (AUTOMATIC1111 pins 9.5.0) as 32-bit I."""
    from trainer.data.images import open_image

    gray = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    expected = np.asarray(open_image(tmp_path / "g8.png"))
    assert np.array_equal(np.asarray(open_image(tmp_path / "g16.png")), expected)
    real_open = Image.open

    def like_pillow_9(path, *args, **kwargs):
        image = real_open(path, *args, **kwargs)
        if image.mode != "I;16":
            return image
        widened = image.convert("I")
        widened.format = image.format
        return widened

    monkeypatch.setattr(Image, "open", like_pillow_9)
    assert np.array_equal(np.asarray(open_image(tmp_path / "g16.png")), expected)
