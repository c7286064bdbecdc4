"""``orthodiff predict seg|cls`` on a site as a user meets it: what is logged before a prediction starts,
the per-case progress bar, and errors whose suggested fix is a command that works (each test runs the
suggested command and checks that it succeeds).

Data: a tiny training site (5 sagittal phantom exams, 1.6 mm pixels) converted and planned, with
the demo-size network shrunk further; an external site (2 exams, sagittal and coronal) converted
with ``--external`` and *not* preprocessed, as a second site has it on its first day.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.cli import main as cli

from conftest import nnunet_env

pytestmark = pytest.mark.slow  # one shared fixture: two sites converted, one planned, two tiny models trained

TRAIN_ID, EXTERNAL_ID = 591, 595
PLANS = "predictCliPlans"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Training site 591 (sag) planned, a segmentation model (2 iterations) and a sag classifier (1 step);
    external site 595/596 (sag/cor, imagesTs only) converted, not preprocessed."""
    import torch

    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.classification import train_classification
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.segmentation import train_segmentation

    root = tmp_path_factory.mktemp("predict_cli")
    with nnunet_env(root):
        train = write_site(root / "siteA", dataclasses.replace(SITE_3T, in_plane_spacing_mm=1.6), n_cases=5, seed=21,
                           orientations=("sag",), prevalence=0.5)
        external = write_site(root / "siteB", dataclasses.replace(SITE_15T, in_plane_spacing_mm=1.6), n_cases=2,
                              seed=22, orientations=("sag", "cor"), prevalence=0.5)
        convert(train, TRAIN_ID, "PredTrain", num_processes=1, num_folds=2)
        convert(external, EXTERNAL_ID, "PredExt", external=True, num_processes=1)
        planned = plan_and_preprocess([TRAIN_ID], num_processes=1, show_progress=False)
        name = planned.datasets[0].dataset_name
        write_shrunk_plans(root / "pre" / name, planned.datasets[0].plans_identifier, PLANS, max_features=4,
                           max_stages=3)
        torch.manual_seed(0)
        seg = train_segmentation(name, fold=0, init="scratch", plans=PLANS, epochs=1, iterations_per_epoch=2,
                                 val_iterations_per_epoch=1, device="cpu", validate=False)
        cls = train_classification(TRAIN_ID, views=["sag"], plans=PLANS, fold=0, mode="scratch", epochs=1,
                                   iterations_per_epoch=1, batch_size=2, n_boot=10, device="cpu")
        raw = root / "raw"
        yield SimpleNamespace(root=root, seg_model=seg.model_folder, cls_run=cls.output_folder,
                              ext_sag=next(raw.glob(f"Dataset{EXTERNAL_ID}_*")),
                              ext_cor=next(raw.glob(f"Dataset{EXTERNAL_ID + 1}_*")))


def _suggested(stderr: str, pattern: str) -> str:
    assert "np." not in stderr, stderr  # plain numbers, no numpy reprs
    found = re.search(pattern, stderr)
    assert found, f"no suggestion matching {pattern!r} in:\n{stderr}"
    return found.group(1)


