"""With one process, nnU-Net's fingerprint runs in a thread of this process and gives the same fingerprint."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing.pool
import threading

import pytest


@pytest.fixture
def small_raw_dataset(tmp_path, monkeypatch):
    from orthodiff_nnunet import paths
    from orthodiff_nnunet.api import convert
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    for key, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", tmp_path / "res")):
        monkeypatch.setenv(key, str(value))
    paths.set_nnunet_paths(raw, pre, tmp_path / "res")
    site = dataclasses.replace(SITE_3T, in_plane_spacing_mm=2.0)
    manifest = write_site(tmp_path / "site", site, n_cases=3, seed=4, orientations=("sag",))
    convert(manifest, 731, "Fp", raw=raw, num_processes=1, num_folds=2)
    return "Dataset731_FpSag", pre


def _fingerprint(dataset: str, pre, num_processes: int) -> dict:
    from orthodiff_nnunet.planners import OrthodiffFingerprintExtractor

    OrthodiffFingerprintExtractor(dataset, num_processes=num_processes, verbose=False).run(overwrite_existing=True)
    return json.loads((pre / dataset / "dataset_fingerprint.json").read_text())


def test_one_process_is_a_thread_and_the_fingerprint_is_the_same(small_raw_dataset, monkeypatch):
    dataset, pre = small_raw_dataset
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor

    pools: list[type] = []
    workers: list[str] = []
    real_analyze = fingerprint_extractor.DatasetFingerprintExtractor.analyze_case

    def analyze_case(*args, **kwargs):
        workers.append(threading.current_thread().name)
        return real_analyze(*args, **kwargs)

    real_thread_pool_init = multiprocessing.pool.ThreadPool.__init__

    def thread_pool_init(self, *args, **kwargs):
        pools.append(type(self))
        real_thread_pool_init(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(fingerprint_extractor.DatasetFingerprintExtractor, "analyze_case", staticmethod(analyze_case))
        m.setattr(multiprocessing.pool.ThreadPool, "__init__", thread_pool_init)
        in_threads = _fingerprint(dataset, pre, 1)
    # nnU-Net's own analysis ran 3 times, in a worker thread of this process (not in a spawned process)
    assert len(workers) == 3 and all(name != threading.main_thread().name for name in workers)
    assert pools == [multiprocessing.pool.ThreadPool]
    # the module's multiprocessing is nnU-Net's again afterwards
    assert fingerprint_extractor.multiprocessing is multiprocessing
    in_processes = _fingerprint(dataset, pre, 2)
    assert in_threads == in_processes
    assert in_threads["foreground_intensity_properties_per_channel"]["0"]["mean"] > 0
