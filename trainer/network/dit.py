"""Which layers of a flow-matching transformer (Flux.1, Z-Image) get a module, and their saved names.

The trainer runs diffusers' transformers (``FluxTransformer2DModel``, ``ZImageTransformer2DModel``);
the files must use the names the generation UIs load:

- **Flux**: kohya's Flux layout, the names sd-scripts' ``networks/lora_flux.py`` gives the Linear
  layers of the original (BFL) ``DoubleStreamBlock`` and ``SingleStreamBlock``: 10 per double block
  (``img_attn_qkv``, ``img_attn_proj``, ``img_mlp_0``, ``img_mlp_2``, ``img_mod_lin`` and the same
  five for ``txt_``) and 3 per single block (``linear1``, ``linear2``, ``modulation_lin``), prefix
  ``lora_unet``. diffusers splits two of those layers: ``img_attn.qkv`` is ``attn.to_q/to_k/to_v``
  (``txt_attn.qkv`` is ``attn.add_q_proj/...``) and a single block's ``linear1`` is
  ``attn.to_q/to_k/to_v`` + ``proj_mlp``. Such a kohya module is *fused*: one ``lora_down`` and one
  ``lora_up`` whose rows are the concatenated outputs of the parts, each part adding its slice; the
  saved file then holds exactly the dense module sd-scripts writes (its ``split_qkv=False`` form), which
  diffusers' kohya-Flux converter splits back and ComfyUI/Forge apply to the fused weight as it is.
- **Z-Image**: the Linear layers of every main ``ZImageTransformerBlock`` (``layers.<i>``:
  ``attention.to_q/to_k/to_v/to_out.0``, ``feed_forward.w1/w2/w3``, ``adaLN_modulation.0``), saved under
  ``diffusion_model.<diffusers path>``: the form diffusers' Z-Image loader reads and ComfyUI's
  Lumina2/Z-Image key map (``z_image_to_diffusers``) points at the slices of the checkpoint's fused
  ``attention.qkv``. The noise and context refiners get no modules (as the reference).

Block ids (SPEC.md §3.2): Flux double block i is ``D<ii>``, single block i ``S<ii>``; Z-Image layer i
is ``S<ii>``. ``IN``/``OUT`` (embedders, final layer) and the text-encoder ids get no module: text
encoders of these families are not trained (their outputs are cached).

``network_element`` on these families: ``SelfAttention`` keeps the image stream's attention
projections (Flux ``img_attn_qkv``/``img_attn_proj``), ``CrossAttention`` the text stream's, through
which the prompt enters the joint attention (Flux ``txt_attn_qkv``/``txt_attn_proj``). Z-Image attends
over one joint sequence of image and text tokens, so both keep its ``attention.*`` projections. Flux
single blocks fuse attention with the MLP in ``linear1``, so only ``Full`` trains them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SELF, CROSS = "attn1", "attn2"  # the element tokens network.py filters on

# kohya name under double_blocks_<i>, diffusers paths under transformer_blocks.<i>., element tokens
FLUX_DOUBLE = (
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), (SELF,)),
    ("img_attn_proj", ("attn.to_out.0",), (SELF,)),
    ("img_mlp_0", ("ff.net.0.proj",), ()),
    ("img_mlp_2", ("ff.net.2",), ()),
    ("img_mod_lin", ("norm1.linear",), ()),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (CROSS,)),
    ("txt_attn_proj", ("attn.to_add_out",), (CROSS,)),
    ("txt_mlp_0", ("ff_context.net.0.proj",), ()),
    ("txt_mlp_2", ("ff_context.net.2",), ()),
    ("txt_mod_lin", ("norm1_context.linear",), ()),
)
# kohya name under single_blocks_<i>, diffusers paths under single_transformer_blocks.<i>.
FLUX_SINGLE = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ()),
    ("linear2", ("proj_out",), ()),
    ("modulation_lin", ("norm.linear",), ()),
)
# diffusers paths under layers.<i>.
ZIMAGE_LAYER = (
    ("attention.to_q", (SELF, CROSS)), ("attention.to_k", (SELF, CROSS)), ("attention.to_v", (SELF, CROSS)),
    ("attention.to_out.0", (SELF, CROSS)),
    ("feed_forward.w1", ()), ("feed_forward.w2", ()), ("feed_forward.w3", ()),
    ("adaLN_modulation.0", ()),
)
ZIMAGE_FILE_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class DitTarget:
    """One module of a transformer network: its name, the diffusers layers it covers, block, elements."""

    lora_name: str        # internal (and, for Flux, saved) name; never contains a dot
    file_name: str        # the module name in the saved file
    paths: tuple          # diffusers module paths, in the order of the fused layer's output rows
    layers: tuple         # the nn.Linear layers at those paths
    block: str
    elements: tuple


def _count(model: nn.Module, attr: str) -> int:
    blocks = getattr(model, attr, None)
    return len(blocks) if blocks is not None else 0


def dit_targets(family_name: str, model: nn.Module) -> list[DitTarget]:
    """Every module the family's network can have on ``model`` (block and element filters not applied)."""
    modules = dict(model.named_modules())

    def layers_of(paths):
        found = []
        for path in paths:
            layer = modules.get(path)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"the {family_name} transformer has no Linear layer {path!r}; "
                                 "is this the model family it claims to be?")
            found.append(layer)
        return tuple(found)

    out = []
    if family_name == "flux":
        for i in range(_count(model, "transformer_blocks")):
            for name, parts, elements in FLUX_DOUBLE:
                paths = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
                lora = f"lora_unet_double_blocks_{i}_{name}"
                out.append(DitTarget(lora, lora, paths, layers_of(paths), f"D{i:02d}", elements))
        for i in range(_count(model, "single_transformer_blocks")):
            for name, parts, elements in FLUX_SINGLE:
                paths = tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
                lora = f"lora_unet_single_blocks_{i}_{name}"
                out.append(DitTarget(lora, lora, paths, layers_of(paths), f"S{i:02d}", elements))
    elif family_name == "zimage":
        for i in range(_count(model, "layers")):
            for part, elements in ZIMAGE_LAYER:
                path = f"layers.{i}.{part}"
                lora = "lora_unet_" + path.replace(".", "_")
                out.append(DitTarget(lora, ZIMAGE_FILE_PREFIX + path, (path,), layers_of((path,)),
                                     f"S{i:02d}", elements))
    else:
        raise ValueError(f"{family_name!r} is not a transformer family")
    return out


_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a",
             "hada_w2_b", "hada_t1", "hada_t2")


# The original extension writes Z-Image files with ``.lora.down.weight`` / ``.lora.up.weight`` (SPEC.md §6.2).
_REFERENCE_SUFFIXES = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight"}


def internal_key(key: str) -> str:
    """The internal key of a saved key: ``diffusion_model.layers.0.attention.to_q.alpha`` ->
    ``lora_unet_layers_0_attention_to_q.alpha`` (the original extension's ``.lora.down.weight`` spelling
    too); kohya keys are returned as they are."""
    if not key.startswith(ZIMAGE_FILE_PREFIX):
        return key
    body = key[len(ZIMAGE_FILE_PREFIX):]
    for theirs, ours in _REFERENCE_SUFFIXES.items():
        if body.endswith(theirs):
            body = body[: -len(theirs)] + ours
    for suffix in _SUFFIXES:
        if body.endswith("." + suffix):
            module = body[: -len(suffix) - 1]
            return f"lora_unet_{module.replace('.', '_')}.{suffix}"
    return key
