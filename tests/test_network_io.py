"""Network files: save/load round trips, strength, atomic writes, metadata, hashes, diffusers loading."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import save_file

from network_helpers import randomize, te_out, unet_inputs, unet_out
from tiny import tiny_bundle, tiny_components
from trainer.config import TrainConfig
from trainer.families import get_family
from trainer.network import (
    NetworkSpec, build_metadata, create_network, load_network_weights, network_state_dict, read_network_file,
    resume_network, save_network,
)
from trainer import atomic


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_bundle("sdxl")


@pytest.fixture(scope="module")
def sd2():
    return tiny_bundle("sd2")


def spec(**kw) -> NetworkSpec:
    base = dict(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_text_encoder=True)
    base.update(kw)
    return NetworkSpec(**base)


def outputs(bundle, net):
    net.apply_to()
    try:
        return unet_out(bundle.unet, unet_inputs(bundle)), [te_out(te) for te in bundle.text_encoders]
    finally:
        net.remove()


@pytest.mark.parametrize("kind, net_type", [("sd1", "lierla"), ("sd1", "loha"), ("sdxl", "c3lier"), ("sdxl", "loha")])
def test_save_load_round_trip_is_exact_in_fp32(request, tmp_path, kind, net_type):
    bundle = request.getfixturevalue(kind)
    net = create_network(bundle, spec(network_type=net_type))
    randomize(net)
    path = save_network(net, tmp_path / "n.safetensors", metadata={}, dtype=torch.float32)
    fresh = create_network(bundle, spec(network_type=net_type))
    missing, unexpected = load_network_weights(fresh, path)
    assert missing == [] and unexpected == []
    (u1, t1), (u2, t2) = outputs(bundle, net), outputs(bundle, fresh)
    assert torch.equal(u1, u2) and all(torch.equal(a, b) for a, b in zip(t1, t2))
    assert not torch.equal(u1, unet_out(bundle.unet, unet_inputs(bundle)))


def test_fp16_save_is_close_and_every_tensor_is_fp16(sd1, tmp_path):
    net = create_network(sd1, spec(network_type="c3lier"))
    randomize(net)
    path = save_network(net, tmp_path / "n.safetensors", metadata={}, dtype=torch.float16)
    tensors, _ = read_network_file(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{key}.alpha"].shape == () and tensors[f"{key}.alpha"].item() == 1.0
    assert tensors[f"{key}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{key}.lora_up.weight"].shape == (32, 2, 1, 1)
    fresh = create_network(sd1, spec(network_type="c3lier"))
    load_network_weights(fresh, path)
    torch.testing.assert_close(outputs(sd1, fresh)[0], outputs(sd1, net)[0], atol=2e-3, rtol=2e-3)


def _layer_delta(net, name: str, x: torch.Tensor) -> torch.Tensor:
    module = getattr(net, name)
    return module.delta(x) * module.scale


@pytest.mark.parametrize("net_type, strength", [("lierla", 4.0), ("c3lier", 0.25), ("loha", -0.5), ("loha", 3.0)])
def test_strength_scales_the_saved_effect(sd1, net_type, strength):
    net = create_network(sd1, spec(network_type=net_type))
    randomize(net)
    fresh = create_network(sd1, spec(network_type=net_type))
    load_network_weights(fresh, network_state_dict(net, torch.float32, strength=strength))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    x = torch.randn(3, 32)
    torch.testing.assert_close(_layer_delta(fresh, name, x), strength * _layer_delta(net, name, x))


def test_negative_strength_is_refused_for_lora(sd1):
    net = create_network(sd1, spec())
    with pytest.raises(ValueError, match="`network_strength` is -1.0.*positive"):
        network_state_dict(net, torch.float16, strength=-1.0)
    with pytest.raises(ValueError, match="finite number"):
        network_state_dict(net, torch.float16, strength=float("nan"))


def test_existing_file_is_refused_and_untouched(sd1, tmp_path):
    net = create_network(sd1, spec())
    path = tmp_path / "name.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="save_overwrite.*save_lora_name"):
        save_network(net, path, metadata={}, dtype=torch.float16)
    assert path.read_bytes() == b"precious"
    save_network(net, path, metadata={}, dtype=torch.float16, overwrite=True)
    assert read_network_file(path)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["name.safetensors"]
    assert path.stat().st_mode & 0o777 == atomic.new_file_mode()


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_file(sd1, tmp_path, monkeypatch):
    net = create_network(sd1, spec())
    path = tmp_path / "name.safetensors"
    path.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_network(net, path, metadata={}, dtype=torch.float16, overwrite=True)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["name.safetensors"]


def test_save_rejects_bad_names_and_metadata(sd1, tmp_path):
    net = create_network(sd1, spec())
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_network(net, tmp_path / "n.ckpt", metadata={}, dtype=torch.float16)
    with pytest.raises(ValueError, match="must be strings.*ss_network_dim"):
        save_network(net, tmp_path / "n.safetensors", metadata={"ss_network_dim": 4}, dtype=torch.float16)


def test_reading_broken_files_gives_clear_errors(sd1, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_network_file(tmp_path / "nope.safetensors")
    net = create_network(sd1, spec())
    good = save_network(net, tmp_path / "good.safetensors", metadata={}, dtype=torch.float16)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_network_file(cut)
    text = tmp_path / "text.safetensors"
    text.write_text("hello, this is not a network")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_network_file(text)
    pt = tmp_path / "n.pt"
    torch.save(read_network_file(good)[0], pt)
    assert set(read_network_file(pt)[0]) == set(read_network_file(good)[0])


def test_loading_another_layout_names_the_keys(sd1, sdxl, tmp_path):
    xl = save_network(create_network(sdxl, spec()), tmp_path / "xl.safetensors", metadata={}, dtype=torch.float16)
    first_unexpected = r"unexpected key\(s\) \(modules \['lora_te1_text_model_encoder_layers_0_mlp_fc1'"
    with pytest.raises(ValueError, match=first_unexpected + ".*LDM U-Net names"):
        load_network_weights(create_network(sd1, spec()), xl)
    small = save_network(create_network(sd1, spec(rank=2)), tmp_path / "r2.safetensors", metadata={},
                         dtype=torch.float16)
    with pytest.raises(ValueError, match=r"shape \(2, 32, 1, 1\) in the file but \(4, 32, 1, 1\).*network_rank"):
        load_network_weights(create_network(sd1, spec(rank=4)), small, strict=False)
    loha = save_network(create_network(sd1, spec(network_type="loha")), tmp_path / "h.safetensors", metadata={},
                        dtype=torch.float16)
    with pytest.raises(ValueError, match="LoHa network; set network_type to loha"):
        load_network_weights(create_network(sd1, spec()), loha)
    partial = create_network(sd1, spec(blocks=("IN01",), train_text_encoder=False))
    full = save_network(create_network(sd1, spec()), tmp_path / "full.safetensors", metadata={}, dtype=torch.float16)
    missing, unexpected = load_network_weights(partial, full, strict=False)
    assert missing == [] and len(unexpected) == 3 * (72 - 12 + 12)


CONFIG = {"network_type": "c3lier", "train_learning_rate": "1e-4", "train_iterations": "600",
          "train_lr_warmup_steps": "0", "train_lr_scheduler": "cosine", "train_optimizer": "AdamW8bit",
          "train_snr_gamma": "5", "train_seed": "-1", "image_size(height, width)": "512,768", "model_v_pred": False}
TRAINING = {"ss_training_started_at": "1700000000.5", "ss_output_name": "cat_200steps", "ss_seed": "1234",
            "ss_steps": "200", "ss_tag_frequency": {"cat": 3}}


@pytest.mark.parametrize("kind, net_type, module, args", [
    ("sd1", "lierla", "networks.lora", None),
    ("sd1", "c3lier", "networks.lora", {"conv_dim": "2", "conv_alpha": "1.0"}),
    ("sdxl", "loha", "lycoris.kohya", {"algo": "loha", "conv_dim": "2", "conv_alpha": "1.0", "use_tucker": "True"}),
])
def test_metadata(kind, net_type, module, args):
    family = get_family(kind)
    meta = build_metadata(config=TrainConfig.from_dict(CONFIG), family=family, network_spec=spec(network_type=net_type),
                          base_model_hash_info={"name": "base.safetensors", "sha256": "ab" * 32, "other": "x",
                                                "ss_dataset_dirs": "{}"},
                          training_info=TRAINING)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == module
    assert (json.loads(meta["ss_network_args"]) if "ss_network_args" in meta else None) == args
    assert meta["ss_training_started_at"] == "1700000000.5" and meta["ss_output_name"] == "cat_200steps"
    assert meta["ss_seed"] == "1234" and meta["ss_optimizer"] == "adamw8bit" and meta["ss_max_train_steps"] == "600"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert float(meta["ss_learning_rate"]) == 1e-4 and meta["ss_mixed_precision"] == "torch.float32"
    assert meta["ss_base_model_version"] == family.base_model_version and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_tag_frequency"]) == {"1": {"cat": 3}}
    assert meta["ss_sd_model_name"] == "base.safetensors" and meta["ss_new_sd_model_hash"] == "ab" * 32
    assert "other" not in meta and "ss_dataset_dirs" not in meta
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == family.modelspec_arch(False)
    assert meta["modelspec.title"] == "cat_200steps" and meta["modelspec.resolution"] == "768x512"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.date"].startswith("2023-11-1")
    assert json.loads(meta["traintrain_config"]) == TrainConfig.from_dict(CONFIG).to_dict()


def test_metadata_needs_start_time_and_name():
    with pytest.raises(ValueError, match="training_info lacks.*ss_training_started_at"):
        build_metadata(config=TrainConfig(), family=get_family("sd1"), network_spec=spec(), base_model_hash_info=None,
                       training_info={"ss_output_name": "x"})
    with pytest.raises(ValueError, match="Unix time"):
        build_metadata(config=TrainConfig(), family=get_family("sd2"), network_spec=spec(), base_model_hash_info=None,
                       training_info={"ss_output_name": "x", "ss_training_started_at": "yesterday"})


def test_hashes_match_sd_scripts_definition(sd1, tmp_path):
    net = create_network(sd1, spec(network_type="c3lier", rank=32, conv_rank=32))
    randomize(net)
    meta = build_metadata(config=TrainConfig.from_dict(CONFIG), family=sd1.family, network_spec=net.spec, base_model_hash_info={},
                          training_info=TRAINING)
    path = save_network(net, tmp_path / "n.safetensors", metadata=meta, dtype=torch.float32)
    blob = path.read_bytes()
    assert len(blob) > 0x110000  # so the legacy window holds real bytes
    tensors, saved = read_network_file(path)
    assert {k: v for k, v in saved.items() if not k.startswith("sshs_")} == meta
    header = 8 + int.from_bytes(blob[:8], "little")
    assert saved["sshs_model_hash"] == hashlib.sha256(blob[header:]).hexdigest()
    ss_only = tmp_path / "ss_only.safetensors"
    save_file(tensors, str(ss_only), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert saved["sshs_legacy_hash"] == hashlib.sha256(ss_only.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_problems(messages: list[str]) -> list[str]:
    """Lines of diffusers/transformers/peft output that report skipped LoRA keys. transformers also
    lists the wrapped layers' ``base_layer`` weights as MISSING on every load; those are not ours."""
    lines = [line for m in messages for line in m.splitlines()]
    return [line for line in lines
            if "unexpected" in line.lower() or ("missing" in line.lower() and "lora" in line.lower())]


