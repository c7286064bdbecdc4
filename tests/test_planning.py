"""Per-orientation planning and resumable preprocessing (orthodiff plan_and_preprocess).

Tiny synthetic datasets in the canonical LPS layout, numpy (z=S, y=P, x=L), with the thick
(3 mm) axis at the array position of each orientation: sag numpy axis 2, cor 1, ax 0.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk

from orthodiff_nnunet.orientation import THROUGH_PLANE_NUMPY_AXIS, to_canonical
from orthodiff_nnunet.plans import (
    CLASSIFICATION_CONFIGURATION,
    DIFFUSION_CONFIGURATION,
    SEGMENTATION_CONFIGURATION,
    OrthodiffPlansBlock,
    PlansError,
    preprocessing_hash,
    read_orthodiff_block,
    resolve_configuration,
    with_orthodiff_block,
)
from orthodiff_nnunet.schemes import ORIENTATION_SUFFIX

IN_PLANE = (80, 64)  # voxels along the two in-plane axes, in array order
SLICES = 14
IP_MM, TP_MM = 0.4, 3.0


@pytest.fixture(scope="module", autouse=True)
def _restore_nnunet_env():
    """plan_and_preprocess exports nnUNet_raw/preprocessed; do not leak them into other test modules."""
    with mock.patch.dict(os.environ):
        yield


def canonical_shape_and_spacing(orientation: str, in_plane=IN_PLANE, slices=SLICES, ip=IP_MM, tp=TP_MM):
    """Numpy shape and spacing (z=S, y=P, x=L) with the thick axis where the orientation puts it."""
    axis = THROUGH_PLANE_NUMPY_AXIS[orientation]
    shape, spacing, it = [], [], iter(in_plane)
    for a in range(3):
        shape.append(slices if a == axis else next(it))
        spacing.append(tp if a == axis else ip)
    return tuple(shape), tuple(spacing)


def make_raw_dataset(
    raw: Path, dataset_id: int, name: str, orientation: str, *, n_cases: int = 4, base_id: int | None = None,
    labeled: bool = True, declare_num_labeled: bool = True, external: bool = False, seed: int = 0,
    in_plane=IN_PLANE, slices=SLICES, ip=IP_MM, tp=TP_MM, spacings_tp: list[float] | None = None,
) -> Path:
    """A raw dataset as `orthodiff convert` writes it: canonical LPS NIfTI, dataset.json with the orthodiff block."""
    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_{name}{ORIENTATION_SUFFIX[orientation]}"
    img_dir, lab_dir = ("imagesTs", "labelsTs") if external else ("imagesTr", "labelsTr")
    (folder / img_dir).mkdir(parents=True, exist_ok=True)
    (folder / lab_dir).mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n_cases):
        this_tp = spacings_tp[i] if spacings_tp else tp
        shape, spacing = canonical_shape_and_spacing(orientation, in_plane, slices, ip, this_tp)
        grid = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
        r = np.sqrt(sum((g / (0.3 * n * s)) ** 2 for g, n, s in zip(grid, shape, spacing)))
        lab = np.zeros(shape, np.uint8)
        if labeled:
            lab[r < 1] = 1
            lab[r < 0.5] = 2
        img = (np.abs(rng.normal(20, 5, shape)) + 200 * (r < 1) + 100 * (r < 0.5)).astype(np.float32)
        case = f"{name.lower()}_{i:03d}"
        for arr, path in ((img, folder / img_dir / f"{case}_0000.nii.gz"), (lab, folder / lab_dir / f"{case}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK order (x, y, z)
            sitk.WriteImage(im, str(path))
        cases.append(case)
    block = {
        "orientation": orientation, "through_plane_numpy_axis": THROUGH_PLANE_NUMPY_AXIS[orientation],
        "layout": "LPS", "name": name, "base_dataset_id": base_id if base_id is not None else dataset_id,
        "external": external, "sites": ["SiteA"], "abnormality_labels": ["ACL", "MM", "EFFU"],
        "targets_file": "orthodiff_targets.json",
    }
    if declare_num_labeled:
        block["num_labeled"] = n_cases if labeled else 0
        block["num_unlabeled"] = 0 if labeled else n_cases
    dataset_json = {
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "femur": 1, "tibia": 2},
        "numTraining": 0 if external else n_cases, "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO", "name": folder.name[11:], "orthodiff": block,
    }
    if external:
        dataset_json["numTest"] = n_cases
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    if not external:
        (folder / "splits_final.json").write_text(json.dumps([{"train": cases[:-1], "val": cases[-1:]}]))
    return folder


def make_group(raw: Path, base_id: int, name: str, orientations=("sag", "cor", "ax"), **kw) -> list[Path]:
    from orthodiff_nnunet.schemes import ORIENTATION_ID_OFFSET

    return [make_raw_dataset(raw, base_id + ORIENTATION_ID_OFFSET[o], name, o, base_id=base_id, **kw)
            for o in orientations]


def load_plans_of(pre: Path, folder: Path, identifier: str = "orthodiffResEncMPlans") -> dict:
    return json.loads((pre / folder.name / f"{identifier}.json").read_text())


def arch(plans: dict, configuration: str = SEGMENTATION_CONFIGURATION) -> dict:
    return resolve_configuration(plans, configuration)["architecture"]["arch_kwargs"]


# --------------------------------------------------------------------------------------------- fast unit tests
def _block(**kw) -> OrthodiffPlansBlock:
    base = dict(orientation="sag", through_plane_numpy_axis=2, through_plane_patch_axis=0,
                label_names=["background", "femur"], abnormality_names=["ACL"], source_datasets=["Dataset501_KSag"],
                planner="OrthodiffResEncMPlanner", planner_version="1.0")
    base.update(kw)
    return OrthodiffPlansBlock(**base)


def test_block_round_trip_and_validation():
    block = _block(estimated_vram_gb={"3d_fullres": 7.123456})
    again = OrthodiffPlansBlock.from_dict(json.loads(json.dumps(block.to_dict())))
    assert again.label_names == ("background", "femur")
    assert again.configuration_for("diffusion") == DIFFUSION_CONFIGURATION
    assert again.estimated_vram_gb == {"3d_fullres": 7.123}
    with pytest.raises(PlansError, match="does not match orientation 'cor'"):
        _block(orientation="cor")
    with pytest.raises(PlansError, match="duplicates"):
        _block(label_names=["background", "femur", "femur"])
    with pytest.raises(PlansError, match="unknown key"):
        OrthodiffPlansBlock.from_dict({**block.to_dict(), "surprise": 1})
    with pytest.raises(PlansError, match="lacks key"):
        OrthodiffPlansBlock.from_dict({k: v for k, v in block.to_dict().items() if k != "orientation"})
    with pytest.raises(PlansError, match="no 'orthodiff' block"):
        read_orthodiff_block({"plans_name": "nnUNetPlans", "configurations": {}})
    plans = {"transpose_forward": [2, 0, 1], "configurations": {c: {} for c in
             (SEGMENTATION_CONFIGURATION, DIFFUSION_CONFIGURATION, CLASSIFICATION_CONFIGURATION)}}
    assert read_orthodiff_block(with_orthodiff_block(plans, block)) == block
    with pytest.raises(PlansError, match="transpose_forward"):
        with_orthodiff_block({**plans, "transpose_forward": [0, 1, 2]}, block)
    with pytest.raises(PlansError, match="do not have"):
        with_orthodiff_block({**plans, "configurations": {}}, block)


def test_preprocessing_hash_ignores_patch_and_batch():
    plans = {
        "transpose_forward": [2, 0, 1], "image_reader_writer": "SimpleITKIO",
        "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}},
        "configurations": {
            "3d_fullres": {"data_identifier": "p_3d_fullres", "spacing": [3.0, 0.4, 0.4], "patch_size": [12, 64, 64],
                           "batch_size": 2, "normalization_schemes": ["ZScoreNormalization"]},
            "3d_diffusion": {"inherits_from": "3d_fullres", "patch_size": [6, 64, 64], "batch_size": 8},
        },
    }
    h = preprocessing_hash(plans, "3d_fullres")
    assert h == preprocessing_hash(plans, "3d_diffusion")  # same data, one preprocessing pass
    plans["configurations"]["3d_fullres"]["batch_size"] = 5
    assert h == preprocessing_hash(plans, "3d_fullres")
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 0.4, 0.4]
    assert h != preprocessing_hash(plans, "3d_fullres")


def _bare_planner(orientation: str, spacings: list[list[float]], shapes: list[list[int]] | None = None):
    """An orthodiff planner and nnU-Net's default planner on a given fingerprint, without any files."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from orthodiff_nnunet.planners import OrthodiffResEncMPlanner

    shapes = shapes or [[40, 400, 400]] * len(spacings)
    ours = object.__new__(OrthodiffResEncMPlanner)
    theirs = object.__new__(ExperimentPlanner)
    for p in (ours, theirs):
        p.dataset_fingerprint = {"spacings": spacings, "shapes_after_crop": shapes}
        p.overwrite_target_spacing = None
        p.suppress_transpose = False
        p.anisotropy_threshold = 3
        p.dataset_name = f"Dataset999_Test{orientation}"
    ours.orientation = orientation
    ours.through_plane_axis = THROUGH_PLANE_NUMPY_AXIS[orientation]
    return ours, theirs


