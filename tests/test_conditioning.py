"""Prompt encoding as the web-UIs do it, SDXL size/crop ids, and the v-prediction target."""

from __future__ import annotations

import pytest
import torch

from helpers import TinyHost, image_folder, quick_config
from trainer.bundle import TextOptions
from trainer.conditioning import CHUNK, PromptEncoder, parse_emphasis, split_chunks


def test_split_chunks_at_75_and_back_to_last_comma():
    assert [len(c) for c in split_chunks(list(range(160)), None)] == [75, 75, 10]
    ids = [1] * 70 + [9] + [1] * 10          # comma (9) at position 70: within 20 of the end
    chunks = split_chunks(ids, 9)
    assert [len(c) for c in chunks] == [71, 10] and chunks[0][-1] == 9
    far = [1] * 40 + [9] + [1] * 50           # comma too far back: plain split
    assert [len(c) for c in split_chunks(far, 9)] == [75, 16]
    assert split_chunks([], 9) == [[]]


def test_emphasis_is_parsed_as_the_web_uis_document_it():
    # the examples of AUTOMATIC1111's prompt_parser.parse_prompt_attention documentation
    assert parse_emphasis("normal text") == [("normal text", 1.0)]
    assert parse_emphasis("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_emphasis("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_emphasis(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_emphasis("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])
    assert parse_emphasis("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_emphasis("") == [("", 1.0)]
    assert parse_emphasis("x:y a) b] (c:z)") == [("x:y a) b] ", 1.0), ("c:z", 1.1)]


def test_break_starts_a_new_chunk_and_an_embedding_stays_in_one_chunk():
    assert split_chunks([(1, 1.0), (2, 1.2), None, (3, 0.9)], None) == [[(1, 1.0), (2, 1.2)], [(3, 0.9)]]
    assert split_chunks([None], None) == [[]]  # as the hosts: a lone BREAK gives one empty chunk
    block = [(0, 1.0, "v1"), (0, 1.0, "v2"), (0, 1.0, "v3")]
    chunks = split_chunks([1] * 73 + [block, 2], None)
    assert [len(c) for c in chunks] == [73, 4] and chunks[1][:3] == block


def _encode_alone(bundle, prompt, index=0):
    tok = bundle.tokenizers[index]
    row = tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return bundle.text_encoders[index](row, output_hidden_states=True)


def test_emphasis_weights_the_hidden_states_and_keeps_the_chunks_mean():
    bundle = TinyHost("sd1").load(None)
    tok = bundle.tokenizers[0]
    plain = _encode_alone(bundle, "a red apple").last_hidden_state[0]
    with torch.no_grad():
        cond = PromptEncoder(bundle).encode(["a (red:1.5) apple"]).hidden[0]
    red = len(tok("a", add_special_tokens=False).input_ids) + 1  # after BOS and "a"
    weights = torch.ones(77)
    weights[red] = 1.5
    expected = plain * weights[:, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(cond, expected)
    # "No norm" weights without restoring the mean; "Ignore" and "None" leave the states alone
    with torch.no_grad():
        no_norm = PromptEncoder(bundle, TextOptions(emphasis="No norm")).encode(["a (red:1.5) apple"]).hidden[0]
        ignored = PromptEncoder(bundle, TextOptions(emphasis="Ignore")).encode(["a (red:1.5) apple"]).hidden[0]
        literal = PromptEncoder(bundle, TextOptions(emphasis="None")).encode(["a (red:1.5) apple"]).hidden[0]
    torch.testing.assert_close(no_norm, plain * weights[:, None])
    torch.testing.assert_close(ignored, plain)
    torch.testing.assert_close(literal, _encode_alone(bundle, "a (red:1.5) apple").last_hidden_state[0])


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm_on_sd1():
    bundle = TinyHost("sd1").load(None)
    with torch.no_grad():
        cond = PromptEncoder(bundle, TextOptions(clip_skip=2)).encode(["a red apple"]).hidden[0]
        out = _encode_alone(bundle, "a red apple")
        encoder = bundle.text_encoders[0]
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-2])[0]
    torch.testing.assert_close(cond, expected)
    assert not torch.allclose(cond, out.last_hidden_state[0])


def test_sdxl_clip_skip_follows_the_host():
    bundle = TinyHost("sdxl").load(None)
    with torch.no_grad():
        forge = PromptEncoder(bundle, TextOptions(clip_skip=3)).encode(["a red apple"]).hidden[0]
        a1111 = PromptEncoder(bundle, TextOptions(clip_skip=3, clip_skip_sdxl=False)).encode(["a red apple"]).hidden[0]
    torch.testing.assert_close(forge[:, 32:], _encode_alone(bundle, "a red apple", 1).hidden_states[-3][0])
    torch.testing.assert_close(a1111[:, 32:], _encode_alone(bundle, "a red apple", 1).hidden_states[-2][0])


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


def _token_rows(bundle, index, words):
    encoder, tok = bundle.text_encoders[index], bundle.tokenizers[index]
    table = getattr(encoder, "text_model", encoder).embeddings.token_embedding.weight.detach()
    return table[tok(words, add_special_tokens=False).input_ids].clone()


def test_an_embedding_named_in_a_prompt_puts_its_vectors_in_place_of_the_name(tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    bundle = TinyHost("sd1").load(None)
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    # an embedding whose two vectors are the token embeddings of "red apple" reads as those words
    torch.save({"string_to_param": {"*": _token_rows(bundle, 0, "red apple")}, "name": "fruitword"},
               folder / "sub" / "fruitword.pt")
    save_file({"emb_params": torch.zeros(1, 7)}, str(folder / "otherwidth.safetensors"))
    torch.save({"string_to_param": {"*": torch.nn.Linear(2, 2)}}, folder / "needscode.pt")
    encoder = PromptEncoder(bundle, replace(bundle.text_options, embeddings_dir=str(folder)))
    assert set(encoder.embeddings) == {"fruitword"}
    assert any("otherwidth" in n and "another model" in n for n in encoder.notes)
    assert any("needscode" in n for n in encoder.notes)
    with torch.no_grad():
        named = encoder.encode(["a fruitword, (fruitword:1.2)"]).hidden
        spelled = encoder.encode(["a red apple, (red apple:1.2)"]).hidden
        plain = PromptEncoder(bundle).encode(["a fruitword, (fruitword:1.2)"]).hidden
    torch.testing.assert_close(named, spelled)
    assert not torch.allclose(named, plain)


def test_sdxl_embeddings_give_each_encoder_its_own_vectors(tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    bundle = TinyHost("sdxl").load(None)
    save_file({"clip_l": _token_rows(bundle, 0, "red apple"), "clip_g": _token_rows(bundle, 1, "red apple")},
              str(tmp_path / "fruitword.safetensors"))
    encoder = PromptEncoder(bundle, replace(bundle.text_options, embeddings_dir=str(tmp_path)))
    with torch.no_grad():
        named, spelled = encoder.encode(["a fruitword"]), encoder.encode(["a red apple"])
    torch.testing.assert_close(named.hidden, spelled.hidden)
    torch.testing.assert_close(named.pooled, spelled.pooled)


@pytest.mark.slow
def test_a_run_reads_its_embeddings_folder_and_a_missing_one_is_named_before_loading(tmp_path):
    from trainer.training.control import TrainControl
    from trainer.training.errors import InputError
    from trainer.training.job import run_job

    data = image_folder(tmp_path / "data", n=2)
    host = TinyHost("sd1", tmp_path / "out")
    with pytest.raises(InputError, match="embeddings_dir: .*nowhere is not a folder"):
        run_job(quick_config(lora_data_directory=str(data), embeddings_dir=str(tmp_path / "nowhere")),
                host=host, logs_dir=tmp_path / "logs")
    assert host.loads == 0
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, folder / "patternword.pt")
    lines = []
    result = run_job(quick_config(lora_data_directory=str(data), embeddings_dir=str(folder), train_iterations="2"),
                     host=host, logs_dir=tmp_path / "logs", control=TrainControl(on_log=lines.append))
    assert result.saved and any(f"1 textual-inversion embedding(s) from {folder}" in line for line in lines)