def _pipeline(kind: str, parts: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoders"][0], text_encoder_2=parts["text_encoders"][1],
            tokenizer=parts["tokenizers"][0], tokenizer_2=parts["tokenizers"][1], unet=parts["unet"],
            scheduler=parts["noise_scheduler"])
        return pipe, [pipe.text_encoder, pipe.text_encoder_2]
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoders"][0], tokenizer=parts["tokenizers"][0],
        unet=parts["unet"], scheduler=parts["noise_scheduler"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return pipe, [pipe.text_encoder]


def _load_in_diffusers(kind: str, path, records: _Records):
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:  # diffusers loads LoRAs through PEFT, which it uses only with transformers >= 4.34
        pytest.skip("diffusers has no PEFT backend here (needs peft and transformers >= 4.34)")
    parts = tiny_components(kind)  # the same seed: the same base weights as the fixtures
    pipe, encoders = _pipeline(kind, parts)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours")
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    records.messages += [str(w.message) for w in caught]
    return pipe, encoders


@pytest.mark.slow
@pytest.mark.parametrize("kind, net_type", [("sd1", "lierla"), ("sd1", "c3lier"), ("sd2", "lierla"),
                                            ("sdxl", "lierla"), ("sdxl", "c3lier")])
def test_diffusers_loads_our_file_with_no_skipped_keys(request, tmp_path, kind, net_type):
    bundle = request.getfixturevalue(kind)
    net = create_network(bundle, spec(network_type=net_type))
    randomize(net)
    ours_unet, ours_te = outputs(bundle, net)
    path = save_network(net, tmp_path / "ours.safetensors", metadata={"ss_output_name": "ours"}, dtype=torch.float32)
    records = _Records()
    pipe, encoders = _load_in_diffusers(kind, path, records)
    assert _load_problems(records.messages) == []
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if kind == "sdxl" else set())
    assert {k for k, v in pipe.get_list_adapters().items() if v == ["ours"]} == expected
    torch.testing.assert_close(unet_out(pipe.unet, unet_inputs(bundle)), ours_unet, atol=1e-4, rtol=1e-4)
    for theirs, ours in zip(encoders, ours_te):
        torch.testing.assert_close(te_out(theirs), ours, atol=1e-4, rtol=1e-4)