def test_transpose_puts_the_through_plane_axis_first():
    for orientation, expected in (("sag", [2, 0, 1]), ("cor", [1, 0, 2]), ("ax", [0, 1, 2])):
        _, spacing = canonical_shape_and_spacing(orientation)
        ours, theirs = _bare_planner(orientation, [list(spacing)] * 3)
        forward, backward = ours.determine_transpose()
        assert forward == expected
        assert [forward[b] for b in backward] == [0, 1, 2]
    # isotropic 3D acquisition: nnU-Net's spacing guess keeps array order for every plane, we do not
    ours, theirs = _bare_planner("sag", [[0.5, 0.5, 0.5]] * 3)
    assert ours.determine_transpose()[0] == [2, 0, 1]
    assert [int(i) for i in theirs.determine_transpose()[0]] == [0, 1, 2]


def test_target_spacing_rules():
    # thick sagittal slices of mixed thickness: 10th percentile through-plane, in-plane median kept
    tp = [3.0, 3.0, 3.3, 3.3, 4.0, 4.0, 4.0, 4.5, 4.5, 4.5]
    ours, theirs = _bare_planner("sag", [[0.4, 0.4, t] for t in tp])
    np.testing.assert_allclose(ours.determine_fullres_target_spacing(), [0.4, 0.4, 3.0])
    # nnU-Net needs anisotropic voxel counts too; with many thin-ish slices it takes the median
    ours, theirs = _bare_planner("sag", [[0.4, 0.4, t] for t in tp], shapes=[[300, 300, 120]] * len(tp))
    np.testing.assert_allclose(ours.determine_fullres_target_spacing(), [0.4, 0.4, 3.0])
    np.testing.assert_allclose(theirs.determine_fullres_target_spacing(), [0.4, 0.4, 4.0])
    # never resample thick slices finer than the in-plane spacing
    ours, _ = _bare_planner("cor", [[0.5, 0.45, 0.5]] * 2 + [[0.5, 3.0, 0.5]] * 8)
    np.testing.assert_allclose(ours.determine_fullres_target_spacing(), [0.5, 0.5, 0.5])
    # near-isotropic 3D data (DESS-like 0.7 mm slices): median, as nnU-Net
    ours, theirs = _bare_planner("ax", [[0.7, 0.36, 0.36]] * 3)
    np.testing.assert_allclose(ours.determine_fullres_target_spacing(), [0.7, 0.36, 0.36])
    np.testing.assert_allclose(theirs.determine_fullres_target_spacing(), [0.7, 0.36, 0.36])


