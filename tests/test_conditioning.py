"""Prompt encoding as the web-UIs do it, SDXL size/crop ids, and the v-prediction target."""

from __future__ import annotations

import pytest
import torch

from helpers import TinyHost, image_folder, quick_config
from trainer.conditioning import CHUNK, PromptEncoder, split_chunks


def test_split_chunks_at_75_and_back_to_last_comma():
    assert [len(c) for c in split_chunks(list(range(160)), None)] == [75, 75, 10]
    ids = [1] * 70 + [9] + [1] * 10          # comma (9) at position 70: within 20 of the end
    chunks = split_chunks(ids, 9)
    assert [len(c) for c in chunks] == [71, 10] and chunks[0][-1] == 9
    far = [1] * 40 + [9] + [1] * 50           # comma too far back: plain split
    assert [len(c) for c in split_chunks(far, 9)] == [75, 16]
    assert split_chunks([], 9) == [[]]


@pytest.mark.slow
def test_long_prompt_is_encoded_in_77_token_chunks():
    bundle = TinyHost("sd1").load(None)
    enc = PromptEncoder(bundle)
    long = ", ".join(f"word{i}" for i in range(60))  # well over 75 tokens
    cond = enc.encode(["short", long])
    assert cond.hidden.shape[1] % 77 == 0 and cond.hidden.shape[1] >= 2 * 77
    # the first chunk of the long prompt is encoded on its own, exactly as a 77-token prompt
    tok = bundle.tokenizers[0]
    ids = tok(long, add_special_tokens=False).input_ids
    first = split_chunks(ids, tok.convert_tokens_to_ids(",</w>"))[0]
    row = [tok.bos_token_id, *first, tok.eos_token_id]
    row += [tok.pad_token_id] * (CHUNK + 2 - len(row))
    with torch.no_grad():
        alone = bundle.text_encoders[0](torch.tensor([row])).last_hidden_state
    torch.testing.assert_close(cond.hidden[1:2, :77], alone)
    # the short prompt is padded with encoded empty chunks, as the hosts pad
    with torch.no_grad():
        empty = enc.encode([""]).hidden
    torch.testing.assert_close(cond.hidden[0:1, 77:154], empty)


def test_sdxl_uses_penultimate_layers_and_pooled_clip_g():
    bundle = TinyHost("sdxl").load(None)
    cond = PromptEncoder(bundle).encode(["a red apple"])
    assert cond.hidden.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    tok = bundle.tokenizers[1]
    ids = tok("a red apple", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = bundle.text_encoders[1](ids, output_hidden_states=True)
    torch.testing.assert_close(cond.hidden[..., 32:], out.hidden_states[-2])
    torch.testing.assert_close(cond.pooled, out.text_embeds)


@pytest.mark.slow
def test_sdxl_time_ids_carry_real_size_and_crop_of_a_non_square_bucket(tmp_path, monkeypatch):
    from trainer.modes import base as mode_base

    data = image_folder(tmp_path / "data", n=1, size=(96, 64))   # 96 wide, 64 high
    seen = []
    real = mode_base.unet_forward

    def spy(bundle, noisy, timesteps, cond, time_ids=None):
        seen.append((tuple(noisy.shape), time_ids.clone()))
        return real(bundle, noisy, timesteps, cond, time_ids)

    monkeypatch.setattr("trainer.modes.lora.unet_forward", spy)
    from trainer.training.job import run_job

    cfg = quick_config(lora_data_directory=str(data), train_iterations="1", train_batch_size="1",
                       image_buckets_step="16", image_min_length="32",
                       **{"image_size(height, width)": "64,80"})
    run_job(cfg, host=TinyHost("sdxl", tmp_path / "o"), logs_dir=tmp_path / "logs")
    shape, ids = seen[0]
    h, w = shape[-2] * 8, shape[-1] * 8
    assert w > h  # a landscape bucket, not a square
    orig_h, orig_w, top, left, tgt_h, tgt_w = ids[0].tolist()
    assert (orig_h, orig_w) == (64, 96)        # the source image's real size, in pixels
    assert (tgt_h, tgt_w) == (h, w)            # the bucket in pixels (not latent size)
    assert top >= 0 and left >= 0


def test_v_prediction_models_train_on_the_v_target(tmp_path, monkeypatch):
    from trainer.training import losses
    from trainer.training.job import run_job

    calls = []
    real = losses.training_target

    def spy(scheduler, latents, noise, timesteps, prediction_type):
        out = real(scheduler, latents, noise, timesteps, prediction_type)
        calls.append((prediction_type, out, scheduler.get_velocity(latents, noise, timesteps), noise))
        return out

    monkeypatch.setattr("trainer.modes.lora.training_target", spy)
    data = image_folder(tmp_path / "data", n=1)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="1")
    run_job(cfg, host=TinyHost("sd2", tmp_path / "o"), logs_dir=tmp_path / "logs")
    kind, target, velocity, noise = calls[0]
    assert kind == "v_prediction"
    torch.testing.assert_close(target, velocity)
    assert not torch.allclose(target, noise)
