"""Which floating-point precision a network trains and predicts in, chosen by measurement.

On CUDA, ``precision="auto"`` times a few training steps of every precision the GPU supports
(:func:`precision_candidates`: fp32 and fp16 everywhere, tf32 and bf16 from compute capability
8.0; autocast, fp16 with loss scaling) on the first real batch and keeps the fastest
(:func:`time_precisions`, :func:`resolve_precision`; the pretraining measurements showed bf16 can
be slower than fp32 for these 3D networks, so it is measured, not assumed). CPU runs in fp32. The
*resolved* precision is what a model records, so prediction and ``--resume`` compute in the
precision its thresholds were chosen in (:func:`runtime_precision`). TF32 is switched on or off
only inside a block (:func:`tf32_context` restores the caller's settings): no process-wide default
is changed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch

from orthodiff_nnunet.errors import ClassificationError

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")


def precision_candidates(device_type: str, capability: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The precisions a device can train in, in measurement order.

    Args:
        device_type: ``"cuda"`` or ``"cpu"`` (anything but CUDA computes in fp32).
        capability: CUDA compute capability ``(major, minor)``, e.g. ``(8, 0)`` for an A100;
            TF32 and bfloat16 need 8.0 or newer (Ampere). None on CUDA: read from the current device.
    """
    if device_type != "cuda":
        return ("fp32",)
    if capability is None:
        capability = tuple(torch.cuda.get_device_capability())
    if tuple(capability) >= (8, 0):
        return PRECISIONS
    return ("fp32", "fp16")


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device``; None off CUDA."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def resolve_precision(requested: str, device_type: str, capability: tuple[int, int] | None = None,
                      timings_ms: Mapping[str, float] | None = None) -> str:
    """The precision a run computes in: never ``"auto"``.

    Args:
        requested: ``auto`` or one of :data:`PRECISIONS`.
        device_type: ``"cuda"`` or ``"cpu"``.
        capability: CUDA compute capability (see :func:`precision_candidates`).
        timings_ms: for ``auto`` on CUDA, measured milliseconds per training step of each
            precision; the fastest supported one wins (none measured: fp32).

    Raises:
        ClassificationError: an unknown name, or a fixed precision this GPU does not support.
    """
    if requested != "auto" and requested not in PRECISIONS:
        raise ClassificationError(f"precision {requested!r}: use auto or one of {', '.join(PRECISIONS)}")
    if device_type != "cuda":
        if requested not in ("auto", "fp32"):
            log.warning("precision %s applies to CUDA only: this %s run computes in fp32", requested, device_type)
        return "fp32"
    candidates = precision_candidates(device_type, capability)
    if requested != "auto":
        if requested not in candidates:
            raise ClassificationError(
                f"precision {requested} needs CUDA compute capability 8.0 or newer (this GPU: "
                f"{'.'.join(map(str, capability or torch.cuda.get_device_capability()))}): use "
                f"{' or '.join(candidates)}, or auto")
        return requested
    measured = {p: t for p, t in (timings_ms or {}).items() if p in candidates and math.isfinite(t)}
    return min(measured, key=measured.get) if measured else "fp32"


def runtime_precision(recorded: str, device: torch.device) -> str:
    """The precision ``device`` computes a model recorded in ``recorded`` in: the same where the device
    supports it (prediction, resume), else fp32 with a warning (e.g. a bf16 model on a CPU)."""
    if recorded in precision_candidates(device.type, device_capability(device)):
        return recorded
    log.warning("the model was trained in %s, which this %s does not run: computing in fp32 (probabilities "
                "may differ slightly from the training run's)", recorded, device.type)
    return "fp32"


