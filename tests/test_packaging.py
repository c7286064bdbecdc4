"""The installed distribution: namespaced packages, console script, package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_no_bare_top_level_packages_and_imports(tmp_path):
    """planners/, trainers/, dataset_conversion/ are installed inside orthodiff_nnunet only."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
    )
    wheel = next(tmp_path.glob("orthodiff_nnunet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"orthodiff_nnunet"}
    for module in ("planners", "trainers", "dataset_conversion"):
        assert f"orthodiff_nnunet/{module}/__init__.py" in names
    assert any(n.startswith("orthodiff_nnunet/dataset_conversion/remap/") and n.endswith(".json") for n in names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import orthodiff_nnunet.dataset_conversion.site_converter as s, orthodiff_nnunet.planners, "
        "orthodiff_nnunet.diffusion, orthodiff_nnunet.networks.encoder_io, orthodiff_nnunet.trainers.diffusion_pretraining, "
        "orthodiff_nnunet.trainers, orthodiff_nnunet.remap as r; print(s.__file__); "
        "print(r.load_remap_table(\"oai_zib\").name)"
    )
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(target) in out.splitlines()[0]
    assert "oai_zib" in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "orthodiff_nnunet.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("convert", "demo", "plan_and_preprocess", "pretrain", "train", "evaluate"):
        assert cmd in out.stdout
    conv = subprocess.run([sys.executable, "-m", "orthodiff_nnunet.cli", "convert", "--help"], capture_output=True, text=True)
    assert "--dry-run" in conv.stdout and "--external" in conv.stdout and "--key-file" in conv.stdout
