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
    """The configuration's network, through nnU-Net's own builder, with the encoder contract's stage
    affine (identity until an encoder is loaded; :mod:`orthodiff_nnunet.networks.conditioning`)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from orthodiff_nnunet.networks.conditioning import install_stage_affine

    arch = architecture_of(plans, configuration)
    net = get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], input_channels,
        output_channels, allow_init=True, deep_supervision=deep_supervision,
    )
    install_stage_affine(net.encoder)
    return net


def shrink_architecture(plans: dict, configurations: list[str], max_features: int = 8, max_stages: int = 3,
                        max_blocks_per_stage: int = 1, max_batch_size: int | None = 2,
                        feature_divisor: int | None = None, min_features: int = 4) -> dict:
    """A copy of ``plans`` whose configurations use a tiny network (for CPU tests and the demo).

    Per configuration the U-Net keeps its first ``max_stages`` stages (kernels, strides, convs
    per stage), caps the feature count at ``max_features`` and the residual blocks per stage at
    ``max_blocks_per_stage``, and every configuration's batch at ``max_batch_size``; the patch
    size is left as planned (it stays divisible by the reduced total stride).

    With ``feature_divisor`` the planned features are divided by it instead (at least
    ``min_features``; ``max_features`` still caps them): the plans' doubling per stage is kept, so
    the full-resolution stage, where a 3D U-Net spends most of its time, is the thinnest and the
    deep, low-resolution stages keep more channels than a flat cap would give them. E.g. nnU-Net's
    32-64-128-256-320 divided by 8 is 4-8-16-32-40 (about a third of the CPU time per step of a flat
    cap at 16, on the demo's 20x96x96 patches).
    """
    plans = copy.deepcopy(plans)
    if max_batch_size is not None:
        for c in plans["configurations"].values():
            if "batch_size" in c:
                c["batch_size"] = min(int(c["batch_size"]), max_batch_size)
    for name in configurations:
        if "architecture" not in plans["configurations"][name]:
            continue  # inherits its parent's (shrunk) architecture
        kw = plans["configurations"][name]["architecture"]["arch_kwargs"]
        n = min(max_stages, int(kw["n_stages"]))
        kw["n_stages"] = n
        for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
            if key in kw and isinstance(kw[key], list):
                kw[key] = kw[key][:n]
        if feature_divisor:
            kw["features_per_stage"] = [min(max(int(f) // int(feature_divisor), int(min_features)), max_features)
                                        for f in kw["features_per_stage"]]
        else:
            kw["features_per_stage"] = [min(int(f), max_features) for f in kw["features_per_stage"]]
        if isinstance(kw.get("n_blocks_per_stage"), list):
            kw["n_blocks_per_stage"] = [min(int(b), max_blocks_per_stage) for b in kw["n_blocks_per_stage"]]
        if isinstance(kw.get("n_conv_per_stage_decoder"), list):
            kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][: n - 1]
        if "pool_op_kernel_sizes" in plans["configurations"][name]:
            plans["configurations"][name]["pool_op_kernel_sizes"] = plans["configurations"][name]["pool_op_kernel_sizes"][:n]
        if "conv_kernel_sizes" in plans["configurations"][name]:
            plans["configurations"][name]["conv_kernel_sizes"] = plans["configurations"][name]["conv_kernel_sizes"][:n]
    return plans


def write_shrunk_plans(preprocessed_dataset: "Path", plans_identifier: str, new_identifier: str,
                       max_features: int = 8, max_stages: int = 3, max_blocks_per_stage: int = 1,
                       max_batch_size: int | None = 2, feature_divisor: int | None = None) -> str:
    """Save a tiny-network copy of a plans file beside it (same preprocessed data); returns its identifier.

    For CPU tests and the demo: the real code path with a network small enough for 2 cores
    (arguments as :func:`shrink_architecture`).
    """
    from pathlib import Path

    from orthodiff_nnunet.utils import atomic_write_json, load_json

    folder = Path(preprocessed_dataset)
    plans = load_json(folder / f"{plans_identifier}.json")
    configs = [n for n, c in plans["configurations"].items() if "architecture" in c]
    small = shrink_architecture(plans, configs, max_features, max_stages, max_blocks_per_stage, max_batch_size,
                                feature_divisor=feature_divisor)
    small["plans_name"] = new_identifier
    atomic_write_json(folder / f"{new_identifier}.json", small)
    return new_identifier
