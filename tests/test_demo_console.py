"""The console of `orthodiff demo` and of `orthodiff train seg` (issue 15): one line per stage, no nnU-Net dumps.

One quick demo (`orthodiff demo --quick`, the real pipeline with the fewest iterations) runs once per module
in a subprocess, exactly as a user would start it; the tests read its captured standard output (the
lines a person follows), its standard error (progress bars) and its log files. `train seg` then runs alone
on the demo's preprocessed data (a new scratch run, 3 iterations) to check its progress bar.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orthodiff_nnunet.api import DEMO_STAGES

#: what nnU-Net prints when a trainer starts (its plans and configuration dumps)
NNUNET_DUMPS = ("These are the global plan", "This is the configuration used by this training",
                "configuration:", "Please cite the following paper")
STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] (.+?)\s{2,}(\d+\.\d) s(.*)$")


def _run(args: list[str], cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0",
           "PYTHONUNBUFFERED": "1"}
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "orthodiff_nnunet.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("demo_console")
    out = work / "demo"
    proc = _run(["demo", "--quick", "--device", "cpu", "-o", str(out)], cwd=work)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc


def _stage_lines(stdout: str) -> list[re.Match]:
    return [m for m in (STAGE_LINE.match(line) for line in stdout.splitlines()) if m]


def test_one_line_per_stage_in_order_with_time_and_log(quick_demo):
    out, proc = quick_demo
    stages = _stage_lines(proc.stdout)
    assert [m.group(3) for m in stages] == list(DEMO_STAGES)
    assert [int(m.group(1)) for m in stages] == list(range(1, len(DEMO_STAGES) + 1))
    assert {int(m.group(2)) for m in stages} == {8}
    for m in stages:
        assert float(m.group(4)) > 0
        log_file = Path(re.search(r"log: (\S+)$", m.group(5)).group(1))
        assert log_file.parent == out / "logs" and log_file.stat().st_size > 0
    # each stage's equivalent command comes before its line, a command a user can paste
    lines = proc.stdout.splitlines()
    index = {m.group(3): lines.index(m.group(0)) for m in stages}
    assert "$ orthodiff convert sites/SiteA/manifest.csv -d 501 -n KneeSiteA" in "\n".join(lines[:index["convert"]])
    for title, command in (("pretrain cor", "$ orthodiff pretrain -d Dataset502_KneeSiteACor -p orthodiffDemoPlans"),
                           ("train seg", "$ orthodiff train seg -d Dataset501_KneeSiteASag -f all -p orthodiffDemoPlans "
                                         "--init scratch --optimizer adamw --lr 0.01"),
                           ("train cls", "$ orthodiff train cls -d 501 -p orthodiffDemoPlans"),
                           ("evaluate", "$ orthodiff evaluate -d 511 --seg sag=")):
        previous = max(i for i in index.values() if i < index[title])
        assert command in "\n".join(lines[previous + 1:index[title]]), title
    # the figures that matter, at the stage's end
    figures = {m.group(3): m.group(5) for m in stages}
    assert re.search(r"4 it, train loss \d\.\d{3}, EMA val loss \d\.\d{3}", figures["pretrain sag"])
    assert re.search(r"sag, 4 it each: diffusion init loss -?\d\.\d{3}, pseudo Dice \d\.\d{3}; "
                     r"scratch init loss -?\d\.\d{3}, pseudo Dice \d\.\d{3}", figures["train seg"])
    assert re.search(r"mean Dice \d\.\d{3} \(scratch \d\.\d{3}\), macro AUROC", figures["evaluate"])


def test_demo_cases_and_folds_repeat_with_the_seed_derived_pseudonym_key(quick_demo, tmp_path):
    """The phantom's pseudonym key comes from the seed (a random key per run made every demo run split
    differently): converting the same site again with that key gives the same case names and folds."""
    from orthodiff_nnunet.api import convert

    out, proc = quick_demo
    key = out / "sites" / "pseudonym.key"
    assert "--pseudonym-key sites/pseudonym.key" in proc.stdout
    assert key.is_file() and not key.resolve().is_relative_to((out / "nnUNet_raw").resolve())
    convert(out / "sites" / "SiteA" / "manifest.csv", 501, "KneeSiteA", raw=tmp_path / "raw", num_processes=1,
            num_folds=2, pseudonym_key=key)
    for name in ("splits_final.json", "orthodiff_targets.json"):
        again = json.loads((tmp_path / "raw" / "Dataset501_KneeSiteASag" / name).read_text())
        assert again == json.loads((out / "nnUNet_raw" / "Dataset501_KneeSiteASag" / name).read_text()), name
    other = tmp_path / "other.key"
    other.write_text("00" * 32)
    convert(out / "sites" / "SiteA" / "manifest.csv", 501, "KneeSiteA", raw=tmp_path / "raw2", num_processes=1,
            num_folds=2, pseudonym_key=other)
    names = sorted(p.name for p in (tmp_path / "raw2" / "Dataset501_KneeSiteASag" / "imagesTr").iterdir())
    assert names != sorted(p.name for p in (out / "nnUNet_raw" / "Dataset501_KneeSiteASag" / "imagesTr").iterdir())


def test_no_nnunet_dumps_on_the_console_but_in_the_logs(quick_demo):
    out, proc = quick_demo
    console = proc.stdout + proc.stderr
    for dump in NNUNET_DUMPS:
        assert dump not in console, dump
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ", console, re.M)  # nnU-Net's log-line stamp
    # on 2+ cores the two inits train side by side, each with its own log, named under the stage's line
    from orthodiff_nnunet.api import _seg_lanes

    if _seg_lanes("cpu") >= 2:
        logs = {init: out / "logs" / f"06_train_seg.{init}.log" for init in ("diffusion", "scratch")}
        assert (f"the 2 runs went side by side, one process of one thread each; nnU-Net's output in "
                f"{logs['diffusion']}, {logs['scratch']}" in proc.stdout)
    else:  # one after the other, both in the stage's log
        logs = {init: out / "logs" / "06_train_seg.log" for init in ("diffusion", "scratch")}
    for init, seg_log in logs.items():
        text = seg_log.read_text()
        assert "These are the global plan" in text and "train_loss" in text
        assert ("encoder warm start from" if init == "diffusion" else "init 'scratch'") in text
    assert sum(x.read_text().count("This is the configuration used by this training") for x in set(logs.values())) == 2
    assert "nnU-Net said" in (out / "logs" / "02_plan_and_preprocess.log").read_text()
    # progress bars stay on the console (standard error)
    for bar in ("pretraining", "train seg, diffusion init", "train seg, scratch init", "train cls"):
        assert re.search(rf"{bar}: +100%", proc.stderr), bar


def test_final_lines_name_the_report_the_figures_and_the_next_command(quick_demo):
    out, proc = quick_demo
    tail = proc.stdout.strip().splitlines()[-5:]
    report = re.search(r"Report: (\S+\.html)$", tail[0])
    assert report and Path(report.group(1)).is_file() and Path(report.group(1)).parent == out / "report"
    assert re.search(r"Dice femur (\d\.\d{3}|n/a), tibia (\d\.\d{3}|n/a), patella (\d\.\d{3}|n/a); "
                     r"mean Dice over 11 structures \d\.\d{3}; macro AUROC", tail[1])
    # the side by side: diffusion init against its from-scratch twin, with the paired difference's interval
    side = re.search(r"diffusion init (\d\.\d{3}) \[.*\] vs scratch init (\d\.\d{3}) \[.*\]; difference "
                     r"(-?\d\.\d{3}) \[(-?\d\.\d{3}|n/a), (-?\d\.\d{3}|n/a)\]", tail[2])
    assert side, tail[2]
    assert float(side.group(3)) == pytest.approx(float(side.group(1)) - float(side.group(2)), abs=0.0015)
    page = Path(report.group(1)).read_text()
    assert "Segmentation: diffusion init vs scratch init" in page and "Dice, scratch init" in page
    assert tail[-1].startswith("Next, on your own data: orthodiff convert ")


def test_train_seg_alone_shows_a_progress_bar_and_keeps_nnunet_in_its_log(quick_demo, tmp_path, monkeypatch):
    out, _ = quick_demo
    env_paths = {"nnUNet_raw": out / "nnUNet_raw", "nnUNet_preprocessed": out / "nnUNet_preprocessed",
                 "nnUNet_results": tmp_path / "results"}
    for k, v in env_paths.items():
        monkeypatch.setenv(k, str(v))
    proc = subprocess.run(
        [sys.executable, "-m", "orthodiff_nnunet.cli", "train", "seg", "-d", "501", "-p", "orthodiffDemoPlans",
         "-f", "0", "--init", "scratch", "--epochs", "1", "--iterations-per-epoch", "3", "--val-iterations", "1",
         "--no-validation", "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0", "nnUNet_compile": "0"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bar = re.findall(r"train seg, scratch init: 100%\|[^|]*\| 3/3 \[[\d:]+<[\d:]+, +(\d+\.\d+)it/s, epoch=0, loss=(-?\d\.\d{3})\]",
                     proc.stderr)
    assert bar and float(bar[-1][0]) > 0, proc.stderr[-2000:]
    for dump in NNUNET_DUMPS:
        assert dump not in proc.stdout + proc.stderr, dump
    logs = list((tmp_path / "results").rglob("nnunet_console.log"))
    assert len(logs) == 1 and "This is the configuration used by this training" in logs[0].read_text()
    assert f"nnU-Net's output: {logs[0]}" in proc.stdout


def test_output_to_log_catches_prints_children_and_records_and_restores_the_console(tmp_path, capfd, monkeypatch):
    import logging

    from orthodiff_nnunet.console import output_to_log

    import warnings

    log_file = tmp_path / "logs" / "stage.log"
    logger = logging.getLogger("orthodiff_nnunet.test_console")
    # as outside pytest (which records warnings instead): the console's warnings go to standard error
    monkeypatch.setattr(warnings, "showwarning", lambda m, c, f, n, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(m, c, f, n, line)))

    with warnings.catch_warnings(), output_to_log(log_file) as path:
        warnings.simplefilter("always")
        warnings.warn("torch.jit.interface is deprecated", FutureWarning)
        warnings.warn("the selection exams' AUROC was undefined", UserWarning)
        print("These are the global plan.json settings: {...}")
        subprocess.run([sys.executable, "-c", "print('configuration: from a worker process')"], check=True)
        logger.debug("nnU-Net said: a debug record")
        print("the progress bar stays", file=sys.stderr)
    print("back on the console")
    out, err = capfd.readouterr()
    assert path == log_file
    text = log_file.read_text()
    for line in ("These are the global plan.json settings", "configuration: from a worker process",
                 "nnU-Net said: a debug record"):
        assert line in text and line not in out + err
    assert "FutureWarning: torch.jit.interface is deprecated" in text and "deprecated" not in err
    assert "UserWarning: the selection exams' AUROC was undefined" in err and "AUROC" not in text
    err = err[err.index("the progress bar stays"):]
    assert out == "back on the console\n" and err == "the progress bar stays\n"
    assert logger.getEffectiveLevel() == logging.getLogger("orthodiff_nnunet").getEffectiveLevel()
    with output_to_log(None):  # verbose: nothing redirected
        print("shown")
    assert capfd.readouterr().out == "shown\n"


def test_demo_network_divides_the_planned_features():
    from orthodiff_nnunet.api import DEMO_NETWORK
    from orthodiff_nnunet.networks.build import shrink_architecture

    arch = {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320], "n_blocks_per_stage": [1, 3, 4, 6, 6],
            "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
            "n_conv_per_stage_decoder": [1, 1, 1, 1]}
    plans = {"configurations": {"3d_fullres": {"batch_size": 4, "patch_size": [20, 96, 96],
                                               "architecture": {"arch_kwargs": arch}}}}
    small = shrink_architecture(plans, ["3d_fullres"], **DEMO_NETWORK)["configurations"]["3d_fullres"]
    kw = small["architecture"]["arch_kwargs"]
    assert kw["features_per_stage"] == [8, 16, 32, 64, 80] and kw["n_stages"] == 5
    assert kw["n_blocks_per_stage"] == [1, 1, 1, 1, 1] and kw["strides"] == arch["strides"]
    assert small["batch_size"] == 2 and small["patch_size"] == [20, 96, 96]
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] == 32


def test_stage_console_prints_commands_then_one_line_per_stage_and_marks_a_failure(tmp_path, capfd):
    from orthodiff_nnunet.console import StageConsole

    lines: list[str] = []
    console = StageConsole(tmp_path / "logs", total=2, write=lines.append)
    with console.stage("plan_and_preprocess", ["orthodiff plan_and_preprocess -d 501 -np 1"]) as stage:
        print("2D U-Net configuration: {...}")
        stage.figures = "3d_fullres patch sag 20x96x96"
    with pytest.raises(ValueError):
        with console.stage("train seg", ["orthodiff train seg -d 501"]):
            raise ValueError("boom")
    assert capfd.readouterr().out == ""
    assert lines[0] == "      $ orthodiff plan_and_preprocess -d 501 -np 1"
    first = STAGE_LINE.match(lines[1])
    assert first and first.group(1, 2, 3) == ("1", "2", "plan_and_preprocess")
    assert first.group(5).strip() == f"3d_fullres patch sag 20x96x96   log: {tmp_path / 'logs' / '01_plan_and_preprocess.log'}"
    assert "2D U-Net configuration" in (tmp_path / "logs" / "01_plan_and_preprocess.log").read_text()
    second = STAGE_LINE.match(lines[3])
    assert lines[2] == "      $ orthodiff train seg -d 501" and second.group(3) == "train seg"
    assert second.group(5).strip().startswith("FAILED   log: ") and len(lines) == 4
    verbose = StageConsole(tmp_path / "v", total=1, verbose=True, write=lines.append)
    with verbose.stage("convert"):
        print("shown as nnU-Net prints it")
    assert capfd.readouterr().out == "shown as nnU-Net prints it\n" and "log:" not in lines[-1]
    assert not (tmp_path / "v").exists()


def test_demo_iterations_are_split_exactly_into_epochs():
    from orthodiff_nnunet.api import split_iterations

    assert split_iterations(300, 10) == (10, 30) and split_iterations(4, 2) == (2, 2)
    assert split_iterations(25, 10) == (5, 5) and split_iterations(23, 10) == (1, 23) and split_iterations(3, 10) == (3, 1)
    for total in range(1, 60):
        epochs, per_epoch = split_iterations(total, 10)
        assert epochs * per_epoch == total and 1 <= epochs <= 10
