"""Network building and behaviour: module selection, kinds, multiplier, stacking, groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from network_helpers import SD15_UNET, SD21_UNET, SDXL_UNET, meta_unet, randomize, te_out, unet_inputs, unet_out
from tiny import tiny_bundle
from trainer.bundle import ModelBundle
from trainer.families import SD1, SD2, SDXL
from trainer.network import Network, NetworkSpec, create_network
from trainer.network.layers import LoHaModule, LoRAModule

SD_LIERLA_BLOCKS = {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(3, 12)}
SD_CONV_BLOCKS = {f"IN{i:02d}" for i in range(1, 12)} | {"M00"} | {f"OUT{i:02d}" for i in range(12)}
XL_LIERLA_BLOCKS = {"IN04", "IN05", "IN07", "IN08", "M00"} | {f"OUT{i:02d}" for i in range(6)}
XL_CONV_BLOCKS = {f"IN{i:02d}" for i in range(1, 9)} | {"M00"} | {f"OUT{i:02d}" for i in range(9)}


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_bundle("sdxl")


def spec(**kw) -> NetworkSpec:
    base = dict(rank=4, alpha=2.0, train_text_encoder=True)
    base.update(kw)
    return NetworkSpec(**base)


# Tiny SD1: 6 Transformer2DModels (down0 x2, mid, up1 x3), 1 transformer block each; a model
# holds proj_in + proj_out + 4 (attn1) + 4 (attn2) + 2 (ff) = 12 layers -> 72. ResNets: 12, each
# conv1, conv2, time_emb_proj, plus conv_shortcut where channels change (down1.res0 and the 6 up
# ResNets, which take skip connections) -> 43; + 1 downsampler + 1 upsampler = 45 -> 117.
# TE: 2 layers x (q, k, v, out, fc1, fc2) = 12.
# Tiny SDXL: 12 transformer blocks x 10 + 6 models x 2 = 132 (+ the same 45 conv layers = 177),
# TE: 12 + 12.
# Block subsets: SD1 IN01 = res (3) + attention (12); OUT05 = res with shortcut (4) + attention (12).
# SDXL IN04 = res with shortcut (4) + attention of 2 blocks (22); M00 = 2 res (6) + attention (22).
@pytest.mark.parametrize("kind, net_type, element, blocks, n_unet, n_te", [
    ("sd1", "lierla", "Full", None, 72, 12),
    ("sd1", "lierla", "CrossAttention", None, 24, 0),
    ("sd1", "lierla", "SelfAttention", None, 24, 0),
    ("sd1", "c3lier", "Full", None, 117, 12),
    ("sd1", "c3lier", "CrossAttention", None, 24, 0),
    ("sd1", "loha", "Full", None, 117, 12),
    ("sd1", "loha", "SelfAttention", None, 24, 0),
    ("sd1", "c3lier", "Full", ("IN01", "OUT05"), 31, 0),
    ("sd1", "lierla", "Full", ("BASE", "IN01"), 12, 12),
    ("sdxl", "lierla", "Full", None, 132, 24),
    ("sdxl", "lierla", "CrossAttention", None, 48, 0),
    ("sdxl", "c3lier", "Full", None, 177, 24),
    ("sdxl", "loha", "Full", ("IN04", "M00"), 54, 0),
    ("sdxl", "c3lier", "SelfAttention", ("BASE", "IN04", "IN11"), 8, 0),
])
def test_module_counts_on_tiny_models(request, kind, net_type, element, blocks, n_unet, n_te):
    bundle = request.getfixturevalue(kind)
    extra = {} if blocks is None else {"blocks": blocks}
    net = create_network(bundle, spec(network_type=net_type, element=element, **extra))
    assert (len(net.unet_modules), len(net.te_modules)) == (n_unet, n_te)
    token = {"CrossAttention": "attn2", "SelfAttention": "attn1"}.get(element)
    if token:
        assert all(token in m.lora_name for m in net.all_modules)
    if blocks is not None:
        assert {m.block for m in net.unet_modules} <= set(blocks)
    prefix = "lora_unet_input_blocks" if kind == "sdxl" else "lora_unet_down_blocks"
    assert any(m.lora_name.startswith(prefix) for m in net.unet_modules) or blocks is not None


def test_text_encoder_needs_base_and_the_train_flag(sd1):
    assert not create_network(sd1, spec(train_text_encoder=False)).te_modules
    assert not create_network(sd1, spec(blocks=("IN01",))).te_modules
    names = [m.lora_name for m in create_network(sd1, spec(blocks=("BASE", "IN01"))).te_modules]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names


def test_no_module_at_all_is_an_error(sd1):
    with pytest.raises(ValueError, match="no layer .* gets a module.*network_blocks=IN03 OUT00"):
        create_network(sd1, spec(blocks=("IN03", "OUT00")))


def _meta_bundle(family, unet_config, te_configs):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        tes = [(CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**cfg))
               for cfg, proj in te_configs]
    return ModelBundle(family=family, unet=meta_unet(unet_config), vae=None, text_encoders=tes, tokenizers=[],
                       noise_scheduler=None)


CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)


# kohya's well-known counts, re-derived from the architectures:
# SD1.5/SD2 lierla: 16 Transformer2DModels (down 2+2+2, mid 1, up 3+3+3) x 12 layers = 192.
#   c3lier adds 22 ResNets x 3 + 14 shortcuts (down1.res0, down2.res0, 12 up ResNets)
#   + 3 downsamplers + 3 upsamplers = 86 -> 278.
# SDXL lierla: 70 transformer blocks (down 2x2 + 2x10, mid 10, up 3x10 + 3x2) x 10 + 11 models x 2 = 722.
#   c3lier adds 17 ResNets x 3 + 11 shortcuts (down1.res0, down2.res0, 9 up ResNets) + 2 + 2 samplers = 66 -> 788.
# Text encoders: 6 Linears per layer: CLIP-L 12 -> 72, OpenCLIP-H (SD2, 23 layers) -> 138, CLIP-G 32 -> 192.
@pytest.mark.parametrize("family, unet_config, te_configs, counts", [
    (SD1, SD15_UNET, [(CLIP_L, False)], {"lierla": (192, [72]), "c3lier": (278, [72])}),
    (SD2, SD21_UNET, [(OPENCLIP_H, False)], {"lierla": (192, [138])}),
    (SDXL, SDXL_UNET, [(CLIP_L, False), (CLIP_G, True)], {"lierla": (722, [72, 192]), "c3lier": (788, [72, 192])}),
])
@pytest.mark.slow
def test_full_size_counts_and_blocks(family, unet_config, te_configs, counts):
    bundle = _meta_bundle(family, unet_config, te_configs)
    for net_type, (n_unet, n_tes) in counts.items():
        net = create_network(bundle, spec(network_type=net_type))
        assert len(net.unet_modules) == n_unet
        per_te = [sum(m.lora_name.startswith(p + "_") for m in net.te_modules) for p in family.te_prefixes]
        assert per_te == n_tes
        if family is SDXL:
            expected_blocks = XL_LIERLA_BLOCKS if net_type == "lierla" else XL_CONV_BLOCKS
        else:
            expected_blocks = SD_LIERLA_BLOCKS if net_type == "lierla" else SD_CONV_BLOCKS
        assert {m.block for m in net.unet_modules} == expected_blocks
        names = " ".join(m.lora_name for m in net.unet_modules)
        for never in ("conv_in", "conv_out", "time_embed", "label_emb", "add_embedding", "input_blocks_0_"):
            assert never not in names


def test_ranks_alphas_and_conv_shapes(sd1):
    net = create_network(sd1, spec(network_type="c3lier", conv_rank=2, conv_alpha=1.0))
    by_name = {m.lora_name: m for m in net.unet_modules}
    conv3 = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv3.rank == 2 and conv3.scale == 0.5
    assert conv3.lora_down.kernel_size == (3, 3) and conv3.lora_down.padding == (1, 1)
    assert conv3.lora_up.kernel_size == (1, 1)
    down = by_name["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert down.lora_down.stride == (2, 2)
    shortcut = by_name["lora_unet_down_blocks_1_resnets_0_conv_shortcut"]
    assert shortcut.rank == 4 and shortcut.lora_down.kernel_size == (1, 1) and shortcut.scale == 0.5
    linear = by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert isinstance(linear.lora_down, nn.Linear) and linear.rank == 4
    assert torch.count_nonzero(linear.lora_up.weight) == 0 and torch.count_nonzero(linear.lora_down.weight) > 0
    bound = 1 / math.sqrt(linear.lora_down.in_features)  # Kaiming-uniform with a = √5
    assert linear.lora_down.weight.abs().max() <= bound
    fallback = create_network(sd1, spec(network_type="c3lier", alpha=0))
    conv = {m.lora_name: m for m in fallback.unet_modules}["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.rank == 4 and conv.scale == 1.0


def test_loha_shapes_and_maths(sd1):
    net = create_network(sd1, spec(network_type="loha", rank=3, blocks=("IN01", "IN04")))
    randomize(net)
    by_name = {m.lora_name: m for m in net.unet_modules}
    conv = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]  # 3x3, 32 -> 32: Tucker
    assert conv.hada_t1.shape == (3, 3, 3, 3) and conv.hada_w1_a.shape == (3, 32) and conv.hada_w1_b.shape == (3, 32)
    expected = torch.einsum("ijkl,jr,ip->prkl", conv.hada_t1, conv.hada_w1_b, conv.hada_w1_a) * \
        torch.einsum("ijkl,jr,ip->prkl", conv.hada_t2, conv.hada_w2_b, conv.hada_w2_a)
    torch.testing.assert_close(conv.diff_weight(), expected)
    shortcut = by_name["lora_unet_down_blocks_1_resnets_0_conv_shortcut"]  # 1x1, 32 -> 64: plain pairs
    assert shortcut.hada_w1_a.shape == (64, 3) and shortcut.hada_w1_b.shape == (3, 32)
    assert not hasattr(shortcut, "hada_t1")
    linear = by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    plain = (linear.hada_w1_a @ linear.hada_w1_b) * (linear.hada_w2_a @ linear.hada_w2_b)
    torch.testing.assert_close(linear.diff_weight(), plain)
    net.apply_to()
    try:
        x = torch.randn(5, 32)
        layer = linear.org_module
        want = nn.functional.linear(x, layer.weight, layer.bias) + linear.scale * (x @ plain.T)
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    finally:
        net.remove()


@pytest.mark.parametrize("net_type", ["lierla", "c3lier", "loha"])
def test_multiplier_zero_is_the_base_and_lora_is_linear(sd1, net_type):
    inputs = unet_inputs(sd1)
    base = unet_out(sd1.unet, inputs)
    base_te = te_out(sd1.text_encoders[0])
    net = create_network(sd1, spec(network_type=net_type))
    randomize(net)
    net.apply_to()
    try:
        assert not torch.equal(unet_out(sd1.unet, inputs), base)
        net.multiplier = 0
        assert torch.equal(unet_out(sd1.unet, inputs), base) and torch.equal(te_out(sd1.text_encoders[0]), base_te)
        net.set_multiplier(unet=0.0, te=1.0)
        assert torch.equal(unet_out(sd1.unet, inputs), base) and not torch.equal(te_out(sd1.text_encoders[0]), base_te)
        module = next(m for m in net.unet_modules if isinstance(m.org_module, nn.Linear))
        layer = module.org_module
        x = torch.randn(3, layer.in_features)
        y0 = nn.functional.linear(x, layer.weight, layer.bias)
        module.multiplier = 1.0
        d = layer(x) - y0
        assert d.abs().max() > 0
        for m in (2.0, -1.0, 0.5):
            module.multiplier = m
            torch.testing.assert_close(layer(x), y0 + m * d, atol=1e-6, rtol=1e-5)
        net.set_multiplier(unet=0.0)
        with net.multiplier_as(0.0):
            assert torch.equal(unet_out(sd1.unet, inputs), base)
        assert net.unet_modules[0].multiplier == 0.0 and net.te_modules[0].multiplier == 1.0
    finally:
        net.remove()
    assert torch.equal(unet_out(sd1.unet, inputs), base)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", None, True])
def test_multiplier_must_be_a_finite_number(sd1, bad):
    net = create_network(sd1, spec())
    with pytest.raises(ValueError, match="finite number"):
        net.multiplier = bad


def test_two_networks_stack_and_remove_in_reverse(sd1):
    inputs = unet_inputs(sd1)
    base = unet_out(sd1.unet, inputs)
    first = create_network(sd1, spec(network_type="lierla"))
    second = create_network(sd1, spec(network_type="c3lier", rank=2, blocks=("IN01", "OUT05")))  # partial overlap
    randomize(first, seed=1)
    randomize(second, seed=2)
    first.apply_to()
    only_first = unet_out(sd1.unet, inputs)
    second.apply_to()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    m1, m2 = getattr(first, name), getattr(second, name)
    layer = m1.org_module
    x = torch.randn(4, layer.in_features)
    y0 = nn.functional.linear(x, layer.weight, layer.bias)
    d1 = m1.lora_up(m1.lora_down(x)) * m1.scale
    d2 = m2.lora_up(m2.lora_down(x)) * m2.scale
    torch.testing.assert_close(layer(x), y0 + d1 + d2)
    both = unet_out(sd1.unet, inputs)
    assert not torch.equal(both, only_first)
    with pytest.raises(RuntimeError, match="reverse order"):
        first.remove()
    assert torch.equal(unet_out(sd1.unet, inputs), both)  # the refused remove changed nothing
    second.remove()
    assert torch.equal(unet_out(sd1.unet, inputs), only_first)
    first.remove()
    assert torch.equal(unet_out(sd1.unet, inputs), base)
    assert not any("forward" in mod.__dict__ for mod in sd1.unet.modules())


def test_training_touches_only_the_network(sd1):
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    net = create_network(sd1, spec(network_type="c3lier", train_text_encoder=False))
    net.apply_to()
    try:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, t, c, kw = unet_inputs(sd1)
        loss = sd1.unet(x, t, c, **kw).sample.pow(2).mean()
        loss.backward()
        assert all(p.grad is not None for p in net.parameters())
        assert any(torch.count_nonzero(m.lora_up.weight.grad) > 0 for m in net.unet_modules)
        opt.step()
    finally:
        net.remove()
    assert all(torch.equal(before[k], v) for k, v in sd1.unet.state_dict().items())
    assert not any(p.requires_grad for p in sd1.unet.parameters())


def test_param_groups(sd1):
    net = create_network(sd1, spec(network_type="lierla"))
    groups = net.param_groups(unet_lr=1e-4, te_lr=5e-5)
    assert [g["name"] for g in groups] == ["text_encoder", "unet"] and [g["lr"] for g in groups] == [5e-5, 1e-4]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()) and len(set(ids)) == len(ids)
    assert [g["lr"] for g in net.param_groups(unet_lr=1e-4, te_lr=None)] == [1e-4, 1e-4]
    assert [g["name"] for g in create_network(sd1, spec(train_text_encoder=False)).param_groups(1e-4)] == ["unet"]
    assert "72 U-Net modules, 12 text-encoder modules" in net.describe()


def test_dtype_of_trainable_parameters(sd1):
    net = create_network(sd1, spec(network_type="loha", dtype=torch.bfloat16))
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}


def test_torch_state_dict_has_kohya_keys_and_reloads_alpha(sd1):
    net = create_network(sd1, spec())
    state = net.state_dict()
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= set(state)
    assert state[f"{key}.alpha"].shape == ()
    state[f"{key}.alpha"] = torch.tensor(1.0)
    other = create_network(sd1, spec())
    other.load_state_dict(state)
    assert getattr(other, key).scale == 0.25


@pytest.mark.parametrize("kwargs, message", [
    (dict(network_type="lora"), "`network_type` is 'lora'"),
    (dict(element="Cross"), "`network_element` is 'Cross'"),
    (dict(rank=0), "`network_rank` is 0"),
    (dict(rank=4.5), "`network_rank` is 4.5"),
    (dict(conv_rank=-1), "`network_conv_rank` is -1"),
    (dict(alpha=-1.0), "`network_alpha` is -1.0"),
    (dict(conv_alpha=float("nan")), "`network_conv_alpha` is nan"),
    (dict(blocks=("IN01", "IN99")), r"unknown block id\(s\) \['IN99'\]"),
    (dict(blocks="IN01"), "must be a list of block ids"),
    (dict(dtype=torch.int8), "floating torch.dtype"),
])
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetworkSpec(**kwargs)


def test_applying_twice_and_module_kinds(sd1):
    net = create_network(sd1, spec(network_type="c3lier"))
    assert isinstance(net, Network) and all(isinstance(m, LoRAModule) for m in net.all_modules)
    assert all(isinstance(m, LoHaModule) for m in create_network(sd1, spec(network_type="loha")).all_modules)
    net.apply_to()
    try:
        with pytest.raises(RuntimeError, match="already applied"):
            net.apply_to()
    finally:
        net.remove()
    with pytest.raises(RuntimeError, match="not applied"):
        net.unet_modules[0](torch.randn(1, 32, 8, 8))


@pytest.mark.parametrize("net_type", ["c3lier", "loha"])
def test_fp32_network_on_a_bf16_model(net_type):
    bundle = tiny_bundle("sd1").to(dtype=torch.bfloat16)
    net = create_network(bundle, spec(network_type=net_type, train_text_encoder=False))
    randomize(net)
    net.apply_to()
    try:
        x, t, c, kw = unet_inputs(bundle)
        out = bundle.unet(x.bfloat16(), t, c.bfloat16()).sample
        assert out.dtype == torch.bfloat16
        out.float().pow(2).mean().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    finally:
        net.remove()


def test_loha_without_lycoris_says_how_to_install_it_and_lierla_still_works(sd1, monkeypatch):
    import sys

    from trainer.compat import MissingPackageError, install_command
    from trainer.config import ConfigError, TrainConfig

    for name in [m for m in sys.modules if m == "lycoris" or m.startswith("lycoris.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lycoris", None)  # not installed
    with pytest.raises(MissingPackageError) as caught:
        create_network(sd1, spec(network_type="loha"))
    assert install_command("lycoris-lora>=3.0") in str(caught.value) and "LoHa" in str(caught.value)
    config = TrainConfig.from_dict({"mode": "iLECO", "original_prompt": "a cat", "network_type": "loha"})
    with pytest.raises(ConfigError, match="network_type loha: LoHa networks .*lycoris-lora"):
        config.check_for_run()
    TrainConfig.from_dict({"mode": "iLECO", "original_prompt": "a cat"}).check_for_run()
    assert create_network(sd1, spec(network_type="lierla")).all_modules
