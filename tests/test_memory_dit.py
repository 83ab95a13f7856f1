"""The peak-memory estimate on the flow-matching families (Flux.1 dev/schnell, Z-Image) and what
``memory_profile`` auto chooses with it.

Everything here is priced from the family name (parameter counts of the shipped configs, the network
counted on a meta-device copy of the architecture); the working memory of a step comes from the
CPU-derived block figures of ``estimate.BLOCK_STEP`` (bench/calibrate_dit_memory.py). The two cards
are taken as what CUDA reports free on them before training: 15.5 GiB of a 16 GiB card and 11.5 GiB
of a 12 GiB card (the driver and the CUDA context hold the rest).
"""

from __future__ import annotations

import json

import pytest

from helpers import quick_config
from trainer.config.choices import BLOCKID26, FLUX_BLOCK_IDS
from trainer.training.memory import advice, profiles
from trainer.training.memory import estimate as memory
from trainer.training.memory.estimate import GiB

CARD_16GB_FREE = int(15.5 * GiB)
CARD_12GB_FREE = int(11.5 * GiB)
DIT = ("flux", "flux-schnell", "zimage")
SD_BLOCKS = [b for b in BLOCKID26 if b != "BASE"]  # names no transformer block: every block trains
FLUX_T5 = [b for b in FLUX_BLOCK_IDS if b != "CLIP"]  # every Flux block and the T5 encoder


def _config(**values):
    base = {"image_size(height, width)": "1024", "train_batch_size": "1", "network_rank": "16",
            "network_alpha": "8", "train_model_precision": "bf16", "train_iterations": "2",
            "network_blocks(BASE = TextEncoder)": SD_BLOCKS}
    base.update(values)
    return quick_config(**base)


def _each_profile(cfg, family):
    """{profile: estimate} of ``cfg`` on a CUDA device with bf16 and bitsandbytes."""
    est = memory.estimate_peak(cfg, family, "cuda")
    opts = profiles.options(cfg, "cuda", bf16=True, bnb=True, denoiser="transformer")
    return {name: est.with_facts(**o.facts) if o.facts else est for name, o in opts.items()}


def test_parameter_counts_are_the_shipped_configs():
    import torch

    from trainer.hosts.components import read_json, shipped_config_dir
    from trainer.hosts.dit_parts import transformer_class
    from trainer.hosts.meta import meta_parts

    def count(module):
        return sum(p.numel() for p in module.parameters())

    for family in ("flux", "zimage"):
        parts = meta_parts(family)
        assert memory.PARAMS[family] == {"unet": count(parts["unet"]), "vae": count(parts["vae"]),
                                         "text_encoders": tuple(count(te) for te in parts["text_encoders"])}
    config = read_json(shipped_config_dir("flux") / "transformer" / "config.json")
    with torch.device("meta"):
        schnell = transformer_class(config).from_config({**config, "guidance_embeds": False})
    assert memory.PARAMS["flux-schnell"]["unet"] == count(schnell)
    assert 11.5e9 < memory.PARAMS["flux"]["unet"] < 12.5e9  # "12B"
    assert 5.5e9 < memory.PARAMS["zimage"]["unet"] < 6.5e9  # "6B"
    # CLIP-L + T5-XXL's encoder; Qwen3-4B
    assert memory.PARAMS["flux"]["text_encoders"][0] == memory.PARAMS["sd1"]["text_encoders"][0]
    assert 4.5e9 < memory.PARAMS["flux"]["text_encoders"][1] < 5e9
    assert 3.8e9 < memory.PARAMS["zimage"]["text_encoders"][0] < 4.2e9


def test_a_family_object_a_name_and_a_variant_give_their_own_counts():
    from trainer.families import FLUX, FLUX_SCHNELL, ZIMAGE

    cfg = _config()
    assert memory.estimate_peak(cfg, FLUX, "cuda").parts["params"] == memory.PARAMS["flux"]
    assert memory.estimate_peak(cfg, FLUX_SCHNELL, "cuda").parts["params"] == memory.PARAMS["flux-schnell"]
    assert memory.estimate_peak(cfg, "flux-schnell", "cuda").facts["family"] == "flux"
    assert memory.estimate_peak(cfg, ZIMAGE, "cuda").parts["params"] == memory.PARAMS["zimage"]


@pytest.mark.parametrize("family", DIT)
def test_every_profile_has_an_estimate_and_leaner_options_need_less(family):
    cfg = _config()
    by_profile = _each_profile(cfg, family)
    assert set(by_profile) == set(profiles.PROFILES)
    speed, balanced, low = (by_profile[p] for p in profiles.PROFILES)
    assert low.total < balanced.total < speed.total
    assert "transformer weights" in speed.breakdown
    # each saving on its own lowers the training phase
    base = speed.phases["training"]
    assert speed.with_facts(checkpointing=True).phases["training"] < base
    assert speed.with_facts(unet_bytes=1).phases["training"] < base  # fp8 base weights
    assert speed.with_facts(optimizer="AdamW8bit").phases["training"] < base
    # 8-bit optimizer state is a quarter of AdamW's fp32 state (the training phase's items)
    assert memory._network(low.facts, low.parts)["optimizer state (AdamW8bit)"] * 4 == \
        memory._network(speed.facts, speed.parts)["optimizer state (AdamW)"]