def test_diffusers_check_sees_a_foreign_key(sd1, tmp_path):
    """The log capture above is live: a key no layer has is reported by diffusers."""
    tensors = network_state_dict(create_network(sd1, spec()), torch.float32)
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        bogus = name.replace("q_proj", "zz_proj").replace("to_q", "to_zz")
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            tensors[f"{bogus}.{suffix}"] = tensors[f"{name}.{suffix}"].clone()
    path = tmp_path / "bogus.safetensors"
    save_file(tensors, str(path))
    records = _Records()
    _load_in_diffusers("sd1", path, records)
    problems = _load_problems(records.messages)
    assert any("to.zz" in line for line in problems)  # U-Net, reported by diffusers
    assert any("zz.proj" in line for line in problems)  # text encoder, reported by transformers


def test_resume_takes_modules_and_ranks_from_the_file(sd1, tmp_path):
    made = create_network(sd1, spec(network_type="c3lier", blocks=("BASE", "IN01", "OUT05")))
    randomize(made)
    path = save_network(made, tmp_path / "r.safetensors", metadata={}, dtype=torch.float32)
    resumed = resume_network(sd1, spec(network_type="c3lier", rank=8, conv_rank=8, element="CrossAttention"), path)
    assert sorted(m.lora_name for m in resumed.all_modules) == sorted(m.lora_name for m in made.all_modules)
    conv = resumed.lora_unet_down_blocks_0_resnets_0_conv1
    assert conv.rank == 2 and conv.scale == 0.5
    assert torch.equal(outputs(sd1, resumed)[0], outputs(sd1, made)[0])
    no_te = resume_network(sd1, spec(network_type="c3lier", train_text_encoder=False), path)
    assert not no_te.te_modules and len(no_te.skipped_modules) == 12
    with pytest.raises(ValueError, match="lierla cannot hold; set network_type to c3lier"):
        resume_network(sd1, spec(network_type="lierla"), path)
    with pytest.raises(ValueError, match="LoRA/LoCon network, but network_type is loha"):
        resume_network(sd1, spec(network_type="loha"), path)
    xl = save_network(create_network(tiny_bundle("sdxl"), spec()), tmp_path / "xl.safetensors", metadata={},
                      dtype=torch.float16)
    with pytest.raises(ValueError, match="does not have.*another model family"):
        resume_network(sd1, spec(), xl)