def test_resolve_datasets_by_ids_and_orientation_filter(tmp_path: Path):
    from orthodiff_nnunet.planning import PlanningError, resolve_datasets

    raw = tmp_path / "raw"
    for o, off in (("sag", 0), ("cor", 1), ("ax", 2)):
        folder = raw / f"Dataset{601 + off}_Knee{ORIENTATION_SUFFIX[o]}"
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text(json.dumps({"orthodiff": {
            "orientation": o, "through_plane_numpy_axis": THROUGH_PLANE_NUMPY_AXIS[o],
            "base_dataset_id": 601, "name": "Knee"}}))
    names = lambda infos: [i.name for i in infos]  # noqa: E731
    assert names(resolve_datasets([601, 602, 603], raw=raw)) == [
        "Dataset601_KneeSag", "Dataset602_KneeCor", "Dataset603_KneeAx"]
    assert names(resolve_datasets([601], raw=raw)) == ["Dataset601_KneeSag"]
    assert names(resolve_datasets([601], ["cor", "axial"], raw=raw)) == ["Dataset602_KneeCor", "Dataset603_KneeAx"]
    assert names(resolve_datasets(["Dataset603_KneeAx", 602], ["sag", "cor"], raw=raw)) == [
        "Dataset601_KneeSag", "Dataset602_KneeCor"]
    with pytest.raises(PlanningError, match="no dataset with id 700"):
        resolve_datasets([700], raw=raw)
    with pytest.raises(ValueError, match="unknown orientation"):
        resolve_datasets([601], ["oblique"], raw=raw)


