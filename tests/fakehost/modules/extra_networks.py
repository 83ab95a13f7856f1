"""Fake ``modules.extra_networks``: ``<name:args>`` tags in a prompt, and their networks activated."""

import re

extra_network_registry = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = {}

    def found(m):
        res.setdefault(m.group(1), []).append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def activate(p, extra_network_data):
    """Every registered network is activated, with [] when the prompt names none of it."""
    for name, extra_network in extra_network_registry.items():
        extra_network.activate(p, extra_network_data.get(name, []))


def deactivate(p, extra_network_data):
    for extra_network in extra_network_registry.values():
        extra_network.deactivate(p)
