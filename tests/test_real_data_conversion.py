"""The real knees of ../shared/data through the site converter (skipped when the folder is absent)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_manifest
from orthodiff_nnunet.api import convert


@pytest.mark.realdata
def test_real_dicom_knees_convert_with_right_orientation(shared_data, tmp_path):
    dicom = shared_data / "dicom"
    rows = [
        {"case_id": "DESS", "patient_id": "K1", "site": "pyKNEEr", "field_strength": "3", "vendor": "GE",
         "image": str(dicom / "pykneer_dess_sag_3t" / "echo1"), "echo": ""},
        {"case_id": "MESE", "patient_id": "K2", "site": "pymskt", "field_strength": "3", "vendor": "GE",
         "image": str(dicom / "pymskt_mese_t2_sag_3t"), "echo": "all"},
    ]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    raw = tmp_path / "raw"
    result = convert(manifest, 701, "RealKnee", raw=raw, num_processes=2, allow_outside_site=True)  # images in ../shared
    assert set(result.datasets) == {"sag"}  # both are sagittal; the MESE series is 8 degrees oblique
    folder = result.datasets["sag"]
    targets = json.loads((folder / "orthodiff_targets.json").read_text())["cases"]
    assert len(targets) == 1 + 8  # DESS + one case per echo
    echoes = sorted(t["echo"] for t in targets.values() if t["echo"] is not None)
    assert echoes == list(range(1, 9))
    shapes = {}
    for case, t in targets.items():
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        arr = sitk.GetArrayFromImage(img)  # canonical LPS: (z=S, y=P, x=L), sagittal thick axis = x
        shapes[t["site"]] = (arr.shape, np.round(img.GetSpacing(), 4))
        assert float(arr.std()) > 0
    # DESS: 80 slices of 512x512 at 0.3125 x 0.3125 x 1.5 mm; x (L-R) is the slice axis
    assert shapes["pyKNEEr"][0] == (512, 512, 80)
    np.testing.assert_allclose(shapes["pyKNEEr"][1], (1.5, 0.3125, 0.3125), atol=1e-3)
    # MESE: 24 slices of 256x256, 0.625 mm in-plane, 4 mm slices
    assert shapes["pymskt"][0] == (256, 256, 24)
    np.testing.assert_allclose(shapes["pymskt"][1], (4.0, 0.625, 0.625), atol=1e-3)
