"""Plumbing shared by the benchmark scripts: machine description, timing, folders, trainers, Markdown output.

``bench`` is a package of the repository (not of the installed distribution): the scripts import
``from bench import common`` and run as ``python -m bench.<script>`` from the repository root. Every
script has the same shape: ``parse_args(argv)``, ``run(args)`` (the measurement, returns its
result), ``record(result, args)`` (prints it and writes ``bench/results/*.md``) and a ``main`` that
calls the three.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from orthodiff_nnunet.conventions import RESENC_M_PLANS

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


# ----------------------------------------------------------------------------------------------
# machine and command
def cpu_model() -> str:
    """The CPU model as the kernel names it (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine(device: "torch.device | None" = None) -> str:
    """One line: GPU name (on CUDA) or CPU model, cores, torch/nnunetv2 versions."""
    import torch
    from importlib.metadata import version

    cpu = f"{cpu_model()}, {usable_cores()} usable cores, torch threads {torch.get_num_threads()}"
    soft = f"torch {torch.__version__}, nnunetv2 {version('nnunetv2')}, Python {platform.python_version()}"
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}); host {cpu}; {soft}")
    return f"CPU only: {cpu}; {soft}"


def command_line() -> str:
    """How this script was started: ``python -m bench.<script> ARGS`` (``python <file> ARGS`` otherwise)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith("bench."):
        start = ["-m", spec.name]
    else:
        script = Path(sys.argv[0])
        try:
            script = script.resolve().relative_to(REPO)
        except ValueError:
            pass
        start = [str(script)]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "nnUNet_n_proc_DA", "CUDA_VISIBLE_DEVICES") if k in os.environ)
    return (env + " " if env else "") + "python " + " ".join(shlex.quote(a) for a in [*start, *sys.argv[1:]])


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def shared_data(given: Path | None = None) -> Path | None:
    """The shared real-data folder: ``given``, else ``$ORTHODIFF_SHARED_DATA``, else ``../shared/data``; None if absent."""
    env = os.environ.get("ORTHODIFF_SHARED_DATA")
    for cand in (given, Path(env) if env else None, REPO.parent / "shared" / "data"):
        if cand is not None and cand.is_dir():
            return cand
    return None


def run_timed(cmd: list[str], env: dict[str, str], log_file: Path) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log_file``: (wall seconds, CPU seconds of it and its reaped children).

    CPU = user + system from ``getrusage(RUSAGE_CHILDREN)`` before and after (the command and all its
    worker processes). A failing command stops the benchmark with the tail of its log.
    """
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); see {log_file}:\n{log_file.read_text()[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its reaped children so far."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def console_script(name: str) -> str:
    """The console script ``name`` installed beside this interpreter (the venv's), else ``name`` (on PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


# ----------------------------------------------------------------------------------------------
# nnU-Net folders and data
def use_work_folder(work: Path) -> dict[str, Path]:
    """Point nnUNet_raw/_preprocessed/_results at ``work``'s subfolders (created)."""
    from orthodiff_nnunet.paths import set_nnunet_paths

    folders = {"raw": work / "raw", "preprocessed": work / "preprocessed", "results": work / "results"}
    set_nnunet_paths(**folders)
    return folders


def plans_identifier_of(result, default: str = RESENC_M_PLANS) -> str:
    """The plans identifier plan_and_preprocess used (its result object, when it carries one)."""
    datasets = getattr(result, "datasets", None)
    if datasets:
        return datasets[0].plans_identifier
    return default


def make_phantom_dataset(work: Path, dataset_id: int, name: str, *, n_cases: int, seed: int,
                         in_plane_mm: float | None = None, scale: float | None = None) -> tuple[str, str]:
    """Procedural sagittal knee phantoms (3 T site) -> ``convert`` -> ``plan_and_preprocess``.

    Returns (dataset name, plans identifier). Reuses what ``work`` already holds.
    """
    import dataclasses

    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T
    from orthodiff_nnunet.planning import plan_and_preprocess

    folders = use_work_folder(work)
    existing = sorted(folders["raw"].glob(f"Dataset{dataset_id:03d}_*"))
    if not existing:
        site = SITE_3T if in_plane_mm is None else dataclasses.replace(SITE_3T, in_plane_spacing_mm=in_plane_mm)
        kw = {} if scale is None else {"scale": scale}
        manifest = write_site(work / "site", site, n_cases=n_cases, seed=seed, orientations=("sag",), **kw)
        convert(manifest, dataset_id, name, raw=folders["raw"], num_processes=min(2, usable_cores()))
        existing = sorted(folders["raw"].glob(f"Dataset{dataset_id:03d}_*"))
    with with_planning_env():
        result = plan_and_preprocess([dataset_id], num_processes=min(2, usable_cores()), show_progress=False)
    return existing[0].name, plans_identifier_of(result)


class with_planning_env:
    """nnUNet_n_proc_DA=0 breaks planning (torch.set_num_threads(0)): unset it around planning."""

    def __enter__(self):
        self.saved = os.environ.pop("nnUNet_n_proc_DA", None)

    def __exit__(self, *exc):
        if self.saved is not None:
            os.environ["nnUNet_n_proc_DA"] = self.saved


def load_plans_and_dataset_json(dataset_name: str, plans_identifier: str) -> tuple[dict, dict]:
    from orthodiff_nnunet.paths import preprocessed_dir

    folder = preprocessed_dir() / dataset_name
    plans = json.loads((folder / f"{plans_identifier}.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return plans, dataset_json


def make_trainer(cls, plans: dict, configuration: str, dataset_json: dict, device, *, compile_: bool = False,
                 fold="all", **attributes):
    """An initialised nnU-Net trainer (``attributes`` set before ``initialize``), as nnU-Net builds it.

    ``compile_`` sets ``nnUNet_compile`` for this initialisation only (nnU-Net reads it there).
    """
    p = copy.deepcopy(plans)
    p["continue_training"] = False
    trainer = cls(plans=p, configuration=configuration, fold=fold, dataset_json=copy.deepcopy(dataset_json),
                  device=device)
    for k, v in attributes.items():
        if not hasattr(trainer, k):
            raise AttributeError(f"{cls.__name__} has no attribute {k!r}")
        setattr(trainer, k, v)
    saved = os.environ.get("nnUNet_compile")
    os.environ["nnUNet_compile"] = "1" if compile_ else "0"
    try:
        trainer.initialize()
    finally:
        if saved is None:
            os.environ.pop("nnUNet_compile", None)
        else:
            os.environ["nnUNet_compile"] = saved
    return trainer


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# output
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def append_markdown(path: Path, text: str, title: str = "# Pretraining benchmarks") -> None:
    """Append a section to ``path`` (created with ``title`` when new)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text() if path.is_file() else f"{title}\n"
    path.write_text(before.rstrip("\n") + "\n\n" + text.strip("\n") + "\n")


def footer(device=None) -> str:
    """The closing lines of a result section: machine, load average at the end, the command."""
    return (f"Machine: {machine(device)}. Load average at the end: {load_average()}.\n"
            f"Command: `{command_line()}`")


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
