"""Per-orientation experiment planners: nnU-Net's planners with the through-plane axis known.

Installed as ``orthodiff_nnunet.planners.orthodiff_planner``. Absolute imports only: nnU-Net may
import modules of this package by bare name.

What differs from nnU-Net's planners (and why):

* **Through-plane axis from the orientation.** Converted datasets are stored in the canonical
  LPS layout, numpy ``(z=S, y=P, x=L)``, so the slice-stacking axis of a sagittal, coronal or
  axial dataset is numpy axis 2, 1 or 0 (``dataset.json["orthodiff"]["through_plane_numpy_axis"]``).
  nnU-Net guesses the low-resolution axis from spacing (``argmax``), which is arbitrary for
  near-isotropic 3D acquisitions and can differ between datasets of one exam; we always know it.
* **Transpose.** The through-plane axis is moved first (``transpose_forward = [tp, a, b]``),
  so every orientation's plans share one axis convention: patch axis 0 is through-plane, axes
  1 and 2 are in-plane, and nnU-Net's ``2d`` configuration slices in the acquisition plane.
* **Target spacing.** In-plane: the median of each in-plane axis (in-plane resolution is kept,
  as nnU-Net does). Through-plane: for thick-slice (2D) data, i.e. a median through-plane spacing
  more than :data:`~orthodiff_nnunet.orientation.THICK_SLICE_RATIO` times the in-plane one, the
  10th percentile of the through-plane spacings, but never finer than the in-plane spacing:
  thick slices are never resampled towards in-plane resolution (which would invent 5-10x more
  slices), and the thinner-slice protocols of a mixed dataset are not thrown away. nnU-Net
  applies that 10th-percentile rule only when both spacing and voxel counts look anisotropic;
  near-isotropic 3D data keeps the median, as in nnU-Net.
* **Kernels and pooling** follow from the spacing through nnU-Net's own topology code: in-plane
  only (1,3,3) kernels and (1,2,2) pooling until the through-plane spacing is within 2x.
* **Extra configurations of the same topology** (identical ``strides``/``kernel_sizes``/
  ``features_per_stage``, so encoder weights move between them; same data as ``3d_fullres``,
  preprocessed once): ``3d_diffusion`` (through-plane patch extent halved, batch refilled to the
  memory target: denoising is local and its loss variance is dominated by the sampled noise
  level, so more samples per step buy more than context) and ``3d_classification`` (a patch
  covering the median field of view at the planned spacing, shrunk only as far as the encoder's
  memory requires: the classifier must see the whole joint).
* **No 3d_lowres/cascade** by default (knee volumes fit 3d_fullres; a lowres stage would have a
  different topology). Set ``plan_lowres = True`` on a subclass to get nnU-Net's behaviour.
* **Atomic plans writes** and a typed ``plans["orthodiff"]`` block
  (:class:`orthodiff_nnunet.plans.OrthodiffPlansBlock`).
* **Preprocessor name** stays nnU-Net's ``DefaultPreprocessor`` (what ``plan_experiment_dataset``
  passes). ``orthodiff plan_and_preprocess`` preprocesses with the resumable
  :class:`orthodiff_nnunet.preprocessing.OrthodiffPreprocessor` (the same arrays) whatever the plans
  name. A plans file may name it (:data:`orthodiff_nnunet.preprocessing.PREPROCESSOR_NAME`) to make
  nnU-Net's own ``preprocess`` resume inside ``nnunet_finds_orthodiff_preprocessor``; written by
  default it would stop a fresh ``nnUNetv2_preprocess`` or ``nnUNetv2_predict`` (nnU-Net looks the
  name up inside ``nnunetv2`` only) and change every dataset's preprocessing hash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from orthodiff_nnunet.conventions import PLAIN_PLANS, RESENC_M_PLANS
from orthodiff_nnunet.orientation import THICK_SLICE_RATIO, THROUGH_PLANE_NUMPY_AXIS
from orthodiff_nnunet.plans import (
    CLASSIFICATION_CONFIGURATION,
    CONFIGURATION_ROLES,
    DIFFUSION_CONFIGURATION,
    SEGMENTATION_CONFIGURATION,
    OrthodiffPlansBlock,
    PlansError,
    save_plans,
    with_orthodiff_block,
)
from orthodiff_nnunet.schemes import ORIENTATIONS
from orthodiff_nnunet.utils import atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "FINGERPRINT_INTENSITY_KEY",
    "PLANNER_VERSION",
    "OrthodiffFingerprintExtractor",
    "OrthodiffPlainPlanner",
    "OrthodiffPlannerMixin",
    "OrthodiffResEncMPlanner",
    "n_proc_da_at_least_one",
]

#: Version of the heuristics below; stored in every plans file's orthodiff block.
PLANNER_VERSION = "1.0"
#: Key added to dataset_fingerprint.json saying where the intensity statistics came from.
FINGERPRINT_INTENSITY_KEY = "orthodiff_intensity_statistics"


@contextlib.contextmanager
def n_proc_da_at_least_one() -> Iterator[None]:
    """Temporarily set ``nnUNet_n_proc_DA=1`` if nnU-Net would use 0 processes.

    ``nnUNet_n_proc_DA=0`` (in-process augmentation) is valid for training but crashes nnU-Net's
    planning, whose memory estimate calls ``torch.set_num_threads(get_allowed_n_proc_DA())``.
    """
    if get_allowed_n_proc_DA() >= 1:
        yield
        return
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = old


@contextlib.contextmanager
def _one_process_runs_in_a_thread(num_processes: int):
    """While the block runs, nnU-Net's fingerprint extractor gets a thread pool when it asks for one process.

    nnU-Net's ``DatasetFingerprintExtractor.run`` takes its pool from
    ``multiprocessing.get_context("spawn").Pool(n)``; only that module's name ``multiprocessing`` is
    replaced, by one whose ``get_context`` returns :class:`multiprocessing.pool.ThreadPool` (the same
    ``starmap_async`` and ``_pool`` of workers with ``is_alive``). Other pools, and more than one
    process, are untouched.
    """
    if int(num_processes) != 1:
        yield
        return
    from multiprocessing.pool import ThreadPool
    from types import SimpleNamespace
    from unittest import mock

    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as extractor_module

    threads = SimpleNamespace(Pool=ThreadPool)
    with mock.patch.object(extractor_module, "multiprocessing", SimpleNamespace(get_context=lambda method: threads)):
        yield


class OrthodiffFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's fingerprint, which also works when every label map is background.

    nnU-Net collects intensity statistics under the labels (foreground) and fails with an
    IndexError (percentile of an empty array) on a dataset without any foreground, e.g. an
    unlabeled pretraining corpus. Then the statistics are taken over the nonzero voxels of the
    images instead: the extraction is rerun with each case's image standing in for its label map
    (``image > 0`` is the mask nnU-Net samples from). For MRI the z-score normalisation uses
    per-image statistics, so these numbers only matter for reporting; the fingerprint records
    their source under :data:`FINGERPRINT_INTENSITY_KEY`.
    """

    def _dataset_has_no_labels(self) -> bool:
        block = self.dataset_json.get("orthodiff", {})
        return block.get("num_labeled") == 0

    def run(self, overwrite_existing: bool = False) -> dict:
        """nnU-Net's fingerprint (see the class); with one process, its per-case analysis runs in this process.

        nnU-Net always spawns a pool, also of one worker, and a spawned worker first imports torch and
        nnU-Net: about 20 s per dataset on 2 cores, for cases whose analysis takes about 20 ms each
        (the demo's three datasets: about 60 of its 80 s of planning). With ``num_processes == 1`` the
        same nnU-Net code runs in a thread instead (:func:`_one_process_runs_in_a_thread`).
        """
        with _one_process_runs_in_a_thread(self.num_processes):
            return self._run(overwrite_existing)

    def _run(self, overwrite_existing: bool) -> dict:
        fingerprint_file = join(nnUNet_preprocessed, self.dataset_name, "dataset_fingerprint.json")
        if isfile(fingerprint_file) and not overwrite_existing:
            return load_json(fingerprint_file)
        if not self._dataset_has_no_labels():
            try:
                return self._mark(super().run(overwrite_existing), "foreground")
            except IndexError:
                log.warning(
                    "%s: no case has a foreground label; taking intensity statistics from the nonzero "
                    "image voxels instead", self.dataset_name,
                )
        else:
            log.info("%s has no labeled case: intensity statistics from the nonzero image voxels", self.dataset_name)
        labels = {k: v["label"] for k, v in self.dataset.items()}
        for k, v in self.dataset.items():
            v["label"] = v["images"][0]
        try:
            fingerprint = super().run(True)
        except IndexError as exc:
            raise PlansError(
                f"{self.dataset_name}: neither labels nor image intensities > 0 to take intensity statistics "
                "from; plan it with --plans-from <a labeled dataset of the same orientation>"
            ) from exc
        finally:
            for k, v in self.dataset.items():
                v["label"] = labels[k]
        return self._mark(fingerprint, "nonzero image")

    def _mark(self, fingerprint: dict, source: str) -> dict:
        fingerprint = dict(fingerprint)
        fingerprint[FINGERPRINT_INTENSITY_KEY] = source
        recursive_fix_for_json_export(fingerprint)
        atomic_write_json(Path(join(nnUNet_preprocessed, self.dataset_name, "dataset_fingerprint.json")), fingerprint)
        return fingerprint


