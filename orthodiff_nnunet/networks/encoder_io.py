"""The encoder weight contract between pretraining and the downstream trainers.

An encoder checkpoint holds the state dict of ``network.encoder`` (the stem and every encoder
stage of a dynamic-network-architectures U-Net; keys relative to ``encoder``) and its provenance.
A downstream network built from the same plans loads it strictly *inside its encoder*, and only
when the architecture matches; otherwise the load is refused with a message naming what differs.
Keys are never filtered by substring (``decoder.encoder.*`` aliases the encoder in a U-Net's
state dict).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from orthodiff_nnunet import __version__
from orthodiff_nnunet.errors import OrthodiffError

FORMAT = "orthodiff-encoder/1"


class EncoderMismatchError(OrthodiffError):
    """An encoder checkpoint does not fit the network it is loaded into."""


@dataclass
class EncoderLoadReport:
    """What was loaded: counts and, on refusal, the differences."""

    tensors: int = 0
    parameters: int = 0
    provenance: dict = field(default_factory=dict)

    def summary(self) -> str:
        p = self.provenance
        return (f"loaded {self.tensors} encoder tensors ({self.parameters / 1e6:.2f} M values) pretrained on "
                f"{p.get('dataset', '?')} ({p.get('orientation', '?')}, {p.get('iterations', '?')} iterations, "
                f"{p.get('scans', '?')} scans, {p.get('schedule', {}).get('name', '?')} schedule)")


def encoder_of(network: nn.Module) -> nn.Module:
    """``network.encoder`` of a (possibly compiled / DDP-wrapped / conditioned) U-Net."""
    mod = network
    for attr in ("module", "_orig_mod"):
        mod = getattr(mod, attr, mod)
    if hasattr(mod, "network") and not hasattr(mod, "encoder"):
        mod = mod.network  # TimestepConditionedNetwork
    if not hasattr(mod, "encoder"):
        raise EncoderMismatchError(f"{type(mod).__name__} has no 'encoder': a dynamic-network-architectures U-Net is needed")
    return mod.encoder


def export_encoder(network: nn.Module, path: Path, provenance: dict) -> Path:
    """Write the encoder state dict and provenance to ``path`` atomically (CPU tensors)."""
    state = {k: v.detach().cpu().clone() for k, v in encoder_of(network).state_dict().items()}
    payload = {
        "format": FORMAT,
        "state_dict": state,
        "provenance": {**provenance, "orthodiff_version": __version__, "nnunetv2_version": _nnunet_version(),
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_encoder_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EncoderMismatchError(f"encoder checkpoint {path} does not exist: run `orthodiff pretrain` first or fix the path")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise EncoderMismatchError(f"{path} is not an orthodiff encoder checkpoint (format {FORMAT})")
    return payload


def load_encoder(network: nn.Module, path: Path, architecture_hash: str | None = None) -> EncoderLoadReport:
    """Load an encoder checkpoint strictly into ``network.encoder``; the decoder is untouched.

    Args:
        network: the downstream network (built from the same plans).
        path: encoder checkpoint written by :func:`export_encoder`.
        architecture_hash: the downstream configuration's architecture hash; when given, it must equal
            the checkpoint's.

    Raises:
        EncoderMismatchError: naming the differing architecture, missing/unexpected keys or shapes.
    """
    payload = read_encoder_checkpoint(path)
    prov = payload.get("provenance", {})
    if architecture_hash is not None and prov.get("architecture_hash") not in (None, architecture_hash):
        raise EncoderMismatchError(
            f"encoder {path} was pretrained with architecture {prov.get('architecture_hash')} "
            f"({prov.get('plans_identifier')}, {prov.get('orientation')}), this network has {architecture_hash}: "
            "preprocess this dataset with the pretraining dataset's plans (--plans-from) or pretrain on these plans"
        )
    encoder = encoder_of(network)
    own = encoder.state_dict()
    incoming = payload["state_dict"]
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    shapes = [f"{k}: checkpoint {tuple(incoming[k].shape)} vs network {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(incoming)) if own[k].shape != incoming[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]})")
        raise EncoderMismatchError(f"encoder {path} does not fit this network: " + "; ".join(parts)
                                   + ". Build the network from the plans the encoder was pretrained with.")
    encoder.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in incoming.items()}, strict=True)
    return EncoderLoadReport(tensors=len(incoming), parameters=sum(v.numel() for v in incoming.values()), provenance=prov)


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")