def time_precisions(step: Callable[[str], object], device: torch.device, network: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, steps: int = 3) -> dict[str, float]:
    """Milliseconds per call of ``step(precision)`` for every precision ``device`` supports.

    Each precision runs one warm-up call and then ``steps`` timed calls, between CUDA
    synchronisations. A precision that fails (e.g. a kernel missing for this GPU, out of memory)
    is logged and left out. ``network``'s weights and ``optimizer``'s state are put back afterwards
    (and its gradients cleared): the measurement leaves no trace on the run.

    Args:
        step: one training step (forward and backward) in the given precision.
        device: a CUDA device.
        network: the network ``step`` trains.
        optimizer: its optimizer.
        steps: timed calls per precision.
    """
    saved = {k: v.detach().clone() for k, v in network.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict())
    timings: dict[str, float] = {}
    for p in precision_candidates(device.type, device_capability(device)):
        try:
            for i in range(steps + 1):
                if i == 1:
                    torch.cuda.synchronize(device)
                    start = time.perf_counter()
                step(p)
            torch.cuda.synchronize(device)
            timings[p] = 1000 * (time.perf_counter() - start) / steps
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. a kernel missing for this GPU
            log.warning("precision %s failed in the measurement: %s", p, exc)
    network.load_state_dict(saved)
    optimizer.load_state_dict(saved_opt)
    optimizer.zero_grad(set_to_none=True)
    return timings


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of a precision on a device; None = no autocast (fp32/tf32, or not CUDA)."""
    if device_type != "cuda":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """Autocast of ``precision`` on ``device``; disabled for fp32/tf32 and off CUDA."""
    dtype = autocast_dtype(precision, device.type)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _tf32_api() -> tuple[bool, bool]:
    """Whether the process uses the legacy TF32 switches (matmul, cuDNN); mixing them with the new
    ``fp32_precision`` ones raises in PyTorch, so whichever the process uses is the one touched."""
    try:
        torch.get_float32_matmul_precision()
        matmul_legacy = True
    except RuntimeError:
        matmul_legacy = False
    try:
        _ = torch.backends.cudnn.allow_tf32
        cudnn_legacy = True
    except RuntimeError:
        cudnn_legacy = False
    return matmul_legacy, cudnn_legacy


@contextlib.contextmanager
def tf32_context(enabled: bool) -> Iterator[None]:
    """TF32 matmul and cuDNN convolutions on (``enabled``) or off inside the block only.

    The caller's settings (``torch.set_float32_matmul_precision``, ``torch.backends.cudnn.allow_tf32``
    or their ``fp32_precision`` successors) are read first and put back on exit, exceptions
    included: training or predicting never changes a process-wide default.
    """
    matmul_legacy, cudnn_legacy = _tf32_api()
    matmul_before = (torch.get_float32_matmul_precision() if matmul_legacy
                     else torch.backends.cuda.matmul.fp32_precision)
    cudnn_before = torch.backends.cudnn.allow_tf32 if cudnn_legacy else torch.backends.cudnn.conv.fp32_precision
    try:
        if matmul_legacy:
            torch.set_float32_matmul_precision("high" if enabled else "highest")
        else:
            torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
        if cudnn_legacy:
            torch.backends.cudnn.allow_tf32 = enabled
        else:
            torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
        yield
    finally:
        if matmul_legacy:
            torch.set_float32_matmul_precision(matmul_before)
        else:
            torch.backends.cuda.matmul.fp32_precision = matmul_before
        if cudnn_legacy:
            torch.backends.cudnn.allow_tf32 = cudnn_before
        else:
            torch.backends.cudnn.conv.fp32_precision = cudnn_before


def tf32_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """TF32 on (``tf32``) or off (the others) for a block, on CUDA; nothing elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return tf32_context(precision == "tf32")


class TrainerPrecision:
    """The precision part of a trainer, mixed into it: measure or check the precision, compute in it, resume in it.

    The trainer provides ``device``, ``precision`` (what was asked for, then the resolved one),
    ``precision_requested``, ``precision_timings`` (ms per step), ``network``, ``optimizer``,
    ``grad_scaler`` (None or fp16's ``GradScaler``), ``current_epoch`` and
    ``_forward_backward(batch, precision, step)``.
    """

    def _autocast(self, precision: str | None = None) -> torch.autocast:
        return autocast(precision or self.precision, self.device)

    def _tf32(self, precision: str | None = None) -> contextlib.AbstractContextManager:
        return tf32_for(precision or self.precision, self.device)

    def _scaler(self, precision: str) -> torch.amp.GradScaler:
        """fp16: the run's loss scaler (a fresh one while measuring); otherwise a disabled one (plain backward/step)."""
        if precision == "fp16" and self.grad_scaler is not None:
            return self.grad_scaler
        return torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def runtime_precision(self, recorded: str) -> str:
        """The precision this device computes a model recorded in ``recorded`` in (:func:`runtime_precision`)."""
        return runtime_precision(recorded, self.device)

    def choose_precision(self, batch: dict, steps: int = 3) -> str:
        """Resolve ``self.precision`` (:func:`resolve_precision`): fp32 off CUDA, a fixed choice as given,
        ``auto`` on CUDA the fastest supported precision measured on ``batch`` (:func:`time_precisions`)."""
        self.precision_requested = self.precision
        capability = device_capability(self.device)
        if self.device.type != "cuda" or self.precision != "auto":
            self.precision = resolve_precision(self.precision, self.device.type, capability)
            return self.precision
        self.precision_timings.update(time_precisions(lambda p: self._forward_backward(batch, p, step=False),
                                                      self.device, self.network, self.optimizer, steps))
        self.precision = resolve_precision("auto", self.device.type, capability, self.precision_timings)
        log.info("precision by measurement (ms per step): %s -> %s",
                 ", ".join(f"{k} {v:.1f}" for k, v in self.precision_timings.items()), self.precision)
        return self.precision

    def _precision_at_start(self, first_batch: Callable[[], dict]) -> None:
        """Chosen on the first batch of a new run (fp16: with a loss scaler); a resumed run keeps its checkpoint's."""
        if self.current_epoch == 0:
            self.choose_precision(first_batch())
            if self.precision == "fp16":
                self.grad_scaler = torch.amp.GradScaler("cuda")
        elif self.precision not in PRECISIONS:  # resumed from a checkpoint that did not record it
            self.precision = resolve_precision(self.precision, self.device.type, device_capability(self.device))

    def _resume_precision(self, config: Mapping, timings: Mapping[str, float] | None, path: object) -> None:
        """Resume in the precision a checkpoint was trained (and measured) in; ``--precision`` is ignored then."""
        recorded = config.get("precision")
        if recorded in PRECISIONS:
            if self.precision not in ("auto", recorded):
                log.warning("--precision %s ignored: %s was trained in %s and resumes in it", self.precision, path,
                            recorded)
            self.precision_requested = config.get("precision_requested", recorded)
            self.precision = self.runtime_precision(recorded)
            self.precision_timings = dict(timings or {})
        if self.precision == "fp16" and self.grad_scaler is None and self.device.type == "cuda":
            self.grad_scaler = torch.amp.GradScaler("cuda")