# --------------------------------------------------------------------------------------------- planned group
@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Datasets 501 (sag), 502 (cor), 503 (ax) planned and preprocessed once for the tests below."""
    from orthodiff_nnunet.planning import plan_and_preprocess

    root = tmp_path_factory.mktemp("planning")
    raw, pre = root / "raw", root / "pre"
    folders = make_group(raw, 501, "Knee")
    result = plan_and_preprocess([501], orientations=["sag", "cor", "ax"], num_processes=1, raw=raw,
                                 preprocessed=pre, show_progress=False)
    return raw, pre, folders, result


def test_plans_per_orientation(planned):
    raw, pre, folders, result = planned
    assert [d.dataset_name for d in result.datasets] == [f.name for f in folders]
    for folder, orientation in zip(folders, ("sag", "cor", "ax")):
        plans = load_plans_of(pre, folder)
        tp = THROUGH_PLANE_NUMPY_AXIS[orientation]
        assert plans["transpose_forward"] == [tp] + [a for a in range(3) if a != tp]
        fullres = resolve_configuration(plans, SEGMENTATION_CONFIGURATION)
        # thick axis kept at 3 mm, in-plane 0.4 mm kept (NIfTI stores float32: 0.4000000059604645)
        np.testing.assert_allclose(fullres["spacing"], [3.0, 0.4, 0.4], rtol=1e-6)
        assert fullres["median_image_size_in_voxels"] == [14, 80, 64]
        assert fullres["patch_size"] == [14, 80, 64]
        assert fullres["batch_size"] == 4
        a = arch(plans)
        assert a["n_stages"] == 5
        assert a["kernel_sizes"] == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
        assert a["strides"] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
        # diffusion: same topology and data, through-plane halved to a multiple of 2, batch refilled
        diffusion = resolve_configuration(plans, DIFFUSION_CONFIGURATION)
        assert diffusion["patch_size"] == [6, 80, 64]
        assert diffusion["batch_size"] == 9
        assert arch(plans, DIFFUSION_CONFIGURATION) == a
        assert diffusion["data_identifier"] == fullres["data_identifier"] == "orthodiffResEncMPlans_3d_fullres"
        # classification: whole field of view (14 x 80 x 64 rounded up to the divisibility 2 x 16 x 16)
        classification = resolve_configuration(plans, CLASSIFICATION_CONFIGURATION)
        assert classification["patch_size"] == [14, 80, 64]
        assert classification["batch_size"] == 4
        assert arch(plans, CLASSIFICATION_CONFIGURATION) == a
        block = read_orthodiff_block(plans)
        assert block.orientation == orientation
        assert block.through_plane_numpy_axis == tp and block.through_plane_patch_axis == 0
        assert block.label_names == ("background", "femur", "tibia")
        assert block.abnormality_names == ("ACL", "MM", "EFFU")
        assert block.source_datasets == (folder.name,)
        assert block.planner == "OrthodiffResEncMPlanner" and block.planner_version == "1.0"
        assert block.intensity_statistics == "foreground"
        assert set(block.estimated_vram_gb) == {SEGMENTATION_CONFIGURATION, DIFFUSION_CONFIGURATION,
                                                CLASSIFICATION_CONFIGURATION}
        assert 0 < block.estimated_vram_gb[SEGMENTATION_CONFIGURATION] <= 8
        # preprocessed once, arrays transposed to (through-plane, in-plane, in-plane)
        data_dir = pre / folder.name / "orthodiffResEncMPlans_3d_fullres"
        assert len(list(data_dir.glob("*_seg.b2nd"))) == 4
        assert not (pre / folder.name / "orthodiffResEncMPlans_3d_diffusion").exists()
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

        data, seg, _, props = nnUNetDatasetBlosc2(str(data_dir)).load_case(f"knee_000")
        assert data.shape == (1, 14, 80, 64) and seg.shape == (1, 14, 80, 64)
        assert len(props["class_locations"][2]) > 0
        # splits and ground truth copied for nnU-Net's trainer
        assert json.loads((pre / folder.name / "splits_final.json").read_text())[0]["val"] == ["knee_003"]
        assert len(list((pre / folder.name / "gt_segmentations").glob("*.nii.gz"))) == 4
        summary = result.dataset(orientation)
        assert summary.num_preprocessed == 4 and summary.num_skipped == 0
        assert summary.configuration(DIFFUSION_CONFIGURATION).patch_size == (6, 80, 64)
    # the meta-device memory estimate is nnU-Net's number, and the one-pass listing nnU-Net's listing
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from orthodiff_nnunet.planners import OrthodiffResEncMPlanner
    from orthodiff_nnunet.planning import _find_dataset, list_training_cases

    architecture = resolve_configuration(plans, SEGMENTATION_CONFIGURATION)["architecture"]
    estimate_args = ([14, 80, 64], 1, 3, architecture["network_class_name"], architecture["arch_kwargs"],
                     architecture["_kw_requires_import"])
    assert OrthodiffResEncMPlanner.static_estimate_VRAM_usage(*estimate_args) == \
        ExperimentPlanner.static_estimate_VRAM_usage(*estimate_args)
    info = _find_dataset(raw, 503)
    assert list_training_cases(info) == get_filenames_of_train_images_and_targets(str(info.folder),
                                                                                   info.dataset_json)
    text = result.summary()
    for o in ("orientation sag", "orientation cor", "orientation ax", "3 x 0.4 x 0.4", "14 x 80 x 64", "6 x 80 x 64"):
        assert o in text


def test_resume_skips_cases_done_with_the_same_plans(planned):
    from orthodiff_nnunet.planning import plan_and_preprocess

    raw, pre, folders, _ = planned
    sag = folders[0].name
    again = plan_and_preprocess([501], num_processes=1, raw=raw, preprocessed=pre, show_progress=False)
    d = again.dataset(sag)
    assert (d.num_cases, d.num_preprocessed, d.num_skipped, d.fingerprint_reused, d.plans_reused) == \
        (4, 0, 4, True, True)
    data_dir = pre / sag / "orthodiffResEncMPlans_3d_fullres"
    (data_dir / "knee_002.b2nd").unlink()  # an interrupted case
    d = plan_and_preprocess([501], num_processes=1, raw=raw, preprocessed=pre, show_progress=False).dataset(sag)
    assert (d.num_preprocessed, d.num_skipped) == (1, 3)
    # data made under other plans (here: a tampered record) is redone from scratch
    record = pre / sag / ".orthodiffResEncMPlans_3d_fullres.orthodiff_progress.json"
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "hash": "something else"}))
    d = plan_and_preprocess([501], num_processes=1, raw=raw, preprocessed=pre, show_progress=False).dataset(sag)
    assert (d.num_preprocessed, d.num_skipped) == (4, 0)
    # a different memory target is a different plans file (and data folder); the old one stays
    d = plan_and_preprocess([501], num_processes=1, gpu_memory_gb=4, raw=raw, preprocessed=pre,
                            show_progress=False, preprocess=False).dataset(sag)
    assert d.plans_identifier == "orthodiffResEncMPlans_4G" and not d.plans_reused
    assert read_orthodiff_block(load_plans_of(pre, folders[0], "orthodiffResEncMPlans_4G")).gpu_memory_target_gb == 4


def test_plans_transfer_to_an_unlabeled_corpus_and_an_external_site(planned):
    from orthodiff_nnunet.planning import PlanningError, plan_and_preprocess

    raw, pre, folders, _ = planned
    # an unlabeled sagittal + coronal corpus with other geometry (thinner slices, larger field of view)
    corpus = make_group(raw, 511, "Corpus", ("sag", "cor"), labeled=False, n_cases=3, in_plane=(96, 72),
                        slices=20, tp=2.5, seed=3)
    external = make_raw_dataset(raw, 521, "Ext", "sag", external=True, n_cases=2, seed=4)
    result = plan_and_preprocess([511, 512, 521], plans_from=501, num_processes=1, raw=raw, preprocessed=pre,
                                 show_progress=False)
    for folder, source in ((corpus[0], folders[0]), (corpus[1], folders[1]), (external, folders[0])):
        theirs, ours = load_plans_of(pre, folder), load_plans_of(pre, source)
        for c in (SEGMENTATION_CONFIGURATION, DIFFUSION_CONFIGURATION, CLASSIFICATION_CONFIGURATION):
            assert resolve_configuration(theirs, c) == resolve_configuration(ours, c)
        assert theirs["transpose_forward"] == ours["transpose_forward"]
        assert theirs["foreground_intensity_properties_per_channel"] == \
            ours["foreground_intensity_properties_per_channel"]
        assert theirs["dataset_name"] == folder.name
        block = read_orthodiff_block(theirs)
        assert block.plans_transferred_from == source.name
        assert block.source_datasets == (source.name,)
        assert not (pre / folder.name / "dataset_fingerprint.json").exists()  # never fingerprinted
    d = result.dataset(corpus[0].name)
    assert (d.num_cases, d.num_preprocessed, d.transferred_from) == (3, 3, folders[0].name)
    ext = result.dataset(external.name)  # imagesTs/labelsTs preprocessed with the training site's plans
    assert (ext.num_cases, ext.num_preprocessed) == (2, 2)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data_dir = pre / corpus[0].name / "orthodiffResEncMPlans_3d_fullres"
    data, seg, _, _ = nnUNetDatasetBlosc2(str(data_dir)).load_case("corpus_000")
    assert data.shape == (1, round(20 * 2.5 / 3.0), 96, 72)  # resampled to the source's 3 mm slices
    assert int(np.max(seg)) == 0
    # errors that say what to do
    with pytest.raises(PlanningError, match="external site"):
        plan_and_preprocess([521], num_processes=1, raw=raw, preprocessed=pre, show_progress=False)
    make_raw_dataset(raw, 531, "Lonely", "sag", n_cases=2)
    with pytest.raises(PlanningError, match="has no cor dataset"):
        plan_and_preprocess([512], plans_from=531, num_processes=1, raw=raw, preprocessed=pre,
                            show_progress=False)
    with pytest.raises(PlanningError, match="plan it first"):
        plan_and_preprocess([511], plans_from=531, num_processes=1, raw=raw, preprocessed=pre,
                            show_progress=False)


def test_cli_parser_runs_and_prints_the_summary(planned, capsys, monkeypatch):
    from orthodiff_nnunet.cli.planning import add_plan_and_preprocess_parser

    raw, pre, _, _ = planned
    # in-process augmentation (set for training) must not break planning's memory estimate
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    parser = argparse.ArgumentParser(prog="orthodiff")
    sub = parser.add_subparsers(dest="command")
    add_plan_and_preprocess_parser(sub)
    args = parser.parse_args(["plan_and_preprocess", "-d", "501", "--orientations", "ax", "-np", "1",
                              "--raw", str(raw), "--preprocessed", str(pre), "--no-progress"])
    assert args.orientations == ["ax"] and args.planner == "resenc_m" and args.gpu_memory_gb is None
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "orientation ax" in out and "Dataset503_KneeAx" in out and "orientation sag" not in out
    assert "3d_classification" in out and "4 already done" in out
    assert os.environ["nnUNet_n_proc_DA"] == "0"


def test_splits_conflict_is_reported(planned):
    from orthodiff_nnunet.planning import PlanningError, plan_and_preprocess

    raw, pre, folders, _ = planned
    ax = folders[2]
    original = (ax / "splits_final.json").read_text()
    try:
        (ax / "splits_final.json").write_text(json.dumps([{"train": ["knee_000"], "val": ["knee_001"]}]))
        with pytest.raises(PlanningError, match="splits_final.json"):
            plan_and_preprocess([503], num_processes=1, raw=raw, preprocessed=pre, show_progress=False)
    finally:
        (ax / "splits_final.json").write_text(original)


# --------------------------------------------------------------------------------------------- no foreground
def test_all_background_labels_do_not_crash_planning(tmp_path: Path):
    """nnU-Net's fingerprint raises IndexError without foreground; we fall back to nonzero-image statistics."""
    from orthodiff_nnunet.planning import plan_and_preprocess

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    # num_labeled not declared: the IndexError path of nnU-Net's extractor is exercised
    folder = make_raw_dataset(raw, 541, "Blank", "cor", labeled=False, declare_num_labeled=False, n_cases=2)
    result = plan_and_preprocess([541], num_processes=1, raw=raw, preprocessed=pre, show_progress=False)
    plans = load_plans_of(pre, folder)
    assert read_orthodiff_block(plans).intensity_statistics == "nonzero image"
    assert plans["foreground_intensity_properties_per_channel"]["0"]["median"] > 0
    np.testing.assert_allclose(resolve_configuration(plans, SEGMENTATION_CONFIGURATION)["spacing"],
                               [3.0, 0.4, 0.4], rtol=1e-6)
    assert result.dataset("cor").num_preprocessed == 2
    fingerprint = json.loads((pre / folder.name / "dataset_fingerprint.json").read_text())
    assert fingerprint["orthodiff_intensity_statistics"] == "nonzero image"


