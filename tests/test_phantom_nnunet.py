"""Phantom sites converted by orthodiff pass nnU-Net's own integrity check and plan_and_preprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orthodiff_nnunet.api import convert
from orthodiff_nnunet.data.phantom import write_site
from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T


@pytest.mark.slow
def test_two_phantom_sites_three_orientations_pass_nnunet_plan_and_preprocess(tmp_path):
    raw, pre = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed"
    ids = []
    for site, base in ((SITE_3T, 401), (SITE_15T, 411)):
        manifest = write_site(tmp_path / site.name, site, n_cases=3, seed=base, patients_with_two_exams=1)
        result = convert(manifest, base, f"Phantom{site.name}", raw=raw, num_processes=1)
        assert set(result.datasets) == {"sag", "cor", "ax"}
        ids += [base, base + 1, base + 2]
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(tmp_path / "res"),
               nnUNet_def_n_proc="1")  # nnU-Net otherwise spawns a pool of 8+ workers on this 2-core machine
    # -npfp: the fingerprint and integrity pools (default 8 spawned workers per dataset, whatever nnUNet_def_n_proc)
    exe = shutil.which("nnUNetv2_plan_and_preprocess", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [exe, "-d", *map(str, ids), "-c", "3d_fullres", "-np", "1", "-npfp", "1", "--verify_dataset_integrity"],
        env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for folder in sorted(pre.iterdir()):
        plans = json.loads((folder / "nnUNetPlans.json").read_text())
        fullres = plans["configurations"]["3d_fullres"]
        # nnU-Net moves the thick (3-3.5 mm) axis first whatever its position in the canonical array
        assert max(fullres["spacing"]) == fullres["spacing"][0] >= 3.0
        cases = list((folder / "nnUNetPlans_3d_fullres").glob("*.b2nd"))
        assert len(cases) == 2 * 3  # image and segmentation per case