def test_resume_loha_keeps_the_selection(sd1, tmp_path):
    made = create_network(sd1, spec(network_type="loha", blocks=("IN01", "IN02"), train_text_encoder=False))
    randomize(made)
    path = save_network(made, tmp_path / "h.safetensors", metadata={}, dtype=torch.float32)
    resumed = resume_network(sd1, spec(network_type="loha", blocks=("IN01",), train_text_encoder=False), path)
    assert {m.block for m in resumed.unet_modules} == {"IN01"} and resumed.skipped_modules
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    for key in ("hada_w1_a", "hada_w2_b", "hada_t1"):
        assert torch.equal(getattr(getattr(resumed, name), key), getattr(getattr(made, name), key))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_lycoris_loads_our_loha_file_and_gives_the_same_output(request, tmp_path, monkeypatch, kind):
    """LyCORIS's own loader (what sd-scripts and the web-UIs' LyCORIS support use) finds every LoHa
    module of our file, Tucker convs included, and the model it patches computes what ours does.
    SD1/SD2 only: LyCORIS names U-Net modules by the module tree it is given, and these use the
    diffusers tree's names (SDXL files use the LDM names of sd-scripts' own SDXL U-Net)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # The loader first builds (then drops) a default network; its by-name targets
    # (time_embedding.linear_1...) are met twice on a diffusers U-Net and trip LyCORIS's duplicate
    # check. Only that throw-away default is affected: the modules it returns come from the file.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    bundle = request.getfixturevalue(kind)
    net = create_network(bundle, spec(network_type="loha"))
    randomize(net)
    assert any(m.tucker for m in net.unet_modules)  # the file holds hada_t1/hada_t2 cores too
    ours_unet, ours_te = outputs(bundle, net)
    path = save_network(net, tmp_path / "loha.safetensors", metadata={"ss_output_name": "loha"}, dtype=torch.float32)

    parts = tiny_components(kind)  # the same seed: the same base weights as the fixture
    [encoder], unet = parts["text_encoders"], parts["unet"]
    base_unet = unet_out(unet, unet_inputs(bundle))
    # sd-scripts hands LyCORIS a CLIP whose layers sit under ``text_model`` (transformers 4's tree,
    # the kohya names); transformers 5 dropped that level, so the encoder is hung under that name.
    holder = torch.nn.Module()
    holder.text_model = encoder
    lyco, weights = create_network_from_weights(1.0, str(path), None, holder, unet, for_inference=True)
    assert type(lyco.unet_loras[0]).__name__ == "LohaModule"
    assert sorted(m.lora_name for m in lyco.unet_loras) == sorted(m.lora_name for m in net.unet_modules)
    assert sorted(m.lora_name for m in lyco.text_encoder_loras) == sorted(m.lora_name for m in net.te_modules)
    lyco.apply_to(holder, unet, apply_text_encoder=True, apply_unet=True)
    theirs = unet_out(unet, unet_inputs(bundle))
    assert (theirs - base_unet).abs().max() > 1e-3  # the file really changes the output
    torch.testing.assert_close(theirs, ours_unet, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(te_out(encoder), ours_te[0], atol=1e-4, rtol=1e-4)
