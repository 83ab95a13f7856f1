"""Start a network from an existing file (``network_resume``, SPEC §6.4).

- lierla/c3lier: modules are created only for the layers the file has, with the file's rank and
  alpha; the block and element choices are not applied. Text-encoder entries are used only when
  the spec trains that text encoder (its id selected: ``BASE``, Flux's ``CLIP``/``T5``), and skipped otherwise.
- loha: modules are created as the spec says (filters applied), with the file's ranks; layers
  the file lacks get no module, and file entries outside the selection are skipped.
Only weights are restored: no optimizer state, step count or scheduler position.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from trainer.network.io import internal_keys, load_network_weights, read_network_file
from trainer.network.network import Network, NetworkSpec, Target, find_targets, select_targets


def _module_names(state: Mapping[str, torch.Tensor]) -> set[str]:
    return {key.split(".", 1)[0] for key in state}


def _rank_alpha(state: Mapping[str, torch.Tensor], name: str, loha: bool) -> tuple[int, float]:
    rank = int(state[f"{name}.hada_w1_b" if loha else f"{name}.lora_down.weight"].shape[0])
    alpha = state.get(f"{name}.alpha")
    return rank, (float(alpha.float().item()) if alpha is not None else float(rank))


def _candidates(bundle: Any, spec: NetworkSpec) -> list[Target]:
    targets = find_targets(bundle.family, bundle.unet, list(bundle.text_encoders or []), spec.network_type)
    if spec.network_type == "loha":
        return select_targets(targets, spec, bundle.family)
    return [t for t in targets if not t.is_te or spec.keeps_text_encoder(t.block)]


def _check_file_fits(bundle: Any, spec: NetworkSpec, names: set[str], loha_file: bool, where: str) -> None:
    if loha_file != (spec.network_type == "loha"):
        kind = "a LoHa" if loha_file else "a LoRA/LoCon"
        raise ValueError(f"{where} holds {kind} network, but network_type is {spec.network_type}; "
                         f"set network_type to {'loha' if loha_file else 'lierla or c3lier'}")
    widest = find_targets(bundle.family, bundle.unet, list(bundle.text_encoders or []), "c3lier")
    foreign = sorted(names - {t.lora_name for t in widest})
    if foreign:
        raise ValueError(f"{where} has {len(foreign)} module(s) this {bundle.family.title} model does not have, "
                         f"e.g. {foreign[:3]}; was it trained for another model family?")
    if spec.network_type == "lierla":
        conv = sorted(t.lora_name for t in widest if t.lora_name in names and not _is_lierla_layer(t))
        if conv:
            raise ValueError(f"{where} has ResNet/sampler conv modules (e.g. {conv[:2]}), which lierla cannot hold; "
                             "set network_type to c3lier")


def _is_lierla_layer(target: Target) -> bool:
    return target.is_te or target.elements is not None or ".attentions." in target.path


def resume_network(bundle: Any, spec: NetworkSpec,
                   source: str | os.PathLike | Mapping[str, torch.Tensor]) -> Network:
    """Build (not apply) a network whose modules and weights come from ``source`` (file or state dict).

    The returned network's ``skipped_modules`` lists the file's module names that were not used.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    state = read_network_file(source)[0] if isinstance(source, (str, os.PathLike)) else dict(source)
    state = internal_keys(state)
    names = _module_names(state)
    loha = any(".hada_" in key for key in state)
    _check_file_fits(bundle, spec, names, loha, where)
    kept = [t for t in _candidates(bundle, spec) if t.lora_name in names]
    if not kept:
        raise ValueError(f"no module of {where} fits the selected blocks/text-encoder setting; nothing to resume")
    ranks = {t.lora_name: _rank_alpha(state, t.lora_name, loha) for t in kept}
    net = Network(bundle.family, spec, kept, ranks)
    used = {t.lora_name for t in kept}
    weights = {k: v for k, v in state.items() if k.split(".", 1)[0] in used}
    for name in used:  # a file without alpha means alpha = rank (kohya)
        weights.setdefault(f"{name}.alpha", torch.tensor(float(ranks[name][0])))
    load_network_weights(net, weights, strict=True)
    net.skipped_modules = sorted(names - used)
    return net
