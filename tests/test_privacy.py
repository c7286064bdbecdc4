"""End to end: DICOM series with made-up identifiers -> converted datasets that hold none of them."""

from __future__ import annotations

import gzip
import logging

import numpy as np

from conftest import PLANE_DIRECTIONS, write_manifest
from orthodiff_nnunet.cli import main
from orthodiff_nnunet.io.dicom import write_series

SECRETS = {
    "patient_name": "Doe^Jane",
    "patient_id": "MRN0012345",
    "birth_date": "19700101",
    "study_date": "20240315",
    "institution": "General Hospital Springfield",
}


def _leaks(text: str) -> list[str]:
    found = [s for s in SECRETS.values() if s in text]
    found += [s for s in ("Doe", "Jane", "Springfield") if s in text]
    return found


def test_no_identifier_reaches_outputs_or_logs(tmp_path, caplog, capfd):
    site = tmp_path / "site"
    rng = np.random.default_rng(0)
    rows = []
    for k, orientation in enumerate(("sag", "cor", "ax")):
        arr = (rng.integers(100, 1000, size=(6, 24, 20))).astype(np.int16)
        files = write_series(
            site / f"series{k}", arr, spacing=(0.5, 0.5, 3.0), origin=(-5.0, 10.0, 20.0),
            direction=PLANE_DIRECTIONS[orientation].flatten().tolist(), series_number=k + 3,
            echo_times=[10.0, 40.0] if orientation == "sag" else None, **SECRETS,
        )
        raw_bytes = files[0].read_bytes()
        assert SECRETS["patient_name"].encode() in raw_bytes and SECRETS["patient_id"].encode() in raw_bytes
        rows.append({"case_id": "ACC-778899", "patient_id": SECRETS["patient_id"], "site": "SiteA",
                     "field_strength": "3", "vendor": "GE", "image": f"series{k}", "echo": "all" if k == 0 else ""})
    manifest = write_manifest(site / "manifest.csv", rows)
    raw = tmp_path / "nnUNet_raw"
    caplog.set_level(logging.DEBUG)
    rc = main(["-v", "convert", str(manifest), "-d", "301", "-n", "Priv", "--raw", str(raw), "-np", "1"])
    assert rc == 0
    out, err = capfd.readouterr()

    written = [p for p in raw.rglob("*") if p.is_file()]
    assert len([p for p in written if p.name.endswith(".nii.gz")]) == 2 * 4  # sag: 2 echoes; cor, ax: 1 each
    everything = [out, err, caplog.text]
    for p in written:
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        everything.append(p.name)
        everything.append(data.decode("latin-1"))
    blob = "\n".join(everything)
    assert _leaks(blob) == []
    assert "ACC-778899" not in blob  # the site's own case id is pseudonymised too
    # the conversion did happen from those files: the echoes were split, and the planes detected
    sag = next(raw.glob("Dataset301_PrivSag"))
    assert len(list((sag / "imagesTr").iterdir())) == 2
    assert (raw / "Dataset302_PrivCor").is_dir() and (raw / "Dataset303_PrivAx").is_dir()
