"""Masked-autoencoder pretraining, the control objective, on the planned network (tiny phantom, CPU):
what reaches the network, the masked loss, the encoder contract, the CLI, bit-identical resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orthodiff_nnunet.networks.build import write_shrunk_plans

from conftest import TINY_SAG5

DATASET_ID = TINY_SAG5.dataset_id
DATASET = TINY_SAG5.dataset


@pytest.fixture(scope="module")
def planned(tiny_phantom, tmp_path_factory):
    """A sagittal phantom dataset (5 scans), planned and preprocessed, with tiny-network plans: this module's copy."""
    with tiny_phantom(TINY_SAG5, tmp_path_factory.mktemp("mae")) as planned:
        yield planned


def _plans(root: Path, plans_id: str) -> tuple[dict, dict]:
    plans = json.loads((root / "pre" / DATASET / f"{plans_id}.json").read_text())
    plans["continue_training"] = False
    return plans, json.loads((root / "pre" / DATASET / "dataset.json").read_text())


def _mae_trainer(root: Path, plans_id: str):
    from orthodiff_nnunet.trainers.mae_pretraining import nnUNetTrainerOrthoDiffMAE

    plans, dataset_json = _plans(root, plans_id)
    return nnUNetTrainerOrthoDiffMAE(copy.deepcopy(plans), "3d_diffusion", "all", dataset_json, torch.device("cpu"))


def _blocks_constant(mask: torch.Tensor, block: tuple[int, ...]) -> bool:
    """Every block of the tiling from the origin is all masked or all unmasked."""
    m = mask[:, 0].numpy()
    grid = [int(np.ceil(s / b)) for s, b in zip(m.shape[1:], block)]
    for n in range(m.shape[0]):
        for idx in np.ndindex(*grid):
            sl = m[(n,) + tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))]
            if sl.min() != sl.max():
                return False
    return True


# -- (a) what reaches the network ------------------------------------------------------------------

