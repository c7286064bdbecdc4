"""The encoder weight contract between pretraining and the downstream trainers.

An encoder checkpoint holds the state dict of ``network.encoder`` (the stem and every encoder
stage of a dynamic-network-architectures U-Net; keys relative to ``encoder``) and its provenance.
A downstream network built from the same plans loads it strictly *inside its encoder*, and only
when the architecture matches; otherwise the load is refused with a message naming what differs.
Keys are never filtered by substring (``decoder.encoder.*`` aliases the encoder in a U-Net's
state dict).

Format 2 (``orthodiff-encoder/2``) makes the pretraining's timestep conditioning part of the
contract: the state dict holds each stage's ``film_scale``/``film_shift`` buffers, the FiLM of the
pretrained denoiser at the reference timestep (provenance ``reference_timestep``, default 0), and
``conditioning`` holds the time MLP and encoder FiLM layers, so a consumer that reads noised input
at another timestep (the classifier's ``--noise-timestep``) sets the affine of that timestep
(:func:`load_encoder`'s ``timestep``). A loaded encoder therefore computes exactly what the
pretrained network's encoder computed at that timestep. Format-1 files (weights only) are refused:
loaded, their encoder would run with scale = shift = 0, a state the pretraining never saw.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from orthodiff_nnunet import __version__
from orthodiff_nnunet.errors import OrthodiffError
from orthodiff_nnunet.networks.conditioning import (EncoderConditioning, TimestepConditionedNetwork,
                                                    install_stage_affine, set_stage_affine)
from orthodiff_nnunet.utils import to_plain

FORMAT = "orthodiff-encoder/2"
OLD_FORMATS = ("orthodiff-encoder/1",)


class EncoderMismatchError(OrthodiffError):
    """An encoder checkpoint does not fit the network it is loaded into."""


@dataclass
class EncoderLoadReport:
    """What was loaded: counts and, on refusal, the differences."""

    tensors: int = 0
    parameters: int = 0
    provenance: dict = field(default_factory=dict)
    timestep: int | None = None

    def summary(self) -> str:
        p = self.provenance
        head = (f"loaded {self.tensors} encoder tensors ({self.parameters / 1e6:.2f} M values) pretrained on "
                f"{p.get('dataset', '?')} ({p.get('orientation', '?')}, {p.get('iterations', '?')} iterations, "
                f"{p.get('scans', '?')} scans, ")
        if p.get("conditioned", True) is False:  # e.g. the masked-autoencoder control: nothing depends on t
            return head + f"{p.get('objective', '?')} objective), no timestep conditioning (identity affine)"
        return head + (f"{(p.get('schedule') or {}).get('name', '?')} schedule), "
                       f"timestep conditioning of t={self.timestep}")


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


def export_encoder(network: nn.Module, path: Path, provenance: dict, reference_timestep: int = 0) -> Path:
    """Write the encoder state dict, its conditioning and provenance to ``path`` atomically (CPU tensors).

    Args:
        network: the (EMA) denoiser, a :class:`TimestepConditionedNetwork`; a plain U-Net (never
            conditioned) is exported with the identity affine and no conditioning.
        path: where to write ``encoder.pt``.
        provenance: what the encoder was trained on (written as given, plus versions and time).
        reference_timestep: the timestep whose FiLM is folded into the stage buffers (0: clean input).
    """
    if not provenance.get("architecture_hash"):
        raise ValueError("export_encoder needs provenance['architecture_hash'] (networks.build.architecture_hash of "
                         "the plans' configuration): consumers refuse an encoder that does not say what it fits")
    cond_net = network
    for attr in ("module", "_orig_mod"):
        cond_net = getattr(cond_net, attr, cond_net)
    conditioning = cond_net.encoder_conditioning() if isinstance(cond_net, TimestepConditionedNetwork) else None
    encoder = copy.deepcopy(encoder_of(network)).cpu().float()
    set_stage_affine(encoder, conditioning.affine(reference_timestep) if conditioning is not None else None)
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    payload = {
        "format": FORMAT,
        "state_dict": state,
        "conditioning": conditioning.to_payload() if conditioning is not None else None,
        "provenance": {**to_plain(provenance), "reference_timestep": int(reference_timestep),
                       "conditioned": conditioning is not None,
                       "orthodiff_version": __version__, "nnunetv2_version": _nnunet_version(),
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
    payload = safe_torch_load(path, "encoder checkpoint", EncoderMismatchError)
    if isinstance(payload, dict) and payload.get("format") in OLD_FORMATS:
        raise EncoderMismatchError(
            f"{path} is an {payload['format']} encoder (weights only): without the pretraining's timestep "
            "conditioning its stages would run with scale = shift = 0, a state the pretraining never saw. "
            "Re-export it: run the same `orthodiff pretrain` command with --resume in its pretraining folder "
            "(the checkpoint there holds the conditioning; no iterations are repeated)")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise EncoderMismatchError(f"{path} is not an orthodiff encoder checkpoint (format {FORMAT})")
    if not (payload.get("provenance") or {}).get("architecture_hash"):
        raise EncoderMismatchError(
            f"{path} records no architecture hash, so nothing tells which network it fits: re-export it with the "
            "same `orthodiff pretrain` command and --resume in its pretraining folder")
    return payload


def safe_torch_load(path: Path, what: str, error: type[Exception]) -> object:
    """``torch.load`` with ``weights_only=True``: tensors and plain values only, never pickled code.

    Encoder and classifier checkpoints travel between sites; a pickle can run arbitrary code when it is
    loaded, and their payload needs nothing beyond tensors, dicts, lists, strings and numbers.

    Raises:
        error: naming the file when it holds anything else (or is not a torch file at all).
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(f"{path} is not a plain {what}: it holds objects other than tensors and plain values, and "
                    f"loading it could run code from the file ({str(exc).splitlines()[0][:200]}). Use a {what} "
                    "written by orthodiff, or ask its sender to re-export it") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise error(f"{path} cannot be read as a {what} ({exc.__class__.__name__}: {str(exc)[:200]}); the file "
                    "may be truncated: copy it again or re-export it") from exc


