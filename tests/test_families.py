"""Family descriptors: diffusers -> LDM names, block ids and kohya module names."""

from __future__ import annotations

import pytest

from network_helpers import SD15_UNET, SDXL_UNET, SD21_UNET, meta_unet
from tiny import tiny_unet
from trainer import families
from trainer.families import SD1, SD2, SDXL, block_id_of, get_family, ldm_module_paths

@pytest.fixture(scope="module")
def sd15_map():
    return ldm_module_paths(meta_unet(SD15_UNET))


@pytest.fixture(scope="module")
def sdxl_map():
    return ldm_module_paths(meta_unet(SDXL_UNET))


def test_get_family_and_unknown_name():
    assert get_family("sdxl") is SDXL and get_family("sd2") is SD2
    with pytest.raises(ValueError, match="unknown model family 'sd3'.*sd1, sd2, sdxl, flux, zimage"):
        get_family("sd3")


@pytest.mark.parametrize("path, ldm, block", [
    ("conv_in", "input_blocks.0.0", "IN00"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", "IN01"),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "input_blocks.2.1.transformer_blocks.0.attn2.to_k",
     "IN02"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op", "IN03"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
     "IN04"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection", "IN04"),
    ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op", "IN09"),
    ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1", "IN11"),
    ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2", "M00"),
    ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out", "M00"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3", "M00"),
    ("up_blocks.0.resnets.0.conv1", "output_blocks.0.0.in_layers.2", "OUT00"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv", "OUT02"),
    ("up_blocks.1.attentions.0.proj_in", "output_blocks.3.1.proj_in", "OUT03"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv", "OUT05"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.11.1.transformer_blocks.0.ff.net.2",
     "OUT11"),
    ("conv_out", "out.2", None),
    ("time_embedding.linear_1", "time_embed.0", None),
])
def test_sd15_ldm_names_and_blocks(sd15_map, path, ldm, block):
    assert sd15_map[path] == ldm
    assert block_id_of(ldm) == block


@pytest.mark.parametrize("path, kohya, block", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "IN04"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
     "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0", "IN08"),
    ("mid_block.attentions.0.proj_in", "lora_unet_middle_block_1_proj_in", "M00"),
    ("down_blocks.0.resnets.1.conv1", "lora_unet_input_blocks_2_0_in_layers_2", "IN02"),
    ("down_blocks.0.resnets.1.time_emb_proj", "lora_unet_input_blocks_2_0_emb_layers_1", "IN02"),
    ("up_blocks.2.resnets.2.conv2", "lora_unet_output_blocks_8_0_out_layers_3", "OUT08"),
    ("up_blocks.1.resnets.0.conv_shortcut", "lora_unet_output_blocks_3_0_skip_connection", "OUT03"),
    ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op", "IN03"),
    ("down_blocks.1.downsamplers.0.conv", "lora_unet_input_blocks_6_0_op", "IN06"),
    ("up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv", "OUT02"),
    ("up_blocks.1.upsamplers.0.conv", "lora_unet_output_blocks_5_2_conv", "OUT05"),
    ("add_embedding.linear_1", "lora_unet_label_emb_0_0", None),
])
def test_sdxl_kohya_names_are_ldm_paths(sdxl_map, path, kohya, block):
    ldm = sdxl_map[path]
    assert SDXL.unet_lora_name(path, ldm) == kohya
    assert block_id_of(ldm) == block


def test_sd1_and_sd2_kohya_names_are_diffusers_paths(sd15_map):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for family in (SD1, SD2):
        assert family.unet_lora_name(path, sd15_map[path]) == \
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert SD1.unet_lora_name("mid_block.resnets.0.conv1", sd15_map["mid_block.resnets.0.conv1"]) == \
        "lora_unet_mid_block_resnets_0_conv1"


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_every_tiny_unet_module_has_an_ldm_name(kind):
    unet = tiny_unet(kind)
    mapping = ldm_module_paths(unet)
    param_modules = {name.rpartition(".")[0] for name, _ in unet.named_parameters()}
    assert set(mapping) == param_modules
    blocks = {block_id_of(ldm) for ldm in mapping.values()} - {None}
    # Two down blocks of 2 layers: input_blocks 0..5 (IN03 = the one downsampler), 6 output blocks.
    assert blocks == {f"IN{i:02d}" for i in range(6)} | {"M00"} | {f"OUT{i:02d}" for i in range(6)}


def test_full_size_sd21_maps_like_sd15(sd15_map):
    assert ldm_module_paths(meta_unet(SD21_UNET)) == sd15_map


def test_wrong_inverse_is_caught_by_diffusers_converter(monkeypatch):
    """The check against diffusers' converter is live: swap two ResNet names and it must fail."""
    swapped = dict(families._RESNET_LDM, conv1="out_layers.3", conv2="in_layers.2")
    monkeypatch.setattr(families, "_RESNET_LDM", swapped)
    families._ldm_module_map_cached.cache_clear()
    with pytest.raises(RuntimeError, match="disagrees with diffusers' LDM converter"):
        ldm_module_paths(tiny_unet("sd1"))
    families._ldm_module_map_cached.cache_clear()


def test_per_block_layers_per_block_is_refused():
    unet = tiny_unet("sd1")
    unet.register_to_config(layers_per_block=(2, 2))
    with pytest.raises(ValueError, match="layers_per_block"):
        ldm_module_paths(unet)


def test_text_encoder_names_get_the_text_model_prefix():
    assert SD1.te_lora_name(0, "encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert SDXL.te_lora_name(1, "text_model.encoder.layers.11.mlp.fc2") == \
        "lora_te2_text_model_encoder_layers_11_mlp_fc2"
    with pytest.raises(ValueError, match="no index 1"):
        SD2.te_lora_name(1, "encoder.layers.0.mlp.fc1")


def test_module_classes_resolve():
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP

    assert {CLIPAttention, CLIPMLP} <= set(families.te_classes())
    assert [c.__name__ for c in families.unet_attention_classes()] == ["Transformer2DModel"]
    assert [c.__name__ for c in families.unet_conv_classes()] == ["ResnetBlock2D", "Downsample2D", "Upsample2D"]


@pytest.mark.parametrize("family, v, arch", [
    (SD1, False, "stable-diffusion-v1/lora"), (SD2, True, "stable-diffusion-v2-768-v/lora"),
    (SD2, False, "stable-diffusion-v2-512/lora"), (SDXL, False, "stable-diffusion-xl-v1-base/lora"),
])
def test_modelspec_architecture(family, v, arch):
    assert family.modelspec_arch(v) == arch