# --------------------------------------------------------------------------------------------- real DESS knee
def _shared_data() -> Path | None:
    env = os.environ.get("ORTHODIFF_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.mark.realdata
@pytest.mark.slow
def test_real_dess_knee_gets_sane_plans(tmp_path: Path):
    """pyKNEEr's sagittal 3D DESS (GE 3T, 512 x 512 x 80, 0.3125 x 0.3125 x 1.5 mm), full resolution."""
    shared = _shared_data()
    series = shared / "dicom" / "pykneer_dess_sag_3t" / "echo1" if shared else None
    if series is None or not series.is_dir():
        pytest.skip("real data ../shared/data/dicom/pykneer_dess_sag_3t/echo1 is absent "
                    "(set ORTHODIFF_SHARED_DATA to the shared data folder to run this test)")
    from orthodiff_nnunet.planning import plan_and_preprocess

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    image = to_canonical(reader.Execute())
    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    folder = raw / "Dataset551_DessSag"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    label = sitk.GetImageFromArray((array > np.percentile(array, 90)).astype(np.uint8))  # a crude "structure"
    label.CopyInformation(image)
    sitk.WriteImage(image, str(folder / "imagesTr" / "dess_0000.nii.gz"))
    sitk.WriteImage(label, str(folder / "labelsTr" / "dess.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "bright": 1}, "numTraining": 1,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
        "orthodiff": {"orientation": "sag", "through_plane_numpy_axis": 2, "base_dataset_id": 551, "name": "Dess",
                      "abnormality_labels": []}}))
    result = plan_and_preprocess([551], num_processes=1, raw=raw, preprocessed=pre, preprocess=False,
                                 show_progress=False)
    plans = load_plans_of(pre, folder)
    assert plans["transpose_forward"] == [2, 0, 1]
    fullres = resolve_configuration(plans, SEGMENTATION_CONFIGURATION)
    np.testing.assert_allclose(fullres["spacing"], [1.5, 0.3125, 0.3125], rtol=1e-4)  # nothing resampled
    assert fullres["median_image_size_in_voxels"] == [80, 512, 512]
    patch = fullres["patch_size"]
    a = arch(plans)
    assert a["kernel_sizes"][0] == [1, 3, 3] and a["strides"][1] == [1, 2, 2]  # in-plane first
    assert patch[0] <= 80 and min(patch[1:]) >= 128
    # physical patch extent is roughly isotropic (nnU-Net's aspect rule): within a factor of 3
    extent = np.array(patch) * np.array(fullres["spacing"])
    assert extent.max() / extent.min() < 3
    assert fullres["batch_size"] >= 2 and a["n_stages"] >= 6
    diffusion = resolve_configuration(plans, DIFFUSION_CONFIGURATION)
    assert diffusion["patch_size"][0] < patch[0] and diffusion["patch_size"][1:] == patch[1:]
    assert diffusion["batch_size"] >= fullres["batch_size"]
    classification = resolve_configuration(plans, CLASSIFICATION_CONFIGURATION)
    assert np.prod(classification["patch_size"]) >= np.prod(patch)
    block = read_orthodiff_block(plans)
    assert all(0 < v <= 8.5 for v in block.estimated_vram_gb.values()), block.estimated_vram_gb
    print(result.summary())


