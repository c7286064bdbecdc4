"""Multi-view abnormality classifier on the plans' (diffusion-pretrained) encoders.

Per view (``sag``, ``cor``, ``ax``) a :class:`ViewBranch` runs the encoder of that orientation's
plans network (``build_network(plans, "3d_classification", ...).encoder``, the module the
pretraining exports and :func:`~orthodiff_nnunet.networks.encoder_io.load_encoder` fills) and
pools the last ``feature_stages`` stage outputs (default 1: the bottleneck, the method's "middle
block") with :class:`AttentionPooling` (attention-weighted sum plus global average, as in the
method's head). A fusion module maps the views' features to one logit per label:

* ``concat`` (default, the method's): the views' features are concatenated and a linear layer
  gives the logits. A missing view contributes a learned per-view placeholder vector instead of
  its features, so an exam without (say) its axial series is still predicted.
* ``gated`` (the method's option): every view gives its own logits and a per-label gate; the
  logits are averaged with softmax(gates) over the views *present* in that exam.

Noised input (the method reads features of the clean scan noised to a timestep ``t``): each
branch may noise its input with the pretraining schedule (``q_sample``) at a fixed timestep.
Noise is random in training and, in evaluation, the same seeded noise field for every exam
(deterministic and independent of batch composition).

Timestep conditioning: the pretrained network applied its timestep FiLM after every encoder stage
at every ``t``, ``t = 0`` included. The encoder contract (``encoder.pt`` format 2, see
:mod:`orthodiff_nnunet.networks.conditioning`) carries it as a constant per-stage affine, and
:func:`~orthodiff_nnunet.networks.encoder_io.load_encoder` sets it for the branch's noise timestep
(``film=True``, :func:`load_timestep_film`): the encoder computes exactly what the pretrained
network's encoder computed at that ``t``, the same contract the segmentation network uses at
``t = 0``. ``film=False`` is an ablation: the identity affine (scale = shift = 0), a state the
pretraining never saw; training from scratch has the identity too.

Training it: :func:`masked_bce` (the loss, unknown targets left out) with :func:`positive_weights`,
:func:`param_groups` of a mode (fine-tune, probe, scratch), :func:`poly_lr_schedule`, and its checkpoints
(:func:`write_classifier_checkpoint`, :func:`read_classifier_checkpoint`: ``weights_only=True``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from orthodiff_nnunet.diffusion import make_schedule, q_sample
from orthodiff_nnunet.errors import ClassificationError
from orthodiff_nnunet.networks.conditioning import _stage_channels, install_stage_affine
from orthodiff_nnunet.networks.encoder_io import load_encoder

FusionName = Literal["concat", "gated"]
FUSIONS: tuple[str, ...] = ("concat", "gated")
EVAL_NOISE_SEED = 20240531
CHECKPOINT_FORMAT = "orthodiff-classifier/1"

__all__ = ["FUSIONS", "FusionName", "AttentionPooling", "FeatureStandardizer", "ViewBranch", "ConcatFusion", "GatedFusion",
           "MultiViewClassifier", "build_classifier", "load_timestep_film", "CHECKPOINT_FORMAT", "masked_bce",
           "positive_weights", "param_groups", "poly_lr_schedule", "encoder_schedule", "read_classifier_checkpoint",
           "write_classifier_checkpoint"]


class AttentionPooling(nn.Module):
    """(B, C, *spatial) -> (B, 2C): attention-weighted sum (gated attention) and global average.

    The attention score of each voxel is ``w^T tanh(V h)`` (Ilse et al. 2018), softmax-normalised
    over the voxels. Works for any number of spatial dimensions.
    """

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(8, channels // 2)
        self.score = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.out_features = 2 * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        weights = torch.softmax(self.score(tokens).float(), dim=1).to(tokens.dtype)  # (B, N, 1)
        attended = (weights * tokens).sum(dim=1)
        return torch.cat([attended, tokens.mean(dim=1)], dim=1)


class FeatureStandardizer(nn.BatchNorm1d):
    """Per-feature standardisation across exams (BatchNorm1d without affine parameters).

    Pooled features of a frozen pretrained encoder can differ between exams by tiny amounts on very
    different scales; standardising each feature over the batch (running statistics at evaluation),
    as linear probes of self-supervised encoders do (e.g. MAE), lets a linear head use them. A
    training batch with a single exam of this view is normalised with the running statistics.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)