def conditioning_of(payload: dict) -> EncoderConditioning | None:
    """The checkpoint's time MLP and encoder FiLM layers (None: the encoder was never conditioned)."""
    c = payload.get("conditioning")
    return EncoderConditioning.from_payload(c) if c else None


def load_encoder(network: nn.Module, path: Path, architecture_hash: str | None = None,
                 timestep: int | None = None) -> EncoderLoadReport:
    """Load an encoder checkpoint strictly into ``network.encoder``; the decoder is untouched.

    The encoder gets the contract's stage affine buffers if it lacks them, and they are loaded with
    the rest: the pretrained conditioning at the reference timestep, or at ``timestep``.

    Args:
        network: the downstream network (built from the same plans).
        path: encoder checkpoint written by :func:`export_encoder`.
        architecture_hash: the downstream configuration's architecture hash; when given, it must equal
            the checkpoint's.
        timestep: the timestep of the input the consumer feeds (None: the checkpoint's reference one).

    Raises:
        EncoderMismatchError: naming the differing architecture, missing/unexpected keys or shapes.
    """
    payload = read_encoder_checkpoint(path)
    prov = payload.get("provenance", {})
    if architecture_hash is not None and prov["architecture_hash"] != architecture_hash:
        raise EncoderMismatchError(
            f"encoder {path} was pretrained with architecture {prov.get('architecture_hash')} "
            f"({prov.get('plans_identifier')}, {prov.get('orientation')}), this network has {architecture_hash}: "
            "preprocess this dataset with the pretraining dataset's plans (--plans-from) or pretrain on these plans"
        )
    encoder = install_stage_affine(encoder_of(network))
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
    reference = int(prov.get("reference_timestep", 0))
    if timestep is not None and int(timestep) != reference:
        # an encoder that was never conditioned (conditioning None, e.g. the MAE control) computed the same
        # function at every timestep: the identity affine it was exported with is right at any t
        cond = conditioning_of(payload)
        set_stage_affine(encoder, cond.affine(int(timestep)) if cond is not None else None)
    return EncoderLoadReport(tensors=len(incoming), parameters=sum(v.numel() for v in incoming.values()), provenance=prov,
                             timestep=reference if timestep is None else int(timestep))


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")