class OrthodiffPlannerMixin:
    """Hooks shared by the orthodiff planners; mix in before an nnU-Net ExperimentPlanner.

    Overrides ``determine_transpose``, ``determine_fullres_target_spacing``,
    ``generate_data_identifier``, ``static_estimate_VRAM_usage`` (guard only) and ``save_plans``
    (adds the diffusion and classification configurations and the orthodiff block, then writes
    atomically). Everything else, including patch/batch fitting and topology, is nnU-Net's.
    """

    #: Fraction of the 3d_fullres through-plane patch extent used by the diffusion configuration.
    diffusion_through_plane_fraction: float = 0.5
    #: Plan nnU-Net's 3d_lowres/3d_cascade_fullres too (off: a different topology, and knee
    #: volumes fit 3d_fullres).
    plan_lowres: bool = False

    # the attributes below are set by nnU-Net's ExperimentPlanner.__init__
    dataset_json: dict
    dataset_fingerprint: dict
    dataset_name: str
    plans_identifier: str
    overwrite_target_spacing: Any
    suppress_transpose: bool

    def _init_orthodiff(self) -> None:
        block = self.dataset_json.get("orthodiff")
        if not isinstance(block, dict) or "orientation" not in block:
            raise PlansError(
                f"{self.dataset_name}/dataset.json has no orthodiff block with an orientation: convert the data "
                "with `orthodiff convert` (or add \"orthodiff\": {\"orientation\": \"sag|cor|ax\", "
                "\"through_plane_numpy_axis\": 2|1|0} for a canonical LPS dataset)"
            )
        orientation = block["orientation"]
        if orientation not in ORIENTATIONS:
            raise PlansError(f"{self.dataset_name}: orientation {orientation!r} is not one of {ORIENTATIONS}")
        tp = int(block.get("through_plane_numpy_axis", THROUGH_PLANE_NUMPY_AXIS[orientation]))
        if tp != THROUGH_PLANE_NUMPY_AXIS[orientation]:
            raise PlansError(
                f"{self.dataset_name}: through_plane_numpy_axis {tp} contradicts orientation {orientation!r} "
                f"(canonical LPS layout: {THROUGH_PLANE_NUMPY_AXIS[orientation]})"
            )
        self.orientation: str = orientation
        self.through_plane_axis: int = tp
        if not self.plan_lowres:
            # nnU-Net adds 3d_lowres while fullres patch / median image < this fraction; 0 never does
            self.lowres_creation_threshold = 0.0
        self._estimates: dict[str, float] = {}

    # ------------------------------------------------------------------ spacing and transpose
    def determine_transpose(self) -> tuple[list[int], list[int]]:
        """Through-plane axis first, then the in-plane axes in array order."""
        if self.suppress_transpose:
            return [0, 1, 2], [0, 1, 2]
        tp = self.through_plane_axis
        forward = [tp] + [i for i in range(3) if i != tp]
        backward = [forward.index(i) for i in range(3)]
        return forward, backward

    def determine_fullres_target_spacing(self) -> np.ndarray:
        """Target spacing in mm, numpy axis order (see the module docstring for the rules)."""
        if self.overwrite_target_spacing is not None:
            return np.array(self.overwrite_target_spacing, dtype=float)
        spacings = np.vstack(self.dataset_fingerprint["spacings"]).astype(float)
        tp = self.through_plane_axis
        in_plane = [i for i in range(3) if i != tp]
        target = np.median(spacings, 0)
        max_in_plane = float(max(target[in_plane]))
        tp_spacings = spacings[:, tp]
        if float(np.median(tp_spacings)) >= THICK_SLICE_RATIO * max_in_plane:
            target[tp] = max(float(np.percentile(tp_spacings, 10)), max_in_plane)
        else:
            target[tp] = float(np.median(tp_spacings))
        thickest = int(np.argmax(target))
        if thickest != tp and target[thickest] >= THICK_SLICE_RATIO * target[tp]:
            log.warning(
                "%s is marked %s (through-plane numpy axis %d) but numpy axis %d has the thickest spacing "
                "(%s mm): check the orientation in dataset.json",
                self.dataset_name, self.orientation, tp, thickest, np.round(target, 3).tolist(),
            )
        return target

    def generate_data_identifier(self, configuration_name: str) -> str:
        """``<plans name>_<configuration>``: never share nnU-Net's own data folders.

        (nnU-Net's ResEnc planners reuse ``nnUNetPlans_3d_fullres``; our transpose and spacing
        may differ from nnU-Net's, so our data must not land in, or be read from, that folder.)
        """
        return f"{self.plans_identifier}_{configuration_name}"

    @staticmethod
    def static_estimate_VRAM_usage(*args: Any, **kwargs: Any) -> int:
        """nnU-Net's estimate, built on the ``meta`` device and safe with ``nnUNet_n_proc_DA=0``.

        The estimate only counts feature-map sizes, yet nnU-Net builds a real network each time,
        and torch's default weight initialisation of the convolutions takes ~1 s per ResEnc
        network on a CPU core (most of nnU-Net's planning time). On the meta device no weights
        are allocated or initialised; the number returned is identical.
        """
        with n_proc_da_at_least_one(), torch.device("meta"):
            return ExperimentPlanner.static_estimate_VRAM_usage(*args, **kwargs)

    # ------------------------------------------------------------------ memory model
    @property
    def _num_input_channels(self) -> int:
        key = "channel_names" if "channel_names" in self.dataset_json else "modality"
        return len(self.dataset_json[key])

    def _reference(self) -> float:
        """nnU-Net's feature-map budget for the memory target (3D)."""
        return self.UNet_reference_val_3d * (self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB)

    def _to_gb(self, feature_map_size: float, batch_size: int) -> float:
        """Feature-map size x batch -> GB, on nnU-Net's calibration (reference value = corresp_GB at ref batch)."""
        return float(
            feature_map_size * batch_size / self.UNet_reference_val_corresp_bs_3d
            / self.UNet_reference_val_3d * self.UNet_reference_val_corresp_GB
        )

    def _network(self, configuration: dict):
        arch = configuration["architecture"]
        with n_proc_da_at_least_one(), torch.device("meta"):  # shapes only: no weights (see above)
            return get_network_from_plans(
                arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                self._num_input_channels, len(self.dataset_json["labels"]), allow_init=False,
            )

    # ------------------------------------------------------------------ extra configurations
    def plan_diffusion_configuration(self, fullres: dict, network) -> dict:
        """Same topology and data as ``3d_fullres``; shorter through-plane patch, batch refilled.

        Through-plane extent: ``diffusion_through_plane_fraction`` of 3d_fullres, rounded down
        to the topology's divisibility on that axis (at least one multiple). In-plane extent
        unchanged (the encoder later sees 3d_fullres patches in-plane). Batch: as many as fit
        the memory target (at least the 3d_fullres batch, at most one pass over the dataset).
        """
        div = self._divisibility(fullres)
        patch = [int(x) for x in fullres["patch_size"]]
        ax = self.determine_transpose()[0].index(self.through_plane_axis)  # through-plane patch axis
        reduced = int(patch[ax] * self.diffusion_through_plane_fraction) // div[ax] * div[ax]
        patch[ax] = max(int(div[ax]), reduced)
        estimate = float(network.compute_conv_feature_map_size(patch))
        batch = int(self._reference() / estimate * self.UNet_reference_val_corresp_bs_3d)  # floor: stay under target
        n_voxels = float(np.prod(fullres["median_image_size_in_voxels"], dtype=np.float64)) * max(
            1, int(self.dataset_json.get("numTraining", 1))
        )
        cap = max(1, round(n_voxels / float(np.prod(patch, dtype=np.float64))))
        batch = max(int(fullres["batch_size"]), min(batch, cap), self.UNet_min_batch_size)
        self._estimates[DIFFUSION_CONFIGURATION] = self._to_gb(estimate, batch)
        return {
            "inherits_from": SEGMENTATION_CONFIGURATION,
            "patch_size": patch,
            "batch_size": int(batch),
            "batch_dice": False,
        }

    def plan_classification_configuration(self, fullres: dict, network) -> dict:
        """Same topology and data as ``3d_fullres``; a patch covering the field of view.

        Start from the median image size at the planned spacing rounded up to the topology's
        divisibility (never smaller than the 3d_fullres patch); while the encoder's feature maps
        exceed the memory budget at nnU-Net's minimum batch, shrink the axis that covers the
        largest fraction of the image by one divisibility step (nnU-Net's rule), never below the
        3d_fullres patch. Batch: what the budget allows, at least 2, at most the number of cases.
        """
        div = self._divisibility(fullres)
        median = [float(x) for x in fullres["median_image_size_in_voxels"]]
        floor = [int(x) for x in fullres["patch_size"]]
        patch = [max(f, int(np.ceil(m / d)) * int(d)) for f, m, d in zip(floor, median, div)]
        ref_bs = self.UNet_reference_val_corresp_bs_3d
        budget = self._reference() * ref_bs / self.UNet_min_batch_size  # feature maps per sample
        estimate = float(network.encoder.compute_conv_feature_map_size(patch))
        while estimate > budget:
            candidates = [a for a in range(3) if patch[a] - div[a] >= floor[a]]
            if not candidates:
                break
            a = max(candidates, key=lambda i: patch[i] / median[i])
            patch[a] -= int(div[a])
            estimate = float(network.encoder.compute_conv_feature_map_size(patch))
        batch = int(self._reference() / estimate * ref_bs)  # floor: stay under the target
        n_cases = max(1, int(self.dataset_json.get("numTraining", 1)))
        batch = max(self.UNet_min_batch_size, min(batch, n_cases))
        self._estimates[CLASSIFICATION_CONFIGURATION] = self._to_gb(estimate, batch)
        return {
            "inherits_from": SEGMENTATION_CONFIGURATION,
            "patch_size": patch,
            "batch_size": int(batch),
            "batch_dice": False,
        }

    @staticmethod
    def _divisibility(configuration: dict) -> list[int]:
        strides = np.array(configuration["architecture"]["arch_kwargs"]["strides"], dtype=int)
        return [int(x) for x in np.prod(strides, axis=0)]

    # ------------------------------------------------------------------ orthodiff block and writing
    def _label_names(self) -> list[str]:
        labels = self.dataset_json["labels"]

        def key(item):
            v = item[1]
            return (0, v) if isinstance(v, int) else (1, 0)

        return [name for name, _ in sorted(labels.items(), key=key)]

    def _abnormality_names(self) -> list[str]:
        block = self.dataset_json.get("orthodiff", {})
        names = block.get("abnormality_labels")
        if names is None:
            targets = join(self.raw_dataset_folder, block.get("targets_file", "orthodiff_targets.json"))
            names = load_json(targets).get("label_names", []) if isfile(targets) else []
        return list(names)

    def build_orthodiff_block(self, plans: dict) -> OrthodiffPlansBlock:
        forward = plans["transpose_forward"]
        return OrthodiffPlansBlock(
            orientation=self.orientation,
            through_plane_numpy_axis=self.through_plane_axis,
            through_plane_patch_axis=list(forward).index(self.through_plane_axis),
            label_names=self._label_names(),
            abnormality_names=self._abnormality_names(),
            source_datasets=[self.dataset_name],
            planner=type(self).__name__,
            planner_version=PLANNER_VERSION,
            configurations=dict(CONFIGURATION_ROLES),
            gpu_memory_target_gb=float(self.UNet_vram_target_GB),
            estimated_vram_gb=dict(self._estimates),
            intensity_statistics=self.dataset_fingerprint.get(FINGERPRINT_INTENSITY_KEY, "foreground"),
        )

    def complete_plans(self, plans: dict) -> dict:
        """Add the diffusion and classification configurations and the orthodiff block."""
        fullres = plans["configurations"].get(SEGMENTATION_CONFIGURATION)
        if fullres is None:
            raise PlansError(
                f"{self.dataset_name}: nnU-Net planned no 3d_fullres configuration (a 2D dataset?); "
                "orthodiff needs 3D volumes"
            )
        network = self._network(fullres)
        self._estimates[SEGMENTATION_CONFIGURATION] = self._to_gb(
            float(network.compute_conv_feature_map_size(fullres["patch_size"])), int(fullres["batch_size"])
        )
        plans["configurations"][DIFFUSION_CONFIGURATION] = self.plan_diffusion_configuration(fullres, network)
        plans["configurations"][CLASSIFICATION_CONFIGURATION] = self.plan_classification_configuration(
            fullres, network
        )
        recursive_fix_for_json_export(plans)
        return with_orthodiff_block(plans, self.build_orthodiff_block(plans))

    def save_plans(self, plans: dict) -> None:
        """Complete the plans, keep custom configurations of an older file, write atomically.

        ``plans`` is updated in place, so ``plan_experiment`` returns the complete plans.
        """
        plans.update(self.complete_plans(plans))
        path = join(nnUNet_preprocessed, self.dataset_name, self.plans_identifier + ".json")
        if isfile(path):
            old_configurations = load_json(path).get("configurations", {})
            for name, configuration in old_configurations.items():
                plans["configurations"].setdefault(name, configuration)
        save_plans(path, plans)
        log.info("plans written to %s", path)


class OrthodiffResEncMPlanner(OrthodiffPlannerMixin, nnUNetPlannerResEncM):
    """ResEnc-M (nnU-Net's recommended preset, 8 GB) with the orthodiff hooks. The default planner."""

    def __init__(
        self,
        dataset_name_or_id: str | int,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = RESENC_M_PLANS,
        overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
        suppress_transpose: bool = False,
    ) -> None:
        with warnings.catch_warnings():
            # ResEncM warns on any target but 8 GB; --gpu-memory-gb is a supported option here
            warnings.filterwarnings("ignore", message=".*non-standard gpu_memory_target_in_gb.*")
            super().__init__(
                dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                overwrite_target_spacing, suppress_transpose,
            )
        self._init_orthodiff()


class OrthodiffPlainPlanner(OrthodiffPlannerMixin, ExperimentPlanner):
    """nnU-Net's default (plain U-Net) planner with the orthodiff hooks."""

    def __init__(
        self,
        dataset_name_or_id: str | int,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = PLAIN_PLANS,
        overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
        suppress_transpose: bool = False,
    ) -> None:
        super().__init__(
            dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
            overwrite_target_spacing, suppress_transpose,
        )
        self._init_orthodiff()