def _same_geometry(mask: Path, image: Path) -> None:
    m, i = sitk.ReadImage(str(mask)), sitk.ReadImage(str(image))
    assert m.GetSize() == i.GetSize()
    np.testing.assert_allclose(m.GetSpacing(), i.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(m.GetDirection(), i.GetDirection(), atol=1e-6)


# ----------------------------------------------------------------------------------------------
def test_predict_cls_on_unpreprocessed_external_site_suggests_the_working_command(site, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    argv = ["predict", "cls", "-m", str(site.cls_run), "-d", str(EXTERNAL_ID), "-o", str(out), "--device", "cpu",
            "--n-boot", "10"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    command = _suggested(err, r"`(orthodiff plan_and_preprocess [^`]+)`")
    # the external site gets the training site's plans (it cannot be planned itself), by the model's plans name,
    # for the model's view only
    assert command == (f"orthodiff plan_and_preprocess -d {EXTERNAL_ID} --plans-from {TRAIN_ID} "
                       f"--plans-name {PLANS} -c 3d_classification")
    assert cli(shlex.split(command)[1:]) == 0  # the suggested command, as given
    assert cli(argv) == 0  # and then prediction works
    lines = out.read_text().strip().splitlines()
    assert len(lines) == 1 + 2  # header + the 2 external exams

    # a site not converted yet: the same plans options, and what has to be here first
    assert cli([*argv[:5], "599", *argv[6:]]) == 2
    err = capsys.readouterr().err
    assert f"--plans-from Dataset{TRAIN_ID}_PredTrainSag --plans-name {PLANS} -c 3d_classification" in err
    assert "orthodiff convert MANIFEST -d ID -n NAME --external" in err and "plan_and_preprocess -d 599`" not in err


def test_predict_seg_given_a_dataset_folder_suggests_its_images_folder(site, tmp_path, capsys):
    base = ["predict", "seg", "-o", str(tmp_path / "masks"), "-m", str(site.seg_model), "--device", "cpu",
            "--disable-tta", "-np", "0"]
    assert cli(["predict", "seg", "-i", str(site.ext_sag), *base[2:]]) == 2
    err = capsys.readouterr().err
    images = _suggested(err, r"pass -i (\S+)")
    assert Path(images) == site.ext_sag / "imagesTs"
    assert cli(["predict", "seg", "-i", images, *base[2:]]) == 0
    masks = sorted((tmp_path / "masks").glob("*.nii.gz"))
    sources = sorted(Path(images).glob("*_0000.nii.gz"))
    assert len(masks) == len(sources) == 2
    for m, s in zip(masks, sources):
        _same_geometry(m, s)


def test_predict_seg_with_another_planes_images_points_to_the_models_plane(site, tmp_path, capsys):
    """Coronal images of a converted site given to a sagittal model: converting again would not help; the
    message names the site's sagittal images."""
    out = tmp_path / "masks"
    rest = ["-o", str(out), "-m", str(site.seg_model), "--device", "cpu", "--disable-tta", "-np", "0"]
    assert cli(["predict", "seg", "-i", str(site.ext_cor / "imagesTs"), *rest]) == 2
    err = capsys.readouterr().err
    assert "these are cor images, the model is sag" in err and "orthodiff convert" not in err
    images = _suggested(err, r"pass -i (\S+?):?\n")
    assert Path(images) == site.ext_sag / "imagesTs"
    assert cli(["predict", "seg", "-i", images, *rest]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_predict_seg_says_what_runs_and_shows_progress_per_case(site, tmp_path, caplog, capsys):
    from orthodiff_nnunet.segmentation import predict_segmentation

    images = site.ext_sag / "imagesTs"
    with caplog.at_level(logging.INFO, logger="orthodiff_nnunet.segmentation"):
        result = predict_segmentation(images, tmp_path / "tta", site.seg_model, device="cpu", mirroring=True,
                                      num_processes=0)
    text = caplog.text
    assert "predicting 2 case(s) with nnUNetTrainerOrthoDiffSegScratch__" in text and "on cpu" in text
    assert "mirroring on (axes 0, 1, 2: 8 network passes per sliding-window tile)" in text
    assert "up to 8x slower" in text and "--disable-tta" in text
    assert re.search(r"predicted 2 case\(s\) in \d+ s", text)
    err = capsys.readouterr().err
    assert re.search(r"predict seg: 100%\|[^|]*\| 2/2 \[", err), err[-2000:]  # per-case bar with rate/ETA
    assert len(result.masks) == 2

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orthodiff_nnunet.segmentation"):
        fast = predict_segmentation(images, tmp_path / "no_tta", site.seg_model, device="cpu", mirroring=False,
                                    num_processes=1)  # nnU-Net's multiprocess path
    assert "on cpu; mirroring off" in caplog.text and "8x" not in caplog.text
    assert re.search(r"predict seg: 100%\|[^|]*\| 2/2 \[", capsys.readouterr().err)
    assert [m.name for m in fast.masks] == [m.name for m in result.masks]


def test_predict_seg_missing_checkpoint_names_the_one_there(site, tmp_path, capsys):
    rest = ["-i", str(site.ext_sag / "imagesTs"), "-o", str(tmp_path / "m"), "-m", str(site.seg_model),
            "--device", "cpu", "--disable-tta", "-np", "0"]
    assert cli(["predict", "seg", *rest, "--checkpoint", "checkpoint_latest.pth"]) == 2  # nnU-Net removes it at the end
    err = capsys.readouterr().err
    flag = _suggested(err, r"pass (--checkpoint \S+)")
    assert flag == "--checkpoint checkpoint_final.pth"
    assert cli(["predict", "seg", *rest, *flag.split()]) == 0


def test_predict_seg_given_the_datasets_results_folder_names_the_model_folder(site, tmp_path, capsys):
    rest = ["-i", str(site.ext_sag / "imagesTs"), "-o", str(tmp_path / "m"), "--device", "cpu", "--disable-tta",
            "-np", "0"]
    assert cli(["predict", "seg", *rest, "-m", str(site.seg_model.parent)]) == 2
    model = _suggested(capsys.readouterr().err, r"pass -m (\S+)")
    assert Path(model) == site.seg_model
    assert cli(["predict", "seg", *rest, "-m", model]) == 0
    assert len(list((tmp_path / "m").glob("*.nii.gz"))) == 2


def test_predict_seg_writes_dicom_segs_on_the_source_series(site, tmp_path, capsys):
    """A DICOM site converted with --key-file, predicted with --dicom-seg: one SEG per case on its source slices,
    equal to the predicted mask voxel for voxel (checks shared with tests/test_dicom_seg.py)."""
    from conftest import PLANE_DIRECTIONS, write_manifest
    from test_dicom_seg import _check_seg, _files_sorted

    from orthodiff_nnunet.io.dicom import write_series
    from orthodiff_nnunet.io.dicom_seg import label_names_from_dataset_json

    dicom_site = tmp_path / "siteC"
    arr = np.random.default_rng(5).integers(100, 1000, size=(6, 32, 28)).astype(np.int16)
    files = write_series(dicom_site / "exam1", arr, spacing=(1.6, 1.6, 3.0), origin=(-20.0, 10.0, 30.0),
                         direction=PLANE_DIRECTIONS["sag"].flatten().tolist(), patient_id="MRN-77", series_number=3)
    manifest = write_manifest(dicom_site / "manifest.csv", [
        {"case_id": "ACC-9", "patient_id": "MRN-77", "site": "SiteC", "field_strength": "3", "image": "exam1"}])
    key = tmp_path / "private" / "key.csv"
    assert cli(["convert", str(manifest), "-d", "597", "-n", "PredDcm", "--external", "-np", "1",
                "--key-file", str(key)]) == 0
    images = next((site.root / "raw").glob("Dataset597_*")) / "imagesTs"
    capsys.readouterr()
    out, segs = tmp_path / "masks", tmp_path / "private" / "segs"
    assert cli(["predict", "seg", "-i", str(images), "-o", str(out), "-m", str(site.seg_model), "--device", "cpu",
                "--disable-tta", "-np", "0", "--dicom-seg", str(segs), "--key-file", str(key),
                "--site-root", str(dicom_site)]) == 0
    assert "DICOM SEG: 1 written, 0 skipped" in capsys.readouterr().out
    (mask,) = sorted(out.glob("*.nii.gz"))
    (seg,) = sorted(segs.rglob("*.dcm"))
    assert seg.parent.name == mask.name[: -len(".nii.gz")] and seg.name == "seg_sag.dcm"
    import json

    names = label_names_from_dataset_json(json.loads((Path(site.seg_model) / "dataset.json").read_text()))
    _check_seg(seg, _files_sorted(files), sitk.ReadImage(str(mask)), names, require_foreground=False)
