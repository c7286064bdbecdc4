"""Small shared helpers: atomic writes (text, JSON, figures) and JSON."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place (0666 & ~umask:
    plans and reports are shared files, while mkstemp alone would create 0600)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """Save a matplotlib figure as PNG under a temporary name, rename it into place, close the figure."""
    import io

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, tmp_dir: Path | None = None) -> None:
    """Bytes written to a temporary file beside ``path``, flushed to disk and renamed into place.

    Every failure (disk full, quota, read-only file system: ``OSError``) propagates after the
    temporary file is removed, and the previous ``path`` stays as it was.

    Args:
        path: destination.
        data: the content.
        mode: permission bits (e.g. ``0o600`` for secrets); default ``0o666`` minus the umask.
        tmp_dir: where the temporary file goes (default: beside ``path``; it must be on the same file
            system): a folder that a later run clears keeps a killed process's leftover out of ``path``'s folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=tmp_dir or path.parent)
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: a hidden temporary of ours that names its writer: ``.<name>.pid<pid>.tmp`` or ``.<name>.pid<pid>.<part>.tmp``
_PID_TEMPORARY = re.compile(r"^\..+\.pid(\d+)(?:\.\w+)?\.tmp$")


def temporary_path(path: Path, part: str | None = None) -> Path:
    """The hidden temporary beside ``path`` that this process writes before renaming it into place.

    It names the process (``.<name>.pid<pid>[.<part>].tmp``), so that :func:`remove_dead_temporaries` in a
    later run can tell a leftover of a killed run from a write in progress."""
    path = Path(path)
    return path.with_name(f".{path.name}.pid{os.getpid()}{'.' + part if part else ''}.tmp")


def remove_dead_temporaries(folder: Path, log: Callable[[str], Any] | None = None) -> list[Path]:
    """Delete the hidden temporaries in ``folder`` (not below it) whose writing process is gone.

    A SIGKILL (out of memory, a scheduler's time limit) can land between writing a temporary and renaming it;
    the file it replaces stays whole, and the temporary is left. This removes those of :func:`temporary_path`
    and :func:`atomic_write_bytes` whose process no longer exists; a live process's (also this one's) and
    another user's are kept. ``log`` (e.g. a trainer's ``print_to_log_file``) gets one line per removed file.
    Returns the removed paths.
    """
    removed = []
    for f in sorted(Path(folder).glob(".*.tmp")):
        m = _PID_TEMPORARY.match(f.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # a live process: not ours to delete
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # exists, under another user
        f.unlink(missing_ok=True)
        removed.append(f)
        if log is not None:
            log(f"removed {f.name}, left by a killed run")
    return removed


def seed_everything(seed: int | None) -> None:
    """Seed torch, numpy and Python's ``random`` (per DDP rank); nothing when ``seed`` is None.

    nnU-Net's case sampling and augmentation draw from these global generators, so with augmentation in-process
    (``nnUNet_n_proc_DA=0``) a seeded CPU run repeats. Used by ``orthodiff pretrain --seed`` and ``train seg
    --run-seed``."""
    if seed is None:
        return
    import random

    import numpy as np
    import torch

    # DDP ranks must draw different patches and noise; the weights are rank 0's (DDP broadcasts them)
    rank_seed = int(seed) + 1000 * int(os.environ.get("RANK", "0"))
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)  # CUDA generators too


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def one_thread_processes(n: int):
    """A ``ProcessPoolExecutor`` of ``n`` spawned processes with one torch thread each. On a small CPU, independent
    trainings side by side, one thread each, do more iterations per second than one after the other with all
    threads (docs/DEMO.md). The children inherit ``os.environ`` (nnU-Net's folders) as it is when they start."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_one_torch_thread)


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON (indent 2, keys in insertion order) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system holding ``path`` or its nearest existing parent."""
    import shutil

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human figure (MB below 10 GB, else GB; decimal units as ``df -H``)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e10 else f"{n / 1e6:.1f} MB"


class ImageWriteError(OSError):
    """An image file was not written completely (disk full, quota, file size limit, I/O error)."""


def verify_nifti_gz(path: Path, image_bytes: int, name: str | None = None) -> None:
    """Check that a ``.nii.gz`` file decompresses completely to its header plus ``image_bytes`` of voxels.

    ITK's writers report no error when the disk fills up: they print "wrote only 0 of N bytes"
    (or nothing) and leave a truncated or empty file. Decompressing the whole stream (gzip checks
    its CRC and length) and comparing the size with the NIfTI header's ``vox_offset`` plus the
    voxel bytes catches every such file.

    Args:
        path: the written file.
        image_bytes: voxel count times bytes per voxel.
        name: the file name messages give (default ``path.name``).

    Raises:
        ImageWriteError: the file is missing, truncated, corrupt or of the wrong size.
    """
    import gzip
    import struct
    import zlib

    name = name or Path(path).name
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(352)
            if len(header) < 348:
                raise ImageWriteError(f"{name}: only {len(header)} bytes after decompression")
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            if struct.unpack(endian + "i", header[:4])[0] != 348:
                raise ImageWriteError(f"{name}: not a NIfTI-1 file")
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            total = len(header)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, ImageWriteError):
            raise
        raise ImageWriteError(f"{name}: {type(exc).__name__}: {exc}") from exc
    expected = vox_offset + int(image_bytes)
    if total != expected:
        raise ImageWriteError(f"{name}: {total} bytes after decompression, {expected} expected")


def write_image_checked(image, path: Path) -> None:
    """Write a SimpleITK image as compressed NIfTI under a temporary name, verify it, rename it into place.

    Raises:
        ImageWriteError: the file could not be written completely (the temporary file is removed and
            an earlier ``path`` is left as it was).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"{path}: write_image_checked writes .nii.gz only")
    tmp = path.with_name(f".{path.name[:-7]}.{os.getpid()}.tmp.nii.gz")
    nbytes = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    try:
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as exc:  # ITK raises for some failures (cannot open the file, ...)
            lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            raise ImageWriteError(f"{path.name}: {lines[-1].strip()[:300]}") from exc
        verify_nifti_gz(tmp, nbytes, name=path.name)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # a write-back error (network file systems report them late) surfaces here
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def nnunet_stdout_to_log(logger: logging.Logger | None = None) -> Iterator[None]:
    """Send what nnU-Net prints (plans, per-case notes) to the debug log, so that progress bars stay readable."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            (logger or logging.getLogger("orthodiff_nnunet")).debug("nnU-Net said:\n%s", text)


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy scalars (``np.str_``, ``np.int64``, ...) and paths turned into plain Python values.

    Checkpoints that travel between sites are read with ``torch.load(weights_only=True)``, which
    refuses anything but tensors and plain containers and values; nnU-Net hands out numpy strings
    (``maybe_convert_to_dataset_name``) that would otherwise end up pickled in them. Tensors and
    containers are kept (tuples stay tuples).
    """
    import numpy as np

    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj) if type(obj) in (list, tuple) else [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj
