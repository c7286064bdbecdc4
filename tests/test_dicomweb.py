"""DICOMweb against a real server: Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb`` packages).

Each test starts its own Orthanc on a free loopback HTTP port (DICOM server off, no
authentication, storage and index in the test's temporary folder), with the DICOMweb plugin at
``/dicom-web/``, and stops it afterwards. The tests skip, saying what to install, when Orthanc or
its DICOMweb plugin is absent (``.ci/run`` installs both).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.io import dicomweb as dw
from orthodiff_nnunet.io.dicom import read_series, write_series

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path(os.environ.get("ORTHODIFF_ORTHANC_DICOMWEB_PLUGIN",
                                      "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class OrthancServer:
    """A running Orthanc: ``url`` is its HTTP root, ``dicomweb`` its DICOMweb root."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.users = users  # HTTP basic authentication with these users; None: none
        self.process: subprocess.Popen | None = None
        self.url = self.dicomweb = ""

    def start(self, timeout_s: float = 30.0) -> None:
        for _attempt in range(3):  # another process may take the free port before Orthanc binds it
            port = _free_port()
            config = {
                "Name": "orthodiff-test",
                "StorageDirectory": str(self.folder / "storage"),
                "IndexDirectory": str(self.folder / "index"),
                "HttpPort": port,
                "DicomServerEnabled": False,
                "DicomPort": _free_port(),
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": bool(self.users),
                "RegisteredUsers": self.users or {},
                "HttpThreadsCount": 4,
                "ConcurrentJobs": 1,
                "StorageCompression": False,
                # a throw-away server: no fsync per file, no job history (keeps a loaded CI machine's disk free)
                "SyncStorageArea": False,
                "SaveJobs": False,
                "Plugins": [str(DICOMWEB_PLUGIN)],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
            }
            cfg = self.folder / "orthanc.json"
            cfg.write_text(json.dumps(config))
            log_file = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - closed by the process' end
            self.process = subprocess.Popen([ORTHANC, str(cfg)], stdout=log_file, stderr=subprocess.STDOUT,
                                            cwd=self.folder)
            log_file.close()
            self.url = f"http://127.0.0.1:{port}"
            self.dicomweb = f"{self.url}/dicom-web"
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.process.poll() is None:
                if self._answers("/system"):
                    if self._answers("/dicom-web/studies"):
                        return
                    self.stop()
                    pytest.fail(f"Orthanc runs but its DICOMweb plugin does not answer; log: {self.folder / 'orthanc.log'}")
                time.sleep(0.1)
            self.stop()
        pytest.fail(f"Orthanc did not start; its log: {(self.folder / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def _request(self, path: str) -> urllib.request.Request:
        request = urllib.request.Request(self.url + path)
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        return request

    def _answers(self, path: str) -> bool:
        return _answers(self._request(path))

    def get(self, path: str):
        with urllib.request.urlopen(self._request(path), timeout=10) as r:
            return json.loads(r.read())


def _orthanc(tmp_path, users=None):
    if not (Path(ORTHANC).is_file() and os.access(ORTHANC, os.X_OK)):
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is absent (Debian: apt-get install orthanc-dicomweb)")
    folder = tmp_path / "orthanc"
    folder.mkdir()
    server = OrthancServer(folder, users)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(tmp_path):
    """A fresh Orthanc with the DICOMweb plugin, no authentication (skips when not installed)."""
    yield from _orthanc(tmp_path)


@pytest.fixture
def orthanc_with_login(tmp_path):
    """A fresh Orthanc with the DICOMweb plugin that wants HTTP basic authentication (user alice)."""
    yield from _orthanc(tmp_path, {"alice": "pa55:word@x"})


# ----------------------------------------------------------------------------------------------
# a small exam: a sagittal series, a coronal JPEG-LS series, and a 2-echo axial series


SAG = (0, 0, 1, 1, 0, 0, 0, -1, 0)  # SimpleITK direction (columns = i, j, k axes, LPS)
COR = (1, 0, 0, 0, 0, 1, 0, -1, 0)
AX = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def _write_exam(folder: Path, seed: int = 0, study_date: str = "") -> dict[int, tuple[list[Path], np.ndarray]]:
    rng = np.random.default_rng(seed)
    vols = {n: rng.integers(0, 1200, size=(5, 12, 10)).astype(np.int16) for n in (3, 4, 5)}
    exam = {
        3: write_series(folder / "s3", vols[3], (0.5, 0.5, 3.0), (10.0, -20.0, 30.0), SAG, series_number=3,
                        patient_id="PAT-7781", patient_name="Doe^Jane", series_description="PD SAG"),
        4: write_series(folder / "s4", vols[4], (0.5, 0.5, 3.0), (0.0, 0.0, 0.0), COR, series_number=4,
                        transfer_syntax="jpeg_ls_lossless", patient_id="PAT-7781", series_description="PD COR"),
        5: write_series(folder / "s5", vols[5], (0.5, 0.5, 3.0), (0.0, 0.0, 0.0), AX, series_number=5,
                        echo_times=(10.0, 30.0), patient_id="PAT-7781", series_description="T2 MAP AX"),
    }
    # write_series gives every series its own study; one exam is one study on a PACS
    study = pydicom.dcmread(exam[3][0]).StudyInstanceUID
    for paths in exam.values():
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.StudyInstanceUID, ds.StudyDate = study, study_date
            ds.save_as(p, enforce_file_format=True)
    return {n: (exam[n], vols[n]) for n in exam}


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# ----------------------------------------------------------------------------------------------


def test_redact_url_drops_credentials_and_query():
    assert dw.redact_url("https://alice:s3cr%40t@pacs.example.org:8443/dicom-web/?token=abc#x") == \
        "https://pacs.example.org:8443/dicom-web"
    assert dw.redact_url("http://[::1]:8042/dicom-web") == "http://[::1]:8042/dicom-web"
    plain, user, password = dw._split_credentials("https://alice:s3cr%40t@pacs:8443/dicom-web")
    assert (plain, user, password) == ("https://pacs:8443/dicom-web", "alice", "s3cr@t")


def test_store_query_retrieve_round_trip_is_byte_identical_and_resumable(orthanc, tmp_path, monkeypatch):
    # 2 results per QIDO-RS page: 20 instances take 10 pages; Orthanc ignores `offset` with ModalitiesInStudy
    monkeypatch.setattr(dw, "QIDO_PAGE", 2)
    exam = _write_exam(tmp_path / "export")
    files = [p for paths, _ in exam.values() for p in paths]
    assert len(files) == 5 + 5 + 10

    stored = dw.store_files(orthanc.dicomweb, files, batch_size=8)
    assert (stored.instances, stored.requests) == (20, 3)
    assert orthanc.get("/statistics")["CountInstances"] == 20

    studies = dw.query_studies(orthanc.dicomweb, modality="MR")
    assert [(s.num_series, s.modalities) for s in studies] == [(3, ("MR",))]
    series = dw.query_series(orthanc.dicomweb)
    assert [(s.series_number, s.modality, s.num_instances, s.orientation) for s in series] == \
        [(3, "MR", 5, "sag"), (4, "MR", 5, "cor"), (5, "MR", 10, "ax")]
    assert [s.description for s in series] == ["PD SAG", "PD COR", "T2 MAP AX"]
    assert dw.query_series(orthanc.dicomweb, modality="CT") == []
    assert len(dw.query_series(orthanc.dicomweb, study_uids=[studies[0].study_uid])) == 3

    cache = tmp_path / "cache"
    # temporary folders: of a run killed two days ago (removed), of a run going on now (left alone)
    stale, running = cache / f"{dw.PARTIAL_DIR}killed", cache / f"{dw.PARTIAL_DIR}running"
    for folder in (stale, running):
        folder.mkdir(parents=True)
        (folder / ".instance.x.tmp").write_bytes(b"\0" * 128 + b"DICM")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    first = dw.retrieve_series(orthanc.dicomweb, series, cache, show_progress=False)
    assert sorted(cache.glob(f"{dw.PARTIAL_DIR}*")) == [running]
    assert (first.series_fetched, first.series_cached, first.instances_fetched) == (3, 0, 20)
    for s, folder, (paths, vol) in zip(series, first.folders, exam.values(), strict=True):
        assert folder == cache / s.study_uid / s.series_uid
        cached = sorted(folder.glob("*.dcm"))
        assert {p.name for p in cached} == {f"{u}.dcm" for u in _uids(paths)}
        # as stored: same bytes (JPEG-LS stays JPEG-LS), hence the same voxels
        originals = {pydicom.dcmread(p).SOPInstanceUID: p.read_bytes() for p in paths}
        for p in cached:
            assert p.read_bytes() == originals[p.stem]
        echoes, source = read_series(folder, echo="all"), read_series(paths[0].parent, echo="all")
        assert len(echoes) == len(source) == (2 if s.series_number == 5 else 1)
        for got, want in zip(echoes, source, strict=True):
            np.testing.assert_array_equal(sitk.GetArrayFromImage(got.image), sitk.GetArrayFromImage(want.image))
            assert got.image.GetOrigin() == want.image.GetOrigin()
        assert sorted(np.unique(sitk.GetArrayFromImage(echoes[0].image))) == sorted(np.unique(vol))
    assert sorted(cache.glob(f"{dw.PARTIAL_DIR}*")) == [running]  # this run's temporary folder is gone too

    # complete series are not fetched again
    again = dw.retrieve_series(orthanc.dicomweb, series, cache, show_progress=False)
    assert (again.series_fetched, again.series_cached, again.instances_fetched) == (0, 3, 0)

    # an interrupted series (two files and the marker lost) fetches only what it lacks
    folder = first.folders[2]
    lost = sorted(folder.glob("*.dcm"))[:2]
    kept = {p: p.stat().st_mtime_ns for p in sorted(folder.glob("*.dcm"))[2:]}
    for p in lost:
        p.unlink()
    (folder / dw.MARKER_NAME).unlink()
    resumed = dw.retrieve_series(orthanc.dicomweb, series, cache, show_progress=False)
    assert (resumed.series_fetched, resumed.series_cached, resumed.instances_fetched) == (1, 2, 2)
    assert all(p.is_file() for p in lost)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # not rewritten
    assert json.loads((folder / dw.MARKER_NAME).read_text())["instances"] == 10

    # a series still arriving on the PACS: the next query counts one more instance, only that one is fetched
    src = pydicom.dcmread(exam[3][0][0])
    (late,) = write_series(tmp_path / "late", np.ones((1, 12, 10), np.int16), (0.5, 0.5, 3.0), (10.0, -20.0, 45.0), SAG,
                           series_number=3, series_uid=src.SeriesInstanceUID, patient_id="PAT-7781")
    ds = pydicom.dcmread(late)
    ds.StudyInstanceUID = src.StudyInstanceUID
    dw.store_instances(orthanc.dicomweb, [ds])
    series = dw.query_series(orthanc.dicomweb)
    assert [s.num_instances for s in series] == [6, 5, 10]
    later = dw.retrieve_series(orthanc.dicomweb, series, cache, show_progress=False)
    assert (later.series_fetched, later.series_cached, later.instances_fetched) == (1, 2, 1)
    assert pydicom.dcmread(first.folders[0] / f"{ds.SOPInstanceUID}.dcm") == ds  # attribute for attribute


def test_fetch_to_cache_logs_no_identifiers_or_credentials(orthanc, tmp_path, caplog):
    exam = _write_exam(tmp_path / "export", seed=1)
    files = [p for paths, _ in exam.values() for p in paths]
    secret_url = orthanc.dicomweb.replace("http://", "http://alice:pa55word@")  # Orthanc ignores unasked credentials
    caplog.set_level(logging.DEBUG)
    dw.store_files(secret_url, files)
    series, result = dw.fetch_to_cache(secret_url, tmp_path / "cache", show_progress=False)
    assert result.instances_fetched == 20 and len(series) == 3
    text = caplog.text
    assert orthanc.dicomweb in text  # the server is named ...
    assert "pa55word" not in text and "alice" not in text  # ... without its credentials
    identifiers = {"PAT-7781", "Doe^Jane", "PD SAG", "T2 MAP AX"}
    for p in files[:1] + files[-1:]:
        ds = pydicom.dcmread(p)
        identifiers |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    assert not [i for i in identifiers if i in text], "identifiers in the log"
    assert not [r for r in caplog.records if r.name.startswith(("dicomweb_client", "urllib3"))
                and r.levelno < logging.WARNING]


def test_errors_name_the_server_and_the_http_status(orthanc, tmp_path):
    paths = write_series(tmp_path / "s", np.zeros((2, 4, 4), np.int16), (1, 1, 1), (0, 0, 0), AX)
    wrong_root = orthanc.url.replace("http://", "http://bob:hunter2@") + "/not-dicom-web"
    with pytest.raises(dw.DicomwebError) as err:
        dw.store_files(wrong_root, paths)
    msg = str(err.value)
    assert f"DICOMweb server {orthanc.url}/not-dicom-web: storing 2 instance(s) (STOW-RS) failed with HTTP 404" in msg
    assert "must end at the DICOMweb root" in msg and "hunter2" not in msg and "bob" not in msg

    with pytest.raises(dw.DicomwebError, match=r"series query \(QIDO-RS\) failed with HTTP 404"):
        dw.query_series(orthanc.url + "/not-dicom-web")
    with pytest.raises(dw.DicomwebError, match=r"a test query \(QIDO-RS\) failed with HTTP 404"):
        dw.check_server(orthanc.url + "/not-dicom-web")
    assert dw.check_server(orthanc.dicomweb).base_url == orthanc.dicomweb

    orthanc.stop()
    with pytest.raises(dw.DicomwebError, match="the server cannot be reached"):
        dw.query_series(dw.connect(orthanc.dicomweb, max_attempts=1))
    with pytest.raises(dw.DicomwebError, match="not an http"):
        dw.connect("dicom://pacs:104")
    with pytest.raises(dw.DicomwebError, match=r"^instance 1 to store lacks SOPClassUID, SOPInstanceUID"):
        dw.store_instances(orthanc.dicomweb, [pydicom.Dataset()])
    with pytest.raises(dw.DicomwebError, match=r"^not-dicom.txt cannot be read as DICOM"):
        (tmp_path / "not-dicom.txt").write_text("hello")
        dw.store_files(orthanc.dicomweb, [tmp_path / "not-dicom.txt"])


def test_cache_for_scan_fetches_the_studies_asked_and_leaves_the_rest_out(orthanc, tmp_path, monkeypatch):
    import argparse

    first, second = _write_exam(tmp_path / "a", 2, "20240301"), _write_exam(tmp_path / "b", 3, "20240115")
    dw.store_files(orthanc.dicomweb, [p for exam in (first, second) for paths, _ in exam.values() for p in paths])
    study = {k: pydicom.dcmread(e[3][0][0]).StudyInstanceUID for k, e in (("a", first), ("b", second))}
    parser = argparse.ArgumentParser()
    dw.add_scan_arguments(parser)
    manifest = tmp_path / "private" / "manifest.csv"

    assert dw.cache_for_scan(parser.parse_args([]), manifest) is None
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    with pytest.raises(dw.DicomwebError, match=r"cache .* would lie inside \$nnUNet_raw"):
        dw.cache_for_scan(parser.parse_args(["--dicomweb", orthanc.dicomweb, "--cache", str(tmp_path / "raw" / "c")]),
                          manifest)
    with pytest.raises(dw.DicomwebError, match="--cache applies to --dicomweb URL only"):
        dw.cache_for_scan(parser.parse_args(["--cache", "x"]), manifest)

    args = parser.parse_args(["--dicomweb", orthanc.dicomweb, "--study", study["a"]])
    cache, exclude = dw.cache_for_scan(args, manifest, show_progress=False)
    assert cache == tmp_path / "private" / dw.DEFAULT_CACHE_NAME  # beside the manifest
    assert sorted(p.name for p in cache.iterdir()) == [study["a"]]
    assert sorted(p.name for p in exclude) == [dw.MARKER_NAME] * 3

    # a query matching more series than allowed is refused before anything is fetched
    with pytest.raises(dw.DicomwebError, match="6 series match, more than the 5 allowed; narrow the query"):
        dw.cache_for_scan(parser.parse_args(["--dicomweb", orthanc.dicomweb, "--max-series", "5"]), manifest)
    assert sorted(p.name for p in cache.iterdir()) == [study["a"]]

    # the other study, by its date: fetched now; the first stays in the cache but out of this scan
    cache, exclude = dw.cache_for_scan(parser.parse_args(["--dicomweb", orthanc.dicomweb, "--study-date",
                                                          "20240101-20240131", "--max-series", "3"]),
                                       manifest, show_progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted(study.values())
    left_out = [p for p in exclude if p.name != dw.MARKER_NAME]
    assert len(left_out) == 20 and all(p.is_relative_to(cache / study["a"]) for p in left_out)
    assert len([p for p in exclude if p.name == dw.MARKER_NAME]) == 6

def test_credentials_from_the_url_or_the_environment_and_a_401_says_how(orthanc_with_login, tmp_path, monkeypatch):
    monkeypatch.delenv(dw.ENV_USER, raising=False)
    monkeypatch.delenv(dw.ENV_PASSWORD, raising=False)
    paths = write_series(tmp_path / "s", np.zeros((2, 4, 4), np.int16), (1, 1, 1), (0, 0, 0), AX, series_number=9)
    url = orthanc_with_login.dicomweb
    with pytest.raises(dw.DicomwebError, match=r"failed with HTTP 401 Unauthorized; the server wants credentials"):
        dw.store_files(url, paths)
    with pytest.raises(dw.DicomwebError, match="HTTP 401") as err:
        dw.check_server(url.replace("http://", "http://alice:wrong@"))
    assert "wrong" not in str(err.value)

    # in the URL (percent-encoded: the password holds ':' and '@')
    assert dw.store_files(url.replace("http://", "http://alice:pa55%3Aword%40x@"), paths).instances == 2
    # in the environment
    monkeypatch.setenv(dw.ENV_USER, "alice")
    monkeypatch.setenv(dw.ENV_PASSWORD, "pa55:word@x")
    assert [(s.series_number, s.num_instances) for s in dw.query_series(url)] == [(9, 2)]


def test_predict_seg_dicom_seg_to_is_checked_before_predicting(orthanc, tmp_path, capsys):
    from orthodiff_nnunet.cli import main as cli

    key = tmp_path / "private" / "key.csv"
    key.parent.mkdir()
    key.write_text("pseudonym,case_id,cases,series\n")
    masks = tmp_path / "masks"
    base = ["predict", "seg", "-i", str(tmp_path / "images"), "-o", str(masks), "-m", str(tmp_path / "no_model")]
    assert cli([*base, "--dicom-seg-to", orthanc.dicomweb]) == 2
    assert "--dicom-seg-to apply to --dicom-seg OUT_DIR only" in capsys.readouterr().err
    wrong = orthanc.url.replace("http://", "http://carol:s3cret@") + "/wado"
    assert cli([*base, "--dicom-seg", str(tmp_path / "private" / "segs"), "--key-file", str(key),
                "--dicom-seg-to", wrong]) == 2
    err = capsys.readouterr().err
    assert f"DICOMweb server {orthanc.url}/wado: a test query (QIDO-RS) failed with HTTP 404" in err
    assert "s3cret" not in err and not masks.exists()  # refused before the model was even looked for


def test_scan_takes_an_export_folder_or_dicomweb(tmp_path, capsys):
    from orthodiff_nnunet.cli import main as cli

    out = ["-o", str(tmp_path / "manifest.csv")]
    assert cli(["scan", *out]) == 2
    assert "give the export folder or --dicomweb URL (one of them)" in capsys.readouterr().err
    assert cli(["scan", str(tmp_path), "--dicomweb", "http://127.0.0.1:1/dicom-web", *out]) == 2
    assert "(one of them)" in capsys.readouterr().err
    assert cli(["scan", str(tmp_path), "--cache", str(tmp_path / "c"), *out]) == 2
    assert "--cache applies to --dicomweb URL only" in capsys.readouterr().err
    assert not (tmp_path / "manifest.csv").exists()

# ----------------------------------------------------------------------------------------------
# the whole path: PACS -> scan -> convert -> predict -> DICOM SEG -> PACS

TINY_TRAIN_ID, PACS_SITE_ID = 581, 584
TINY_PLANS = "dicomwebTinyPlans"


@pytest.fixture
def tiny_seg_model(tmp_path, monkeypatch):
    """A sagittal segmentation model trained for 2 iterations on 4 phantom exams (1.6 mm pixels), with a
    shrunk network (as tests/test_predict_cli.py); nnU-Net's folders live in the test's tmp_path."""
    import dataclasses

    import torch

    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.segmentation import train_segmentation

    root = tmp_path / "nnunet"
    for k, v in {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "pre", "nnUNet_results": root / "res",
                 "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0"}.items():
        monkeypatch.setenv(k, str(v))
    site = write_site(tmp_path / "train_site", dataclasses.replace(SITE_3T, in_plane_spacing_mm=1.6), n_cases=4,
                      seed=31, orientations=("sag",), prevalence=0.5)
    convert(site, TINY_TRAIN_ID, "PacsTrain", num_processes=1, num_folds=2)
    planned = plan_and_preprocess([TINY_TRAIN_ID], num_processes=1, show_progress=False)
    name = planned.datasets[0].dataset_name
    write_shrunk_plans(root / "pre" / name, planned.datasets[0].plans_identifier, TINY_PLANS, max_features=4,
                       max_stages=3)
    torch.manual_seed(0)
    return train_segmentation(name, fold=0, init="scratch", plans=TINY_PLANS, epochs=1, iterations_per_epoch=2,
                              val_iterations_per_epoch=1, device="cpu", validate=False).model_folder


def _write_knee_exam(folder: Path) -> dict[str, list[Path]]:
    """One study as a scanner sends it to the PACS: a 3-slice localizer, a sagittal and a coronal series
    (1.6 mm pixels, 3 mm slices, 3 T)."""
    rng = np.random.default_rng(7)
    common = dict(patient_id="MRN-4411", patient_name="Roe^Richard", birth_date="19700101", study_date="20240301")
    exam = {
        "loc": write_series(folder / "loc", rng.integers(0, 900, (3, 32, 32)).astype(np.int16), (1.6, 1.6, 5.0),
                            (0.0, 0.0, 0.0), AX, series_number=1, series_description="LOCALIZER", **common),
        "sag": write_series(folder / "sag", rng.integers(100, 1000, (10, 32, 28)).astype(np.int16), (1.6, 1.6, 3.0),
                            (-20.0, 10.0, 30.0), SAG, series_number=3, series_description="PD SAG", **common),
        "cor": write_series(folder / "cor", rng.integers(100, 1000, (10, 28, 32)).astype(np.int16), (1.6, 1.6, 3.0),
                            (-20.0, 10.0, 30.0), COR, series_number=4, series_description="PD COR", **common),
    }
    study = pydicom.dcmread(exam["sag"][0]).StudyInstanceUID
    for paths in exam.values():
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.StudyInstanceUID, ds.AccessionNumber, ds.MagneticFieldStrength = study, "ACC-2024-77", "3"
            ds.save_as(p, enforce_file_format=True)
    return exam


@pytest.mark.slow  # trains a tiny model: ~40 s of CPU
def test_pacs_to_dicom_seg_and_back(orthanc, tiny_seg_model, tmp_path, capsys):
    """scan --dicomweb -> convert -> predict seg --dicom-seg ... --dicom-seg-to: the SEG is on the PACS, in the
    exam's study, referencing the sagittal series it segments."""
    import csv

    from orthodiff_nnunet.cli import main as cli

    exam = _write_knee_exam(tmp_path / "scanner")
    dw.store_files(orthanc.dicomweb, [p for paths in exam.values() for p in paths])

    private = tmp_path / "private"  # what stays at the site: manifest, cache, key table, SEGs
    manifest = private / "manifest.csv"
    assert cli(["scan", "--dicomweb", orthanc.dicomweb, "-o", str(manifest), "--site", "SiteP", "--no-progress"]) == 0
    assert f"draft manifest: {manifest}" in capsys.readouterr().out
    cache = private / dw.DEFAULT_CACHE_NAME
    rows = list(csv.DictReader(open(manifest, newline="")))
    active = [r for r in rows if not r["case_id"].startswith("#")]
    assert len(rows) == 3 and len(active) == 2  # the localizer is commented out
    study = pydicom.dcmread(exam["sag"][0]).StudyInstanceUID
    sag_uid = pydicom.dcmread(exam["sag"][0]).SeriesInstanceUID
    for r in active:  # the rows point into the cache, relative to the manifest's folder
        assert (private / r["image"]).resolve().is_relative_to(cache.resolve())
    assert sorted(p.name for p in (cache / study).iterdir()) == sorted(
        pydicom.dcmread(paths[0]).SeriesInstanceUID for paths in exam.values())

    # a second scan fetches nothing and writes the same manifest
    cached = {p: p.stat().st_mtime_ns for p in cache.rglob("*.dcm")}
    first_manifest = manifest.read_text()
    assert len(cached) == 3 + 10 + 10
    assert cli(["scan", "--dicomweb", orthanc.dicomweb, "-o", str(manifest), "--site", "SiteP", "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.dcm")} == cached
    assert manifest.read_text() == first_manifest

    key = private / "key.csv"
    assert cli(["convert", str(manifest), "-d", str(PACS_SITE_ID), "-n", "PacsSite", "--external", "-np", "1",
                "--key-file", str(key)]) == 0
    raw = Path(os.environ["nnUNet_raw"])
    images = next(raw.glob(f"Dataset{PACS_SITE_ID}_*Sag")) / "imagesTs"
    assert len(list(images.glob("*.nii.gz"))) == 1
    capsys.readouterr()
    segs = private / "segs"
    assert cli(["predict", "seg", "-i", str(images), "-o", str(tmp_path / "masks"), "-m", str(tiny_seg_model),
                "--device", "cpu", "--disable-tta", "-np", "0", "--dicom-seg", str(segs), "--key-file", str(key),
                "--site-root", str(private), "--dicom-seg-to", orthanc.dicomweb]) == 0
    (seg_file,) = sorted(segs.rglob("*.dcm"))

    # on the PACS: one SEG series in the exam's study, referencing the sagittal series, identical to the file
    (remote,) = dw.query_series(orthanc.dicomweb, modality="SEG")
    assert remote.study_uid == study and remote.num_instances == 1
    fetched = dw.retrieve_series(orthanc.dicomweb, [remote], tmp_path / "check", show_progress=False)
    (got,) = sorted(fetched.folders[0].glob("*.dcm"))
    assert got.read_bytes() == seg_file.read_bytes()
    ds = pydicom.dcmread(got)
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == study
    assert [r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence] == [sag_uid]
    sag_sops = {str(pydicom.dcmread(p).SOPInstanceUID) for p in exam["sag"]}
    assert {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == sag_sops
    assert orthanc.get("/statistics")["CountInstances"] == 3 + 10 + 10 + 1