def test_cached_text_encoder_outputs_free_the_encoders():
    """Flux trains CLIP / T5 only when named; otherwise their outputs are cached and they leave."""
    frozen = memory.estimate_peak(_config(), "flux", "cuda")
    assert not frozen.facts["train_te"] and "text encoder weights" not in frozen.breakdown
    t5 = memory.estimate_peak(_config(**{"network_blocks(BASE = TextEncoder)": FLUX_T5}), "flux", "cuda")
    assert t5.facts["train_te"] and t5.parts["net_te"] > 0
    clip_params, t5_params = memory.PARAMS["flux"]["text_encoders"]
    # one encoder trains: the other's outputs are cached and it leaves before training
    assert t5.phase == "training" and t5.breakdown["text encoder weights"] == t5_params * 2
    clip_blocks = ["CLIP", *(b for b in FLUX_T5 if b != "T5")]
    clip = memory.estimate_peak(_config(**{"network_blocks(BASE = TextEncoder)": clip_blocks}), "flux", "cuda")
    assert clip.facts["te_trained"] == ("CLIP",)
    assert clip.phases["training"] < t5.phases["training"] - 8 * GiB  # T5-XXL (9.5 GB in bf16) gone
    assert "text encoder forward + backward" in t5.breakdown
    assert t5.total > frozen.total + 9 * GiB  # T5-XXL stays in bf16
    # BASE is the SD id: it trains nothing on Flux / Z-Image, so nothing stays for it
    for family in ("flux", "zimage"):
        base = memory.estimate_peak(_config(**{"network_blocks(BASE = TextEncoder)": ["BASE", *SD_BLOCKS]}), family, "cuda")
        assert not base.facts["train_te"]
        assert base.total == memory.estimate_peak(_config(), family, "cuda").total
    # the encoders are counted while captions are cached, and gone from training
    caching = frozen.phases["caching latents"]
    assert caching >= sum(memory.PARAMS["flux"]["text_encoders"]) * 2


@pytest.mark.parametrize("family", DIT)
def test_the_estimate_scales_with_resolution_batch_and_rank(family):
    def training(**values):
        est = memory.estimate_peak(_config(use_gradient_checkpointing=True, **values), family, "cuda")
        return est.phases["training"], est

    small, est512 = training(**{"image_size(height, width)": "512"})
    large, est1024 = training()
    assert est512.facts["tokens"] == 32 * 32 + 512 and est1024.facts["tokens"] == 64 * 64 + 512
    assert large > small
    assert training(train_batch_size="2")[0] > large
    rank32 = memory.estimate_peak(_config(network_rank="32"), family, "cuda")
    rank16 = memory.estimate_peak(_config(), family, "cuda")
    assert rank32.parts["net_unet"] == 2 * rank16.parts["net_unet"]  # lierla: parameters linear in the rank
    assert rank32.phases["training"] > rank16.phases["training"]


def test_working_memory_is_the_block_figures_times_the_block_count():
    est = memory.estimate_peak(_config(use_gradient_checkpointing=True), "zimage", "cuda")
    kept, kept_per, transient, transient_per = memory.BLOCK_STEP[("zimage layer", True, True, False)]
    tokens = est.facts["tokens"]
    expected = (30 * (kept * 2**20 + kept_per * 1024 * tokens) + transient * 2**20 + transient_per * 1024 * tokens
                + 3 * tokens * 3840 * 2)
    work = memory._work(est.facts)  # the training phase's items (the peak may be the caching phase)
    assert [int(v) for k, v in work.items() if k.startswith("transformer forward + backward")] == [int(expected)]


def _print_plan(title, cfg, family, free):
    est = memory.estimate_peak(cfg, family, "cuda")
    plan = profiles.plan(cfg, est, "cuda", free, bf16=True, bnb=True)
    print(f"\n{title}: free {free / GiB:.1f} GiB")
    print("\n".join(plan.lines()))
    print(advice.format_estimate(plan.estimate, free))
    return plan


def test_auto_on_a_16gb_card_for_flux_at_1024px_rank16_batch1():
    cfg = _config(memory_profile="auto")
    plan = _print_plan("Flux.1-dev 1024 px rank 16 batch 1", cfg, "flux", CARD_16GB_FREE)
    assert plan.profile == "low"
    assert plan.storage == "fp8" and plan.defer_unet and plan.config.use_gradient_checkpointing
    assert plan.estimate.total <= CARD_16GB_FREE


def test_auto_on_a_12gb_card_for_zimage_at_1024px_rank16_batch1():
    cfg = _config(memory_profile="auto")
    plan = _print_plan("Z-Image 1024 px rank 16 batch 1", cfg, "zimage", CARD_12GB_FREE)
    assert plan.profile == "low"
    assert profiles.fits(plan.estimate, CARD_12GB_FREE)


def test_advice_offers_the_low_profile_and_names_the_flux_text_encoder():
    est = memory.estimate_peak(_config(**{"network_blocks(BASE = TextEncoder)": FLUX_T5}), "flux", "cuda")
    texts = advice.suggestion_texts(est, CARD_16GB_FREE)
    assert any("memory_profile to low" in t for t in texts)
    assert any(t.startswith("remove T5 from network_blocks") for t in texts)


def test_estimate_for_a_transformer_folder(tmp_path):
    from trainer.hosts.components import read_json, shipped_config_dir

    for family, extra in (("flux", {}), ("flux-schnell", {"guidance_embeds": False}), ("zimage", {})):
        source = shipped_config_dir("flux" if family.startswith("flux") else family)
        folder = tmp_path / family / "transformer"
        folder.mkdir(parents=True)
        config = {**read_json(source / "transformer" / "config.json"), **extra}
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        est = memory.estimate_for_model_file(_config(), tmp_path / family, "cuda")
        assert est.parts["params"] == memory.PARAMS[family]
