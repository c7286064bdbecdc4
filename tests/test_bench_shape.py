"""The benchmark scripts of ``bench/`` keep one shape and start as ``python -m bench.<script>``.

Benchmarks are never run by the tests (they take minutes to hours); these tests only make a broken script fail
the suite: every module imports, has ``parse_args`` / ``run`` / ``record`` / ``main``, parses its defaults,
answers ``-h``; ``collect`` and ``bench_scan`` run end to end on tiny inputs with known answers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: script -> (argv, attribute, expected value): a default that parse_args must produce
SCRIPTS = {
    "bench_classification": ([], "part", "both"),
    "bench_noise_schedule": ([], "steps", 1000),
    "bench_predict_cpu": ([], "part", "paired"),
    "bench_preprocess": ([], "cases", 8),
    "bench_pretraining": ([], "configuration", "3d_diffusion"),
    "bench_scan": ([], "exams", 48),
    "bench_seg_trainer": ([], "repeats", 20),
    "collect": ([], "out", REPO / "BENCHMARKS.md"),
    "compare_planners": ([], "skip_real", False),
    "demo_robustness": ([], "run_seeds", [0, 1, 2]),
    "feature_probe": (["--work", "/tmp/le_shape_test"], "timesteps", [100, 300]),
    "label_efficiency": (["--work", "/tmp/le_shape_test"], "lanes", 2),
    "pretrain_real_knees": ([], "objective", "diffusion"),
}


@pytest.fixture
def bench(monkeypatch):
    """``bench`` importable as the scripts see it when started from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))
    return lambda name: importlib.import_module(f"bench.{name}")


