"""Diffusion pretraining on a tiny phantom (CPU): loss falls, kill-and-resume, encoder contract, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from orthodiff_nnunet.networks.build import architecture_hash, architecture_of, build_network, write_shrunk_plans
from orthodiff_nnunet.networks.encoder_io import EncoderMismatchError, load_encoder, read_encoder_checkpoint

from conftest import TINY_SAG4

DATASET = TINY_SAG4.dataset


@pytest.fixture(scope="module")
def planned(tiny_phantom, tmp_path_factory):
    """A sagittal phantom dataset, planned and preprocessed by orthodiff, with tiny-network plans: this module's copy."""
    with tiny_phantom(TINY_SAG4, tmp_path_factory.mktemp("pretrain")) as planned:
        yield planned


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "orthodiff_nnunet.cli", *args], env=dict(os.environ), **kw)


@pytest.fixture(scope="module")
def pretrained(planned):
    """40 diffusion iterations on the tiny plans: the run whose encoder the tests below inspect."""
    from orthodiff_nnunet.pretraining import pretrain

    torch.manual_seed(0)
    return pretrain(521, plans=planned[1], iterations=40, checkpoint_every=10, learning_rate=2e-3,
                    device="cpu", sample_steps=3)


def test_loss_falls_and_encoder_loads_strictly(planned, pretrained):
    root, plans_id = planned
    result = pretrained
    assert result.iterations == 40
    assert len(result.train_losses) == 4
    assert result.train_losses[-1] < 0.75 * result.train_losses[0], result.train_losses
    assert (result.output_folder / "loss_curve.png").is_file() and result.sample_png.is_file()
    assert (result.output_folder / "checkpoint_final.pth").is_file()

    payload = read_encoder_checkpoint(result.encoder_path)
    prov = payload["provenance"]
    # 4 scans: one held out for the validation loss (--val-fraction 0.1), the encoder saw 3
    assert prov["iterations"] == 40 and prov["scans"] == 3 and prov["orientation"] == "sag"
    assert len(prov["held_out_cases"]) == 1 and not set(prov["held_out_cases"]) & set(prov["train_cases"])
    assert prov["schedule"] == {"name": "cosine", "num_steps": 1000} and prov["weights"] == "ema"
    assert prov["nnunetv2_version"].startswith("2.8")

    # round trip: a segmentation network of the same plans gets exactly these encoder weights
    plans = json.loads((root / "pre" / DATASET / f"{plans_id}.json").read_text())
    seg = build_network(plans, "3d_fullres", 1, 12)
    decoder_before = {k: v.clone() for k, v in seg.decoder.state_dict().items() if not k.startswith("encoder.")}
    report = load_encoder(seg, result.encoder_path, architecture_hash(architecture_of(plans, "3d_fullres")))
    assert report.tensors == len(payload["state_dict"]) > 0
    for k, v in seg.encoder.state_dict().items():
        assert torch.equal(v, payload["state_dict"][k]), k
    for k, v in seg.decoder.state_dict().items():
        if k in decoder_before:
            assert torch.equal(v, decoder_before[k]), k  # decoder untouched

    # the encoder is the pretrained EMA one, not a fresh initialisation
    fresh = build_network(plans, "3d_fullres", 1, 12)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.encoder.state_dict().values(), payload["state_dict"].values()))


def test_mismatched_network_is_refused(planned, pretrained):
    root, plans_id = planned
    encoder = pretrained.encoder_path
    plans = json.loads((root / "pre" / DATASET / f"{plans_id}.json").read_text())
    other_id = write_shrunk_plans(root / "pre" / DATASET, plans_id, "tinierPlans", max_features=4)
    other = json.loads((root / "pre" / DATASET / f"{other_id}.json").read_text())
    net = build_network(other, "3d_fullres", 1, 12)
    with pytest.raises(EncoderMismatchError, match="other shapes"):
        load_encoder(net, encoder)
    with pytest.raises(EncoderMismatchError, match="pretrained with architecture .*--plans-from"):
        load_encoder(net, encoder, architecture_hash(architecture_of(other, "3d_fullres")))
    assert architecture_hash(architecture_of(plans, "3d_fullres")) == architecture_hash(architecture_of(plans, "3d_diffusion"))


def test_kill_and_resume_ends_at_same_iteration_and_optimizer_state(planned):
    root, plans_id = planned
    other = write_shrunk_plans(root / "pre" / DATASET, plans_id, "resumePlans")
    out = root / "res" / DATASET / f"nnUNetTrainerOrthoDiffPretrain__{other}__3d_diffusion" / "fold_all"
    args = ["pretrain", "-d", "521", "-p", other, "--iterations", "40", "--checkpoint-every", "10",
            "--device", "cpu", "--sample-steps", "0"]
    proc = _run_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoint_latest.pth"
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.is_file() and torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"] >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    assert 2 <= saved["current_epoch"] < 4, "the run was killed before it finished"
    # the kill may land mid-write: the latest checkpoint (loaded above) stays whole, a temporary may be left.
    # Plant one of a process that is gone and one of a live process: the resumed run removes only the first.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_tmp = out / f".loss_curve.csv.pid{gone.pid}.x1y2z3.tmp"
    live_tmp = out / f".checkpoint_latest.pth.pid{os.getpid()}.tmp"  # this test process: alive
    dead_tmp.write_text("half")
    live_tmp.write_text("half")
    # without --resume the run refuses to overwrite
    refused = subprocess.run([sys.executable, "-m", "orthodiff_nnunet.cli", *args], capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = subprocess.run([sys.executable, "-m", "orthodiff_nnunet.cli", *args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(out.glob(".*.tmp")) == [live_tmp]  # the killed runs' temporaries are gone, the live one kept
    assert f"removed {dead_tmp.name}, left by a killed run" in "".join(
        f.read_text() for f in out.glob("training_log_*.txt"))
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4  # 40 iterations = 4 x 10
    steps = {int(s["step"]) for s in final["optimizer_state"]["state"].values()}
    assert steps == {40}  # every optimizer step was taken exactly once across the kill
    assert len(json.loads(json.dumps(final["logging"]["train_losses"], default=float))) == 4


@pytest.mark.slow
def test_ddp_two_processes_gloo_on_cpu(planned):
    root, plans_id = planned
    other = write_shrunk_plans(root / "pre" / DATASET, plans_id, "ddpPlans")
    cli = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "orthodiff_nnunet.cli", "pretrain", "-d", "521", "-p", other, "--iterations", "8",
           "--checkpoint-every", "4", "--device", "cpu", "--sample-steps", "0"]
    done = subprocess.run(cli, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = root / "res" / DATASET / f"nnUNetTrainerOrthoDiffPretrain__{other}__3d_diffusion" / "fold_all"
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    assert read_encoder_checkpoint(out / "encoder.pt")["provenance"]["iterations"] == 8