class _EncoderOnly(nn.Module):
    """Holds ``encoder`` under the attribute name the encoder contract expects."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor):
        return self.encoder(x)


class ViewBranch(nn.Module):
    """Encoder of one view, optional input noising (and FiLM), attention + average pooling.

    Args:
        encoder: the plans network's encoder (must return every stage's output, ``return_skips``).
        feature_stages: how many of the last stages are pooled and concatenated (1 = bottleneck).
        noise_timestep: 0 (clean input) or the timestep ``t`` the input is noised to.
        schedule: ``{"name": ..., "num_steps": ...}`` of the pretraining (for ``q_sample``).
        film: the encoder applies the pretraining's timestep conditioning at ``noise_timestep``
            (set when the encoder is loaded, :func:`load_timestep_film`); False: the identity.
        film_embed_dim: unused (kept for callers of the earlier signature).
    """

    def __init__(self, encoder: nn.Module, feature_stages: int = 1, noise_timestep: int = 0,
                 schedule: Mapping[str, object] | None = None, film: bool = False, film_embed_dim: int = 128) -> None:
        super().__init__()
        if not getattr(encoder, "return_skips", True):
            raise ValueError("the encoder must return every stage's output (return_skips=True)")
        n_stages = len(encoder.stages)
        if not 1 <= feature_stages <= n_stages:
            raise ValueError(f"feature_stages must be in 1..{n_stages}, got {feature_stages}")
        schedule = dict(schedule or {"name": "cosine", "num_steps": 1000})
        if not 0 <= int(noise_timestep) < int(schedule["num_steps"]):
            raise ValueError(f"noise timestep {noise_timestep} outside 0..{int(schedule['num_steps']) - 1}")
        self.body = _EncoderOnly(install_stage_affine(encoder))
        self.film = bool(film)
        self.feature_stages = int(feature_stages)
        self.noise_timestep = int(noise_timestep)
        self.schedule_config = schedule
        self._schedule = make_schedule(str(schedule["name"]), int(schedule["num_steps"])) if noise_timestep else None
        channels = [_stage_channels(s) for s in encoder.stages][-self.feature_stages:]
        self.pools = nn.ModuleList(AttentionPooling(c) for c in channels)
        self.out_features = sum(p.out_features for p in self.pools)
        self.norm = FeatureStandardizer(self.out_features)

    @property
    def encoder(self) -> nn.Module:
        return self.body.encoder

    def conditioning_parameters(self) -> list[nn.Parameter]:
        """None: the conditioning is a constant of the encoder contract (buffers, not parameters)."""
        return []

    def _noised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((x.shape[0],), self.noise_timestep, device=x.device, dtype=torch.long)
        if self.noise_timestep == 0:
            return x, t
        if self.training:
            noise = torch.randn_like(x)
        else:  # the same seeded noise field for every exam
            g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
            noise = torch.randn((1, *x.shape[1:]), generator=g).to(x.device, x.dtype).expand_as(x)
        return q_sample(self._schedule, x, t, noise), t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, t = self._noised(x)
        skips = self.body(x)
        feats = [pool(s) for pool, s in zip(self.pools, skips[-self.feature_stages:])]
        return self.norm(torch.cat(feats, dim=1).float())


class ConcatFusion(nn.Module):
    """Concatenate the views' features (a learned placeholder for a missing view), then a linear layer."""

    def __init__(self, in_features: Mapping[str, int], num_labels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.views = tuple(in_features)
        self.missing = nn.ParameterDict({v: nn.Parameter(torch.zeros(d)) for v, d in in_features.items()})
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(sum(in_features.values()), num_labels)

    def forward(self, feats: Mapping[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, v in enumerate(self.views):
            parts.append(torch.where(present[:, i:i + 1], feats[v], self.missing[v].expand_as(feats[v])))
        return self.linear(self.dropout(torch.cat(parts, dim=1)))


class GatedFusion(nn.Module):
    """Per-view logits averaged with per-label softmax gates over the views present."""

    def __init__(self, in_features: Mapping[str, int], num_labels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.views = tuple(in_features)
        self.dropout = nn.Dropout(dropout)
        self.logits = nn.ModuleDict({v: nn.Linear(d, num_labels) for v, d in in_features.items()})
        self.gates = nn.ModuleDict({v: nn.Linear(d, num_labels) for v, d in in_features.items()})

    def forward(self, feats: Mapping[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([self.logits[v](self.dropout(feats[v])) for v in self.views], dim=1)  # (B, V, L)
        gates = torch.stack([self.gates[v](feats[v]) for v in self.views], dim=1)
        gates = gates.masked_fill(~present[:, :, None], float("-inf"))
        weights = torch.softmax(gates, dim=1).nan_to_num(0.0)  # an exam without any view gets 0 logits
        return (weights * logits).sum(dim=1)


class MultiViewClassifier(nn.Module):
    """Branches per view + fusion: ``model(inputs, present) -> (B, L)`` logits.

    Args (of ``forward``):
        inputs: view -> ``(B, C, *patch)`` tensor; rows of exams without that view are ignored
            (the loader fills them with zeros).
        present: ``(B, V)`` bool, column order :attr:`views`.
    """

    def __init__(self, branches: Mapping[str, ViewBranch], num_labels: int, fusion: FusionName = "concat",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
        self.views = tuple(branches)
        self.branches = nn.ModuleDict(dict(branches))
        dims = {v: b.out_features for v, b in branches.items()}
        self.fusion_name = fusion
        self.fusion = (ConcatFusion if fusion == "concat" else GatedFusion)(dims, num_labels, dropout)
        self.num_labels = num_labels

    def forward(self, inputs: Mapping[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        present = present.to(torch.bool)
        feats = {}
        for i, v in enumerate(self.views):
            x = inputs[v]
            rows = torch.nonzero(present[:, i], as_tuple=False).flatten()
            out = torch.zeros((x.shape[0], self.branches[v].out_features), device=x.device, dtype=torch.float32)
            if rows.numel():
                sub = x if rows.numel() == x.shape[0] else x.index_select(0, rows)
                out = out.index_copy(0, rows, self.branches[v](sub).float())
            feats[v] = out
        return self.fusion(feats, present)

    def encoders(self) -> dict[str, nn.Module]:
        return {v: b.encoder for v, b in self.branches.items()}

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Pretrained parameters: encoders and their FiLM conditioning (lower learning rate, or frozen)."""
        out = []
        for b in self.branches.values():
            out += list(b.encoder.parameters()) + b.conditioning_parameters()
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything trained from scratch: pooling, norms, fusion."""
        enc = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.parameters() if id(p) not in enc]


def build_classifier(
    plans: Mapping[str, dict],
    configuration: str,
    num_input_channels: Mapping[str, int] | int,
    num_labels: int,
    *,
    fusion: FusionName = "concat",
    feature_stages: int = 1,
    noise_timesteps: Mapping[str, int] | None = None,
    schedules: Mapping[str, Mapping[str, object]] | None = None,
    film: bool | Mapping[str, bool] = False,
    dropout: float = 0.0,
) -> MultiViewClassifier:
    """A classifier whose per-view encoders are exactly the plans networks' encoders.

    Args:
        plans: view -> that view's plans dict (views in fusion order).
        configuration: the plans configuration (``3d_classification``).
        num_input_channels: per view, or one number for all.
        num_labels: number of labels.
        fusion: ``concat`` or ``gated``.
        feature_stages: last stages pooled per view.
        noise_timesteps: view -> timestep of the input noise (default 0, clean).
        schedules: view -> pretraining schedule dict (default cosine, 1000 steps).
        film: timestep FiLM hooks on the encoders (one flag, or per view; see the module docstring).
        dropout: before the fusion's linear layers.
    """
    from orthodiff_nnunet.networks.build import build_network

    branches = {}
    for view, p in plans.items():
        c = num_input_channels if isinstance(num_input_channels, int) else num_input_channels[view]
        net = build_network(dict(p), configuration, c, 1)
        t = int((noise_timesteps or {}).get(view, 0))
        use_film = bool(film.get(view, False) if isinstance(film, Mapping) else film)
        branches[view] = ViewBranch(net.encoder, feature_stages, t, (schedules or {}).get(view), use_film)
    return MultiViewClassifier(branches, num_labels, fusion, dropout)


def load_timestep_film(branch: ViewBranch, encoder_path: Path, architecture_hash: str | None = None) -> str:
    """Load ``encoder.pt`` into ``branch`` with its conditioning at the branch's noise timestep.

    With ``film=False`` the identity affine is kept instead (the ablation). The conditioning comes
    from ``encoder.pt`` itself (format 2), the same contract every consumer uses.

    Returns:
        A one-line report.

    Raises:
        EncoderMismatchError: the checkpoint does not fit this encoder, or is an old format.
    """
    from orthodiff_nnunet.networks.conditioning import set_stage_affine

    report = load_encoder(branch.body, encoder_path, architecture_hash, timestep=branch.noise_timestep)
    if not branch.film:
        set_stage_affine(branch.encoder, None)
        return report.summary().rsplit(", timestep conditioning", 1)[0] + \
            f"; no timestep conditioning (identity, --no-film), input at t={branch.noise_timestep}"
    return report.summary()


# ----------------------------------------------------------------------------------------------
# training: loss, optimizer groups, checkpoints
def masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean binary cross-entropy over the *known* targets (NaN = unknown), per-label positive weights."""
    known = torch.isfinite(target)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), torch.nan_to_num(target, nan=0.0), pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


def positive_weights(targets: np.ndarray) -> torch.Tensor:
    """Per-label negatives/positives of ``(N, L)`` targets (NaN = unknown): 1 without positives, in [0.01, 100]."""
    y = np.asarray(targets, dtype=np.float64)
    pos = np.nansum(y, axis=0)
    neg = np.sum(np.isfinite(y), axis=0) - pos
    w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(w, 1e-2, 100.0), dtype=torch.float32)


def param_groups(network: MultiViewClassifier, mode: str, lr: float, encoder_lr_factor: float) -> list[dict]:
    """Optimizer parameter groups of a training mode; ``probe`` freezes the encoders.

    Args:
        network: the classifier.
        mode: ``finetune`` (encoders at ``lr * encoder_lr_factor``), ``probe`` (encoders frozen,
            head only) or ``scratch`` (everything at ``lr``).
        lr: the head's learning rate.
        encoder_lr_factor: the encoders' share of it when fine-tuning (the method: 0.05).
    """
    enc = network.encoder_parameters()
    if mode == "probe":
        for p in enc:
            p.requires_grad_(False)
        return [{"params": network.head_parameters(), "lr": lr}]
    factor = encoder_lr_factor if mode == "finetune" else 1.0
    return [{"params": network.head_parameters(), "lr": lr}, {"params": enc, "lr": lr * factor}]


def poly_lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, exponent: float = 0.9) -> LambdaLR:
    """nnU-Net's polynomial learning-rate decay, stepped once per training step.

    After ``k`` steps every parameter group ``g`` trains at ``lr_g * (1 - k / total_steps) ** exponent``,
    the formula of nnU-Net's ``PolyLRScheduler`` (the tests compare the two step by step), each group
    from its *own* initial rate (the encoders' rate stays a fixed share of the head's); ``k`` is
    clamped to ``total_steps - 1``.

    Why torch's ``LambdaLR`` with that formula rather than a library polynomial scheduler: nnU-Net's
    ``PolyLRScheduler`` sets one rate for every group (the encoders would lose their factor) and keeps
    ``max_steps`` in its state; torch's ``PolynomialLR`` computes each rate from the previous one, so a
    run resumed with more epochs would go on at the finished run's final rate, 0. ``LambdaLR`` keeps only
    the step count in a checkpoint, so a resumed run follows the length it is given.

    Args:
        optimizer: its groups' ``lr`` are the initial rates.
        total_steps: steps of the whole run (at least 1).
        exponent: the decay exponent (nnU-Net's 0.9).
    """
    total = max(1, int(total_steps))
    return LambdaLR(optimizer, lambda step: (1 - min(step, total - 1) / total) ** exponent)


def encoder_schedule(encoder_path: Path | None) -> dict:
    """The pretraining's noise schedule recorded in ``encoder.pt`` (cosine, 1000 steps without one)."""
    from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint

    sched = {"name": "cosine", "num_steps": 1000}
    if encoder_path is not None and Path(encoder_path).is_file():
        sched = dict(read_encoder_checkpoint(encoder_path)["provenance"].get("schedule") or sched)
    return sched


def write_classifier_checkpoint(path: Path, payload: Mapping[str, object]) -> Path:
    """``torch.save`` of a checkpoint payload, atomic: written to a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def read_classifier_checkpoint(path: Path) -> dict:
    """A classifier checkpoint's payload, loaded with ``weights_only=True`` (tensors and plain values only).

    Raises:
        ClassificationError: naming the file when it is not a plain orthodiff classifier checkpoint.
    """
    from orthodiff_nnunet.networks.encoder_io import safe_torch_load

    payload = safe_torch_load(Path(path), "classifier checkpoint", ClassificationError)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ClassificationError(f"{path} is not an orthodiff classifier checkpoint (format {CHECKPOINT_FORMAT})")
    return payload