def test_every_script_is_listed():
    """A new script in bench/ gets the shape and a line in SCRIPTS (another helper's new script: add it here)."""
    found = {p.stem for p in (REPO / "bench").glob("*.py")} - {"__init__", "common"}
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_shape_and_defaults(bench, name):
    module = bench(name)
    for attribute in ("parse_args", "run", "record", "main"):
        assert callable(getattr(module, attribute, None)), f"bench/{name}.py has no {attribute}()"
    argv, attribute, expected = SCRIPTS[name]
    args = module.parse_args(argv)
    assert isinstance(args, argparse.Namespace)
    assert getattr(args, attribute) == expected


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_zero(bench, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench(name).main(["-h"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_label_efficiency_refuses_a_work_folder_in_the_repository(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench("label_efficiency").parse_args(["--work", str(REPO / "le_work")])
    assert exit_.value.code == 2
    assert "--work must lie outside the repository" in capsys.readouterr().err


def test_runs_as_a_module_from_the_repository_root():
    """``python -m bench.X`` is how run_all.sh and the docs start the scripts (no sys.path edit in them)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "bench.bench_scan", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--exams" in proc.stdout


def test_command_line_names_the_module(bench, monkeypatch):
    common = bench("common")
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="bench.bench_scan")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "bench_scan.py"), "--exams", "2"])
    for key in ("OMP_NUM_THREADS", "nnUNet_n_proc_DA", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    assert common.command_line() == "python -m bench.bench_scan --exams 2"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert common.command_line() == "OMP_NUM_THREADS=1 python -m bench.bench_scan --exams 2"


def test_collect_orders_demotes_and_relinks(bench, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "scan.md").write_text("# Scan\n\n## run 1\n\n![plot](scan.png)\n")
    (results / "planning.md").write_text("# Planning\n\nrow\n")
    out = tmp_path / "BENCHMARKS.md"
    collect = bench("collect")
    assert collect.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(collect.HEADER)
    # planning is in ORDER, so before scan; headings demoted one level; the figure link made relative to out
    body = text[len(collect.HEADER):]
    assert body == ("\n\n## Planning (`bench/results/planning.md`)\n\n## Planning\n\nrow"
                    "\n\n## Scan (`bench/results/scan.md`)\n\n## Scan\n\n### run 1\n\n![plot](results/scan.png)\n")
    assert "from 2 result file(s)" in capsys.readouterr().out


def test_bench_scan_tiny_export(bench, tmp_path, capsys):
    """The cheapest real run: a 1-exam export scanned serially and by threads; both agree; the table has the
    recorded columns and one row per executor."""
    scan = bench("bench_scan")
    args = scan.parse_args(["--exams", "1", "--slices", "2", "--modes", "serial,thread", "--work", str(tmp_path),
                            "--no-record"])
    result = scan.run(args)
    assert result.same
    assert [r[0] for r in result.rows] == ["serial", "thread"]
    assert result.files == 9 + 3 * 2 + 2 * 2  # localizer, sag/cor/ax of 2 slices, two echoes of 2 slices
    assert result.rows[0][2] == result.rows[1][2] > result.files  # both read every file, the junk files too
    text = scan.section(result, args)
    assert "| executor | workers | files | wall time | files/s | CPU time | speed-up vs serial |" in text
    assert "| serial | 1 | " in text and " | 1.00x |" in text
    assert text.count("\n| ") == 3  # header row, two executors


def test_pretraining_section_from_measured_runs(bench):
    """``record``'s text from known timings: table rows, the paired ratio against the goal, the CPU-time ratio."""
    import torch

    bp = bench("bench_pretraining")
    van = bp.Run("vanilla", "fp32", False, False, seconds=[0.1, 0.1, 0.1], cpu_seconds=[0.2, 0.2, 0.2])
    head = bp.Run("ours", "fp32", False, False, seconds=[0.1, 0.2, 0.3], cpu_seconds=[0.2, 0.2, 0.4], vanilla=van)
    m = bp.Measured(device=torch.device("cpu"), size="reduced", dataset="D", plans_id="P", data_what="phantoms",
                    configuration="3d_diffusion", n_it=1, repeats=3, warmup=1, batch_size=2, patch=(10, 10, 10),
                    voxels=2_000_000, flops_ours=int(2e9), flops_vanilla=int(1e9), arch_what="net", head=head,
                    vanilla=van, load_start="1.0")
    text = "\n".join(bp.section_head(m, bp.parse_args([])) + bp.section_notes(m))
    # ours: median 0.2 s -> 200 ms, 10 M voxels/s, paired ratios 1, 2, 3; 2 GFLOP / 0.2 s = 0.010 TFLOP/s
    assert ("| ours | fp32 | off | off | 200.0 (100.0-300.0) | 10.00 M | **2.000** (1.00-3.00) | n/a (see RSS) | "
            "2.0 | 0.010 |") in text
    assert "| vanilla | fp32 | off | off | 100.0 (100.0-100.0) | 20.00 M | 1 (reference) | n/a (see RSS) | 1.0 | 0.010 |" in text
    assert "**2.000** (goal <= 1.15: NOT met); per repetition 1.00, 2.00, 3.00; ratio of medians 2.000." in text
    assert "median paired ratio 1.000 (1.00-2.00); CPU ms/iteration ours 200, vanilla 200." in text
    assert "patch 10 x 10 x 10, batch 2 = 2,000,000 voxels per iteration" in text


def test_predict_paired_section_from_known_times(bench):
    bp = bench("bench_predict_cpu")
    res = {"name": "Dataset571_PredictBenchSag", "n": 3, "size": (40, 40, 12),
           "cfg": {"patch_size": [12, 32, 32], "architecture": {"arch_kwargs": {"n_stages": 4,
                                                                               "features_per_stage": [8, 16]}}},
           "commands": (["/venv/bin/orthodiff", "predict", "seg"], ["/venv/bin/nnUNetv2_predict", "-i", "IMG"]),
           "settings": [{"tta": "on", "wall": {"ours": [4.0, 6.0], "nnunet": [4.0, 4.0]},
                         "cpu": {"ours": [2.0, 2.0], "nnunet": [1.0, 2.0]}, "identical": [True, False]}]}
    text = bp.paired_section(res, bp.parse_args(["--repeats", "2"]))
    assert "| on | 2.0 | 1.5 | **1.500** (1.00-2.00) | 5.0 | 4.0 | 1.250 (1.00-1.50) | 1/2 |" in text
    assert "mirroring on: CPU-time ratio per pair 2.000, 1.000." in text
    assert "Commands timed: `orthodiff predict seg -o OUT` and `nnUNetv2_predict -i IMG -o OUT`" in text


def test_feature_probe_cka_and_dice_known_answers(bench):
    """Linear CKA is 1 for the same features up to rotation and scale, 0 for features orthogonal to them; the
    probe's Dice is undefined (nan) for a structure absent from both masks, not 0 or an error."""
    import numpy as np

    fp = bench("feature_probe")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert fp.linear_cka(a, 3.0 * a @ q) == pytest.approx(1.0, abs=1e-12)
    b = np.zeros((500, 2))
    b[:, 0] = 1.0  # constant: no variance, nothing shared with a after centring
    basis = np.c_[a - a.mean(0), np.ones(500)]
    r = rng.normal(size=500)
    b[:, 1] = r - basis @ np.linalg.lstsq(basis, r, rcond=None)[0]  # mean 0, orthogonal to a's centred columns
    assert fp.linear_cka(a, b) == pytest.approx(0.0, abs=1e-6)
    ref = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 0, 2, 2, 0])
    assert fp.dice(pred, ref, 1) == pytest.approx(2 * 1 / (1 + 2))
    assert fp.dice(pred, ref, 2) == pytest.approx(2 * 2 / (2 + 3))
    assert np.isnan(fp.dice(pred, ref, 5))
    picks = fp.sample_voxels(ref, [0, 1, 2, 5], 2, np.random.default_rng(0))
    assert sorted(ref[picks].tolist()) == [0, 1, 1, 2, 2]


def test_label_efficiency_interval_over_knees_and_seeds(bench):
    """Seeds that disagree widen the interval (the knee bootstrap alone would give [0.5, 0.5] here: every knee's
    seed mean is 0.5); identical seeds and knees give a point; a knee's scans are drawn together."""
    import numpy as np

    le = bench("label_efficiency")
    knees = ["K1", "K1", "K2", "K3", "K4"]
    by_seed = np.tile([0.0, 1.0], (5, 1))  # 5 scans x 2 seeds: seed 0 scores 0, seed 1 scores 1
    lo, hi = le.knee_and_seed_ci(by_seed, knees, 2000, 0)
    assert (lo, hi) == (0.0, 1.0)  # both seed columns drawn alike in a quarter of the draws each way
    assert le.knee_and_seed_ci(np.full((5, 3), 0.25), knees, 200, 0) == pytest.approx((0.25, 0.25))
    by_knee = np.repeat(np.array([[1.0], [1.0], [0.0], [0.0], [0.0]]), 3, axis=1)  # K1 (2 scans) 1, others 0
    # k = draws of K1 among 4 knees, Binomial(4, 1/4): P(k <= 2) = 0.949, P(k <= 3) = 0.996, so the 97.5th
    # percentile is k = 3: 3 x 2 scans of 1 among 3 x 2 + 1 scans, 6/7 (a scan-level bootstrap would not give this)
    lo, hi = le.knee_and_seed_ci(by_knee, knees, 4000, 0)
    assert lo == 0.0 and hi == pytest.approx(6 / 7)


def test_label_efficiency_pairs_only_the_seeds_both_arms_have(bench):
    """A study run in parts (an arm with fewer finished seeds) pairs seed with seed, never seed 2 with seed 1."""
    le = bench("label_efficiency")
    diffusion = [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    scratch = [{"seed": 0}, {"seed": 2}]
    a, b = le.paired_seeds(diffusion, scratch)
    assert [r["seed"] for r in a] == [r["seed"] for r in b] == [0, 2]
    assert le.paired_seeds(diffusion, []) == ([], [])


def test_classification_lanes_run_jobs_in_one_thread_processes(bench):
    """The study's lanes: with 2, jobs run in spawned processes of one torch thread each (results in order, a
    failing job raises in the parent); with 1, in this process."""
    import torch

    cls = bench("bench_classification")
    with cls.Lanes(2) as lanes:
        futures = [lanes.submit(pow, 2, k) for k in range(4)] + [lanes.submit(torch.get_num_threads)]
        assert [f.result() for f in futures] == [1, 2, 4, 8, 1]
        with pytest.raises(ZeroDivisionError):
            lanes.submit(divmod, 1, 0).result()
    with cls.Lanes(1) as lanes:
        assert lanes.submit(pow, 3, 2).result() == 9
        assert lanes.submit(os.getpid).result() == os.getpid()
        with pytest.raises(ZeroDivisionError):
            lanes.submit(divmod, 1, 0).result()


def test_classification_study_keeps_each_run_with_its_settings(bench, tmp_path, monkeypatch):
    """A killed study resumes from ``<work>/study_runs``: a kept run comes back equal (NaN included) without
    training; a run kept with other settings is trained again and replaced."""
    import numpy as np

    cls = bench("bench_classification")
    args = cls.parse_args(["--work", str(tmp_path)])
    calls = []

    def fake_oof_runs(mode, seed, fraction, args_, device):
        calls.append((mode, seed, fraction, args_.epochs))
        return {"p": {"e1": np.array([0.25, np.nan])}, "pred": {"e1": np.array([0.0, 1.0])},
                "y": {"e1": np.array([1.0, 0.0])}, "labels": ["a", "b"], "history": [[{"epoch": 0}]],
                "best_epoch": [0], "n_train": [7], "seconds": 1.5 * len(calls)}

    monkeypatch.setattr(cls, "oof_runs", fake_oof_runs)
    first = cls.cached_oof_runs("probe", 1, 0.1, args, None)
    again = cls.cached_oof_runs("probe", 1, 0.1, args, None)
    assert calls == [("probe", 1, 0.1, args.epochs)] and again["reused"] and "reused" not in first
    np.testing.assert_array_equal(again["p"]["e1"], first["p"]["e1"])  # NaN kept as NaN
    assert again["seconds"] == 1.5 and again["n_train"] == [7]
    assert (tmp_path / "study_runs" / "probe_lf0.1_s1.json").is_file()
    args.epochs += 1
    third = cls.cached_oof_runs("probe", 1, 0.1, args, None)
    assert len(calls) == 2 and "reused" not in third and third["seconds"] == 3.0
    assert cls.cached_oof_runs("probe", 1, 0.1, args, None)["seconds"] == 3.0  # the replacement is kept
