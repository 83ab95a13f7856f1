"""``python -m trainer layout``: which modules a network setting trains on a full-size model.

The network is created with the chosen type, element and blocks on the family's architecture
built on the meta device (``trainer.hosts.meta.meta_bundle``: no weights, seconds), and every module
is printed with its saved name (kohya's, or Z-Image's ``diffusion_model.<path>``) and the shape of
its weight delta (Flux's fused ``qkv``/``linear1`` modules: the fused layer's shape).
"""

from __future__ import annotations

import sys

from trainer.hosts.meta import meta_bundle


def _shape(module) -> tuple:
    return tuple(module.weight_shape)  # a fused transformer module: the fused layer's shape


def layout_command(family: str, network_type: str, element: str, blocks: str | None) -> int:
    from trainer.config.choices import NETWORK_ELEMENTS, NETWORK_TYPES, TEXT_ENCODER_IDS
    from trainer.families import get_family
    from trainer.network.network import NetworkSpec, create_network

    try:
        fam = get_family(family)
        if network_type not in NETWORK_TYPES:
            raise ValueError(f"--network-type {network_type!r}: choose one of {', '.join(NETWORK_TYPES)}")
        if element not in NETWORK_ELEMENTS:
            raise ValueError(f"--element {element!r}: choose one of {', '.join(NETWORK_ELEMENTS)}")
        # default: every block; on Flux / Z-Image not the text encoders (named only when wanted, as in a run)
        chosen = ([b.strip() for b in blocks.split(",") if b.strip()] if blocks else
                  [b for b in fam.block_ids if b not in fam.text_encoder_ids])
        bad = [b for b in chosen if b not in fam.block_ids]
        if bad:
            raise ValueError(f"--blocks: {', '.join(bad)} not in the {fam.title} block list "
                             f"({', '.join(fam.block_ids)})")
        bundle = meta_bundle(family)
        spec = NetworkSpec(network_type=network_type, rank=4, alpha=4.0, element=element, blocks=chosen,
                           train_text_encoder=any(b in TEXT_ENCODER_IDS for b in chosen))
        net = create_network(bundle, spec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = 0
    for m in net.all_modules:
        print(f"{m.file_name}  {list(_shape(m))}  rank {m.rank}  block {getattr(m, 'block', '') or 'BASE'}")
        params += sum(p.numel() for p in m.parameters())
    print("# parameters counted at rank 4; they scale linearly with the rank")
    print(f"modules: {len(net.all_modules)}  parameters: {params}")
    return 0