# --------------------------------------------------------------------------------------------- phantom -> convert
#: (patch, batch) per configuration for the 3 T phantom site: 17-18 slices x 82 x 82-89 pixels
#: (after transpose) -> 20 x 96 x 96 (divisibility 4 x 16 x 16); diffusion 10 -> 8 slices.
PHANTOM_PLANS = {o: {SEGMENTATION_CONFIGURATION: ((20, 96, 96), 2), DIFFUSION_CONFIGURATION: ((8, 96, 96), 5),
                     CLASSIFICATION_CONFIGURATION: ((20, 96, 96), 3)} for o in ("sag", "cor", "ax")}


@pytest.mark.slow
def test_phantom_convert_plan_and_preprocess_three_orientations(tmp_path: Path):
    """phantom (3 T site, 0.8 mm in-plane, 3 mm slices) -> orthodiff convert -> plan_and_preprocess;
    an external 1.5 T site (0.9 mm, 3.5 mm slices) gets the 3 T plans by orientation."""
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T
    from orthodiff_nnunet.planning import plan_and_preprocess

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    manifest = write_site(tmp_path / "siteA", SITE_3T, n_cases=3, seed=7, patients_with_two_exams=1)
    convert(manifest, 701, "Phantom", raw=raw, num_processes=1)
    manifest = write_site(tmp_path / "siteB", SITE_15T, n_cases=2, seed=8)
    convert(manifest, 711, "PhantomExt", raw=raw, external=True, num_processes=1)
    result = plan_and_preprocess([701], orientations=["sag", "cor", "ax"], num_processes=1, raw=raw,
                                 preprocessed=pre, show_progress=False)
    transferred = plan_and_preprocess([711, 712, 713], plans_from=701, num_processes=1, raw=raw,
                                      preprocessed=pre, show_progress=False)
    expected = PHANTOM_PLANS
    for orientation in ("sag", "cor", "ax"):
        d = result.dataset(orientation)
        plans = json.loads(d.plans_file.read_text())
        tp = THROUGH_PLANE_NUMPY_AXIS[orientation]
        assert plans["transpose_forward"][0] == tp
        fullres = resolve_configuration(plans, SEGMENTATION_CONFIGURATION)
        np.testing.assert_allclose(fullres["spacing"], [3.0, 0.8, 0.8], rtol=1e-6)
        got = {c.name: (c.patch_size, c.batch_size) for c in d.configurations}
        assert got == expected[orientation], (orientation, got)
        assert arch(plans)["kernel_sizes"][0] == [1, 3, 3]
        assert read_orthodiff_block(plans).abnormality_names == ("ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU")
        assert read_orthodiff_block(plans).label_names[:3] == ("background", "femur", "tibia")
        assert d.num_preprocessed == 3
        assert (pre / d.dataset_name / "splits_final.json").is_file()
        ext = transferred.dataset(orientation)
        # the external site is preprocessed with the 3 T plans (classification and evaluation read it)
        assert ext.transferred_from == d.dataset_name and (ext.num_cases, ext.num_preprocessed) == (2, 2)
        ext_plans = json.loads(ext.plans_file.read_text())
        assert resolve_configuration(ext_plans, SEGMENTATION_CONFIGURATION) == fullres
