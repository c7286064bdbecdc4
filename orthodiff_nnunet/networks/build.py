"""Build the plans' network (the architecture is data: class path + kwargs in the plans)."""

from __future__ import annotations

import copy
import hashlib
import json

from torch import nn


def architecture_of(plans: dict, configuration: str) -> dict:
    """The resolved ``architecture`` block of a configuration (following ``inherits_from``)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(copy.deepcopy(plans)).get_configuration(configuration)
    return {"network_class_name": cm.network_arch_class_name, "arch_kwargs": cm.network_arch_init_kwargs,
            "_kw_requires_import": list(cm.network_arch_init_kwargs_req_import)}


def architecture_hash(architecture: dict) -> str:
    """Stable hash of class name and kwargs: two networks with equal hashes have equal topology."""
    blob = json.dumps(architecture, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_network(
    plans: dict,
    configuration: str,
    input_channels: int,
    output_channels: int,
    deep_supervision: bool = False,
) -> nn.Module:
    """The configuration's network, through nnU-Net's own builder."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = architecture_of(plans, configuration)
    return get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], input_channels,
        output_channels, allow_init=True, deep_supervision=deep_supervision,
    )