def test_network_sees_the_clean_patch_with_stride_aligned_blocks_zeroed(planned):
    from orthodiff_nnunet.trainers.mae_pretraining import block_mask, masked_mse

    root, plans_id = planned
    trainer = _mae_trainer(root, plans_id)
    trainer.initialize()
    plans, _ = _plans(root, plans_id)
    # the default block is the encoder's total stride, the product of the plans' stage strides
    strides = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]
    expected = tuple(int(np.prod([s[a] for s in strides])) for a in range(3))
    patch = tuple(trainer.configuration_manager.patch_size)
    assert trainer.resolved_mask_block() == tuple(min(e, p) for e, p in zip(expected, patch))
    block = trainer.resolved_mask_block()
    assert max(block) > 1 and all(p % b == 0 for p, b in zip(patch, block))  # the tiny plans: blocks tile the patch

    dl_tr, _ = trainer.get_dataloaders()
    batch = next(dl_tr)
    seen, losses = {}, {}
    hook = trainer._model().denoiser.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))

    def recording_loss(pred, target, mask):
        losses["t"] = (target.clone(), mask.clone())
        return masked_mse(pred, target, mask)

    trainer.loss = recording_loss
    torch.manual_seed(5)
    trainer.train_step(batch)
    hook.remove()
    torch.manual_seed(5)  # the same draw the step made from torch's stream
    mask = block_mask(batch["data"].shape[0], patch, block, trainer.mask_ratio)
    x0 = batch["data"]
    assert torch.equal(losses["t"][1], mask)
    assert torch.equal(seen["x"], x0.masked_fill(mask, 0.0))  # exactly zero on the blocks, untouched elsewhere
    assert torch.equal(losses["t"][0], x0)  # the target is the unmasked clean patch
    assert bool((x0[mask.expand_as(x0)] != 0).any())  # the zeros were put there, the crop was not empty
    assert _blocks_constant(mask, block)

    # the masked fraction is the ratio: per sample exactly round(0.75 * blocks) blocks, so in voxels too
    n_blocks = int(np.prod([p // b for p, b in zip(patch, block)]))
    many = block_mask(64, patch, block, 0.75, torch.Generator().manual_seed(0))
    per_sample = many.float().mean(dim=(1, 2, 3, 4))
    assert torch.allclose(per_sample, torch.full_like(per_sample, round(0.75 * n_blocks) / n_blocks))
    assert abs(float(per_sample[0]) - 0.75) <= 0.5 / n_blocks + 1e-9
    # other ratios, and block edges that do not divide the patch (the last block cut by the border)
    for ratio in (0.3, 0.6, 0.9):
        m = block_mask(16, (20, 20, 20), (4, 4, 4), ratio, torch.Generator().manual_seed(1))
        assert abs(float(m.float().mean()) - ratio) < 0.01 and _blocks_constant(m, (4, 4, 4))
    cut = block_mask(8, (10, 9, 7), (4, 4, 4), 0.5, torch.Generator().manual_seed(2))
    assert cut.shape == (8, 1, 10, 9, 7) and _blocks_constant(cut, (4, 4, 4))
    # masks differ between samples (drawn per sample) and between draws
    assert not torch.equal(many[0], many[1])


def test_mask_block_option_is_used_and_clipped_to_the_patch(planned):
    from orthodiff_nnunet.trainers.mae_pretraining import resolve_mask_block

    root, plans_id = planned
    trainer = _mae_trainer(root, plans_id)
    patch = tuple(trainer.configuration_manager.patch_size)
    trainer.mask_block = 2
    assert trainer.resolved_mask_block() == (2, 2, 2)
    assert resolve_mask_block((1, 1000, 3), patch, (4, 4, 4)) == (1, patch[1], 3)
    with pytest.raises(ValueError, match="one edge or one per axis"):
        resolve_mask_block((2, 2), patch, (4, 4, 4))
    with pytest.raises(ValueError, match="at least 1"):
        resolve_mask_block(0, patch, (4, 4, 4))


# -- (b) the loss ----------------------------------------------------------------------------------

def test_loss_is_the_mse_over_masked_voxels_only():
    from orthodiff_nnunet.trainers.mae_pretraining import masked_mse

    # known answer: 2 channels, 4 voxels of which 1 masked; errors 3 and 1 there -> (9 + 1) / 2 = 5
    target = torch.zeros(1, 2, 1, 1, 4)
    pred = torch.tensor([[[[[3.0, 7.0, 7.0, 7.0]]], [[[-1.0, 5.0, 5.0, 5.0]]]]])
    mask = torch.tensor([True, False, False, False]).reshape(1, 1, 1, 1, 4)
    assert float(masked_mse(pred, target, mask)) == 5.0

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 1, 8, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 1, 8, 8, 8, generator=g)
    mask = torch.rand(2, 1, 8, 8, 8, generator=g) < 0.75
    loss = masked_mse(pred, target, mask)
    d = (pred.detach() - target)[mask]
    assert torch.allclose(loss, (d ** 2).mean(), rtol=1e-6)
    # changing unmasked outputs does not change the loss; changing a masked one does
    other = pred.detach().clone()
    other[~mask] += 100.0
    assert float(masked_mse(other, target, mask)) == float(loss.detach())
    other[mask] += 0.5
    assert float(masked_mse(other, target, mask)) != float(loss.detach())
    loss.backward()
    assert float(pred.grad[~mask].abs().max()) == 0.0 and float(pred.grad[mask].abs().max()) > 0


# -- (c) and 2: the CLI end to end, and the encoder contract ------------------------------------------

@pytest.fixture(scope="module")
def mae_run(planned):
    """``orthodiff pretrain --objective mae`` on the tiny phantom: (root, plans id, output folder)."""
    from orthodiff_nnunet.cli import main

    root, plans_id = planned
    pid = write_shrunk_plans(root / "pre" / DATASET, plans_id, "cliPlans", max_features=4, max_stages=3)
    torch.manual_seed(0)
    rc = main(["pretrain", "-d", str(DATASET_ID), "-p", pid, "--objective", "mae", "--mask-ratio", "0.6",
               "--iterations", "3", "--checkpoint-every", "2", "--lr", "1e-2", "--device", "cpu"])
    assert rc == 0
    out = root / "res" / DATASET / f"nnUNetTrainerOrthoDiffMAE__{pid}__3d_diffusion" / "fold_all"
    return root, pid, out


def test_cli_mae_run_exports_an_encoder_train_seg_accepts(mae_run, capfd):
    from orthodiff_nnunet.cli import main
    from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint
    from orthodiff_nnunet.conventions import PRETRAIN_RUN_RECORD as RUN_RECORD

    root, pid, out = mae_run
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["status"] == "done" and record["objective"] == "mae" and record["iterations_done"] == 3
    assert record["mae"]["mask_ratio"] == 0.6 and len(record["mae"]["mask_block"]) == 3
    assert json.loads((out / "mae_config.json").read_text()) == record["mae"]
    assert not (out / "diffusion_config.json").exists()
    assert len(record["train_losses"]) == 2 and all(np.isfinite(record["val_losses"]))
    assert (out / "loss_curve.png").is_file() and (out / "reconstruction_sanity.png").is_file()
    payload = read_encoder_checkpoint(out / "encoder.pt")
    prov = payload["provenance"]
    assert payload["format"] == "orthodiff-encoder/2" and payload["conditioning"] is None
    assert prov["objective"] == "mae" and prov["conditioned"] is False and "schedule" not in prov
    assert prov["mask_ratio"] == 0.6 and prov["iterations"] == 3 and prov["weights"] == "ema"
    affine = [v for k, v in payload["state_dict"].items() if k.endswith(("film_scale", "film_shift"))]
    assert len(affine) == 6 and all(float(v.abs().max()) == 0 for v in affine)  # the identity

    capfd.readouterr()
    rc = main(["train", "seg", "-d", str(DATASET_ID), "-p", pid, "-f", "0", "--encoder", str(out / "encoder.pt"),
               "--epochs", "1", "--iterations-per-epoch", "1", "--val-iterations", "1", "--no-validation",
               "--device", "cpu"])
    assert rc == 0
    logs = list((root / "res").rglob("nnUNetTrainerOrthoDiffSeg__*/fold_0/training_log_*.txt"))
    text = "".join(f.read_text() for f in logs)
    assert f"encoder warm start from {out / 'encoder.pt'}" in text
    assert "mae objective), no timestep conditioning" in text


@torch.no_grad()
def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.allclose(u, v, rtol=0, atol=1e-6) for u, v in zip(a, b))


def test_downstream_encoders_compute_the_mae_encoder(mae_run):
    from orthodiff_nnunet.networks.build import build_network
    from orthodiff_nnunet.networks.classifier import ViewBranch, load_timestep_film
    from orthodiff_nnunet.trainers.segmentation import nnUNetTrainerOrthoDiffSeg

    root, pid, out = mae_run
    mae = _mae_trainer(root, pid)
    mae.initialize()
    mae.load_checkpoint(str(out / "checkpoint_final.pth"))
    ema = mae._model().ema.eval()

    plans, dataset_json = _plans(root, pid)
    seg = nnUNetTrainerOrthoDiffSeg(copy.deepcopy(plans), "3d_fullres", 0, dataset_json, torch.device("cpu"))
    seg.encoder_path = str(out / "encoder.pt")
    seg.initialize()
    assert "no timestep conditioning" in seg.encoder_report.summary()
    torch.manual_seed(1)
    x = torch.randn(2, 1, *seg.configuration_manager.patch_size)
    with torch.no_grad():
        ref = ema.encoder(x)
        assert _same(seg.network.encoder.eval()(x), ref)
        fresh = nnUNetTrainerOrthoDiffSeg.build_network_architecture(
            seg.plans_manager, seg.configuration_manager, 1, 12, False).encoder.eval()
        assert not _same(fresh(x), ref)  # the check can fail: a fresh encoder computes something else
        # the classifier's --noise-timestep path: an unconditioned encoder is the same function at any t
        for t in (0, 100):
            branch = ViewBranch(build_network(plans, "3d_fullres", 1, 1).encoder, noise_timestep=t, film=True).eval()
            assert "no timestep conditioning" in load_timestep_film(branch, out / "encoder.pt")
            assert _same(branch.encoder(x), ref)


# -- (d) reproducible runs ---------------------------------------------------------------------------

class _Killed(Exception):
    pass


def test_seeded_mae_run_killed_and_resumed_is_bit_identical(planned, monkeypatch):
    from orthodiff_nnunet.pretraining import pretrain
    from orthodiff_nnunet.trainers.mae_pretraining import nnUNetTrainerOrthoDiffMAE

    root, plans_id = planned
    kw = dict(objective="mae", iterations=5, checkpoint_every=2, learning_rate=1e-3, device="cpu", sample_steps=0,
              val_iterations=1, seed=11)
    whole = write_shrunk_plans(root / "pre" / DATASET, plans_id, "wholePlans", max_features=4, max_stages=3)
    parts = write_shrunk_plans(root / "pre" / DATASET, plans_id, "partsPlans", max_features=4, max_stages=3)
    a = pretrain(DATASET_ID, plans=whole, **kw)

    original = nnUNetTrainerOrthoDiffMAE.on_epoch_end

    def killed_after_second_checkpoint(self):
        original(self)
        if self.current_epoch == 2:  # checkpoint_latest holds iteration 4 of 5
            raise _Killed

    monkeypatch.setattr(nnUNetTrainerOrthoDiffMAE, "on_epoch_end", killed_after_second_checkpoint)
    with pytest.raises(_Killed):
        pretrain(DATASET_ID, plans=parts, **kw)
    monkeypatch.undo()
    torch.manual_seed(999)  # the resumed process starts from other random streams
    np.random.seed(999)
    with pytest.raises(Exception, match="other mae settings"):
        pretrain(DATASET_ID, plans=parts, resume=True, **{**kw, "mask_ratio": 0.5})
    b = pretrain(DATASET_ID, plans=parts, resume=True, **kw)

    wa = torch.load(a.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    wb = torch.load(b.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert wa["current_epoch"] == wb["current_epoch"] == 3 and a.iterations == b.iterations == 5
    assert wa["network_weights"].keys() == wb["network_weights"].keys()
    for k, v in wa["network_weights"].items():
        assert torch.equal(v, wb["network_weights"][k]), k  # network and EMA, every tensor
    for s, t in zip(wa["optimizer_state"]["state"].values(), wb["optimizer_state"]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in s)
    assert {int(s["step"]) for s in wb["optimizer_state"]["state"].values()} == {5}
    assert a.train_losses == b.train_losses and a.val_losses == b.val_losses
    # and the seed matters: another seed gives other weights
    other = write_shrunk_plans(root / "pre" / DATASET, plans_id, "otherSeedPlans", max_features=4, max_stages=3)
    c = pretrain(DATASET_ID, plans=other, **{**kw, "seed": 12})
    wc = torch.load(c.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(not torch.equal(v, wc["network_weights"][k]) for k, v in wa["network_weights"].items())


# -- (e) refusals -------------------------------------------------------------------------------------

def test_cli_refuses_unknown_objective_and_mask_ratio_outside_0_1(capsys):
    from orthodiff_nnunet.cli import main
    from orthodiff_nnunet.errors import OrthodiffError
    from orthodiff_nnunet.pretraining import pretrain

    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "-d", "999", "--objective", "simclr"])
    assert exc.value.code == 2
    assert "argument --objective: invalid choice: 'simclr'" in capsys.readouterr().err
    for bad in ("0", "1", "1.5", "-0.2"):
        assert main(["pretrain", "-d", "999", "--objective", "mae", "--mask-ratio", bad]) == 2
        err = capsys.readouterr().err
        assert f"--mask-ratio {float(bad)} must be in (0, 1)" in err, err
    assert main(["pretrain", "-d", "999", "--objective", "mae", "--mask-block", "0"]) == 2
    assert "--mask-block [0]: give one edge or one per axis, each at least 1 voxel" in capsys.readouterr().err
    with pytest.raises(OrthodiffError, match="--objective 'simclr' is not known: use one of diffusion, mae"):
        pretrain(999, objective="simclr")
