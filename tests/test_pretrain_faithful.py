"""Pretraining faithful to the method: what the denoiser learns from, the exported conditioning,
held-out validation, bit-identical resume, exact iteration counts (tiny phantom, CPU)."""

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
    with tiny_phantom(TINY_SAG5, tmp_path_factory.mktemp("faithful")) as planned:
        yield planned


def _trainer(root: Path, plans_id: str):
    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain

    plans = json.loads((root / "pre" / DATASET / f"{plans_id}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((root / "pre" / DATASET / "dataset.json").read_text())
    return nnUNetTrainerOrthoDiffPretrain(copy.deepcopy(plans), "3d_diffusion", "all", dataset_json,
                                          torch.device("cpu"))


def _find_block(volume: np.ndarray, patch: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offset, flipped axes) such that ``patch`` is ``volume``'s block at offset, flipped; None if none is."""
    import itertools

    dims = patch.ndim
    for k in range(dims + 1):
        for axes in itertools.combinations(range(dims), k):
            p = np.flip(patch, axes) if axes else patch
            anchor = np.unravel_index(np.argmax(np.abs(p)), p.shape)
            for pos in np.argwhere(volume == p[anchor]):
                off = tuple(int(a - b) for a, b in zip(pos, anchor))
                if all(o >= 0 and o + s <= v for o, s, v in zip(off, p.shape, volume.shape)):
                    if np.array_equal(volume[tuple(slice(o, o + s) for o, s in zip(off, p.shape))], p):
                        return off, axes
    return None


# -- 1. what the denoiser learns from ------------------------------------------------------------

def test_denoiser_sees_the_preprocessed_voxels_cropped_and_mirrored_only(planned):
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    root, plans_id = planned
    trainer = _trainer(root, plans_id)
    trainer.initialize()
    names = [type(t).__name__ for t in trainer.get_training_transforms(
        trainer.configuration_manager.patch_size, None, None, (0, 1, 2), False).transforms]
    assert names == [MirrorTransform.__name__, RemoveLabelTansform.__name__]
    assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2] == \
        tuple(trainer.configuration_manager.patch_size)  # no enlarged crop for rotations

    torch.manual_seed(3)
    np.random.seed(3)
    dl_tr, _ = trainer.get_dataloaders()
    ds = trainer.dataset_class(trainer.preprocessed_dataset_folder, trainer.get_tr_and_val_datasets()[0].identifiers)
    patch = tuple(trainer.configuration_manager.patch_size)
    flips = set()
    for _ in range(3):
        batch = next(dl_tr)
        for x, key in zip(batch["data"].numpy(), batch["keys"]):
            data = np.asarray(ds.load_case(key)[0][:], dtype=np.float32)
            # nnU-Net's loader pads with zeros where the patch reaches past the scan
            padded = np.pad(data, [(0, 0)] + [(p, p) for p in patch])
            found = _find_block(padded[0], x[0])
            assert found is not None, f"{key}: the patch is not a crop/mirror of the preprocessed scan"
            flips.add(found[1])
    assert len(flips) > 1  # mirroring is on: flipped and unflipped patches occur

    # the check can fail: nnU-Net's own pipeline changes intensities (noise, blur, gamma ...)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    full = nnUNetTrainer.get_training_transforms(patch, trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[0],
                                                 None, (0, 1, 2), False)
    assert "GaussianNoiseTransform" in [type(getattr(t, "transform", t)).__name__ for t in full.transforms]


# -- 2. features the encoder was trained to produce ------------------------------------------------

def _denoiser_encoder_outputs(ema, x: torch.Tensor, t: int) -> list[torch.Tensor]:
    """The pretrained denoiser's encoder stage outputs at timestep ``t`` (its FiLM hooks active)."""
    from orthodiff_nnunet.networks.conditioning import sinusoidal_embedding

    ema._emb = ema.time_mlp(sinusoidal_embedding(torch.full((x.shape[0],), t), ema.embed_dim))
    try:
        return ema.network.encoder(x)
    finally:
        ema._emb = None


@torch.no_grad()
def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b))


def test_downstream_encoders_compute_the_pretrained_encoder_at_its_timestep(planned, tmp_path):
    from orthodiff_nnunet.networks.build import build_network
    from orthodiff_nnunet.networks.classifier import ViewBranch, load_timestep_film
    from orthodiff_nnunet.networks.conditioning import set_stage_affine
    from orthodiff_nnunet.networks.encoder_io import EncoderMismatchError, load_encoder, read_encoder_checkpoint
    from orthodiff_nnunet.pretraining import pretrain
    from orthodiff_nnunet.trainers.segmentation import nnUNetTrainerOrthoDiffSeg

    root, plans_id = planned
    pid = write_shrunk_plans(root / "pre" / DATASET, plans_id, "condPlans", max_features=4, max_stages=3)
    torch.manual_seed(0)
    res = pretrain(DATASET_ID, plans=pid, iterations=4, checkpoint_every=2, learning_rate=1e-2, device="cpu",
                   sample_steps=0, val_iterations=1)
    payload = read_encoder_checkpoint(res.encoder_path)
    assert payload["format"] == "orthodiff-encoder/2" and payload["provenance"]["reference_timestep"] == 0
    scales = [v for k, v in payload["state_dict"].items() if k.endswith("film_scale") or k.endswith("film_shift")]
    assert len(scales) == 6 and max(float(v.abs().max()) for v in scales) > 1e-3  # trained, not the identity

    den = _trainer(root, pid)
    den.initialize()
    den.load_checkpoint(str(res.output_folder / "checkpoint_final.pth"))
    ema = den._model().ema.eval()

    plans = json.loads((root / "pre" / DATASET / f"{pid}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((root / "pre" / DATASET / "dataset.json").read_text())
    seg = nnUNetTrainerOrthoDiffSeg(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    seg.encoder_path = str(res.encoder_path)
    seg.initialize()
    assert "t=0" in seg.encoder_report.summary()
    seg_encoder = seg.network.encoder.eval()

    torch.manual_seed(1)
    x = torch.randn(2, 1, *seg.configuration_manager.patch_size)
    with torch.no_grad():
        ref0 = _denoiser_encoder_outputs(ema, x, 0)
        assert _same(seg_encoder(x), ref0)
        plain = copy.deepcopy(seg_encoder)
        set_stage_affine(plain, None)  # what `train seg` ran before: scale = shift = 0
        assert not _same(plain(x), ref0)

        # the classifier's --noise-timestep: the same contract at another timestep
        branch = ViewBranch(build_network(plans, "3d_fullres", 1, 1).encoder, noise_timestep=100, film=True).eval()
        assert "t=100" in load_timestep_film(branch, res.encoder_path)
        assert _same(branch.encoder(x), _denoiser_encoder_outputs(ema, x, 100))
        assert not _same(branch.encoder(x), ref0)
        ablation = ViewBranch(build_network(plans, "3d_fullres", 1, 1).encoder, noise_timestep=100, film=False).eval()
        load_timestep_film(ablation, res.encoder_path)
        assert _same(ablation.encoder(x), plain(x))

    # an nnU-Net checkpoint of a network trained without the buffers loads with the identity
    net = build_network(plans, "3d_fullres", 1, 12)
    state = {k: v for k, v in net.state_dict().items() if "film_" not in k}
    load_encoder(net, res.encoder_path)
    net.load_state_dict(state, strict=True)
    assert all(float(v.abs().max()) == 0 for k, v in net.state_dict().items() if "film_" in k)

    # an old weights-only encoder is refused, saying why and what to do
    old = {**payload, "format": "orthodiff-encoder/1", "conditioning": None}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(EncoderMismatchError, match=r"scale = shift = 0.*--resume"):
        load_encoder(build_network(plans, "3d_fullres", 1, 12), tmp_path / "old.pt")


# -- 3. honest validation --------------------------------------------------------------------------

def test_validation_loss_is_measured_on_held_out_scans(planned):
    from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint
    from orthodiff_nnunet.conventions import PRETRAIN_RUN_RECORD as RUN_RECORD
    from orthodiff_nnunet.pretraining import pretrain

    root, plans_id = planned
    pid = write_shrunk_plans(root / "pre" / DATASET, plans_id, "splitPlans", max_features=4, max_stages=3)
    all_cases = sorted(json.loads((root / "raw" / DATASET / "orthodiff_targets.json").read_text())["cases"])
    assert len(all_cases) == 5
    res = pretrain(DATASET_ID, plans=pid, iterations=2, checkpoint_every=2, device="cpu", sample_steps=0,
                   val_iterations=1, val_fraction=0.2, exclude_cases=[all_cases[0]])
    record = json.loads((res.output_folder / RUN_RECORD).read_text())
    train, held = record["train_cases"], record["held_out_cases"]
    assert record["excluded_cases"] == [all_cases[0]] and all_cases[0] not in train + held
    assert len(held) == 1 and len(train) == 3 and not set(train) & set(held)  # round(0.2 * 4) = 1
    assert sorted(train + held) == all_cases[1:]
    prov = read_encoder_checkpoint(res.encoder_path)["provenance"]
    assert prov["train_cases"] == train and prov["held_out_cases"] == held and prov["scans"] == 3

    # what the trainer validates on: exactly the held-out scans; the training loader never sees them
    trainer = _trainer(root, pid)
    trainer.val_fraction, trainer.exclude_cases = 0.2, [all_cases[0]]
    ds_tr, ds_val = trainer.get_tr_and_val_datasets()
    assert list(ds_val.identifiers) == held and sorted(ds_tr.identifiers) == sorted(train)
    # the same seed gives the same split; a tiny fraction still holds out one scan
    trainer = _trainer(root, pid)
    trainer.val_fraction = 0.01
    tr, val = trainer.do_split()
    assert len(val) == 1 and len(tr) == 4 and not set(tr) & set(val)
    trainer = _trainer(root, pid)
    trainer.val_fraction = 0.0
    tr, val = trainer.do_split()
    assert tr == val == all_cases and trainer.split_record()["held_out_cases"] == []


# -- 4. reproducible runs --------------------------------------------------------------------------

class _Killed(Exception):
    pass


def test_seeded_run_killed_and_resumed_is_bit_identical(planned, monkeypatch):
    from orthodiff_nnunet.pretraining import pretrain
    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain

    root, plans_id = planned
    kw = dict(iterations=6, checkpoint_every=2, learning_rate=1e-3, device="cpu", sample_steps=0,
              val_iterations=1, seed=11)
    whole = write_shrunk_plans(root / "pre" / DATASET, plans_id, "wholePlans", max_features=4, max_stages=3)
    parts = write_shrunk_plans(root / "pre" / DATASET, plans_id, "partsPlans", max_features=4, max_stages=3)
    a = pretrain(DATASET_ID, plans=whole, **kw)

    original = nnUNetTrainerOrthoDiffPretrain.on_epoch_end

    def killed_after_second_checkpoint(self):
        original(self)
        if self.current_epoch == 2:  # checkpoint_latest holds iteration 4 of 6
            raise _Killed

    monkeypatch.setattr(nnUNetTrainerOrthoDiffPretrain, "on_epoch_end", killed_after_second_checkpoint)
    with pytest.raises(_Killed):
        pretrain(DATASET_ID, plans=parts, **kw)
    monkeypatch.setattr(nnUNetTrainerOrthoDiffPretrain, "on_epoch_end", original)
    torch.manual_seed(999)  # the resumed process starts from other random streams
    np.random.seed(999)
    b = pretrain(DATASET_ID, plans=parts, resume=True, **kw)

    wa = torch.load(a.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    wb = torch.load(b.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert wa["current_epoch"] == wb["current_epoch"] == 3
    assert wa["network_weights"].keys() == wb["network_weights"].keys()
    for k, v in wa["network_weights"].items():
        assert torch.equal(v, wb["network_weights"][k]), k  # denoiser and EMA, every tensor
    for s, t in zip(wa["optimizer_state"]["state"].values(), wb["optimizer_state"]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in s)
    assert a.train_losses == b.train_losses and a.val_losses == b.val_losses
    # and the seed matters: another seed gives other weights
    other = write_shrunk_plans(root / "pre" / DATASET, plans_id, "otherSeedPlans", max_features=4, max_stages=3)
    c = pretrain(DATASET_ID, plans=other, **{**kw, "seed": 12})
    wc = torch.load(c.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(not torch.equal(v, wc["network_weights"][k]) for k, v in wa["network_weights"].items())


# -- 5. exact iterations and progress ----------------------------------------------------------------

@pytest.mark.parametrize("iterations,every,epochs", [(5, 2, 3), (3, 250, 1)])
def test_iterations_are_exact_and_progress_is_shown(planned, capfd, iterations, every, epochs):
    from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint
    from orthodiff_nnunet.conventions import PRETRAIN_RUN_RECORD as RUN_RECORD
    from orthodiff_nnunet.pretraining import pretrain

    root, plans_id = planned
    pid = write_shrunk_plans(root / "pre" / DATASET, plans_id, f"exact{iterations}Plans", max_features=4, max_stages=3)
    res = pretrain(DATASET_ID, plans=pid, iterations=iterations, checkpoint_every=every, device="cpu",
                   sample_steps=0, val_iterations=1)
    assert res.iterations == iterations
    record = json.loads((res.output_folder / RUN_RECORD).read_text())
    assert record["status"] == "done" and record["iterations_done"] == iterations
    final = torch.load(res.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == epochs
    assert {int(s["step"]) for s in final["optimizer_state"]["state"].values()} == {iterations}  # optimizer steps
    assert read_encoder_checkpoint(res.encoder_path)["provenance"]["iterations"] == iterations
    curve = (res.output_folder / "loss_curve.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in curve] == [min((i + 1) * every, iterations) for i in range(epochs)]
    log = "\n".join(p.read_text() for p in res.output_folder.glob("training_log_*.txt"))
    assert f"iteration {iterations}: train loss" in log
    err = capfd.readouterr().err
    assert "pretraining: 100%" in err and f"{iterations}/{iterations}" in err and ("it/s" in err or "s/it" in err)


def test_old_encoder_is_re_exported_by_resuming_the_finished_run(planned):
    """The refusal message of a format-1 encoder says: rerun with --resume. That works, and trains nothing more."""
    from orthodiff_nnunet.networks.encoder_io import read_encoder_checkpoint
    from orthodiff_nnunet.conventions import PRETRAIN_RUN_RECORD as RUN_RECORD
    from orthodiff_nnunet.pretraining import pretrain

    root, plans_id = planned
    pid = write_shrunk_plans(root / "pre" / DATASET, plans_id, "oldRunPlans", max_features=4, max_stages=3)
    kw = dict(iterations=2, checkpoint_every=2, device="cpu", sample_steps=0, val_iterations=1)
    res = pretrain(DATASET_ID, plans=pid, **kw)
    payload = read_encoder_checkpoint(res.encoder_path)
    (res.output_folder / RUN_RECORD).unlink()  # a run from before the run record: it trained on every scan
    torch.save({"format": "orthodiff-encoder/1", "provenance": payload["provenance"],
                "state_dict": {k: v for k, v in payload["state_dict"].items() if "film_" not in k}}, res.encoder_path)
    again = pretrain(DATASET_ID, plans=pid, resume=True, **kw)
    new = read_encoder_checkpoint(again.encoder_path)
    assert new["format"] == "orthodiff-encoder/2" and new["provenance"]["iterations"] == 2
    assert new["provenance"]["held_out_cases"] == [] and new["provenance"]["scans"] == 5
    for k, v in payload["state_dict"].items():
        assert torch.equal(v, new["state_dict"][k]), k  # the same EMA weights and conditioning
    final = torch.load(again.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert {int(s["step"]) for s in final["optimizer_state"]["state"].values()} == {2}


# -- 6. on CUDA: torch.compile through the FiLM hooks, fp16 loss scaling ------------------------------

@pytest.mark.gpu
def test_cuda_compiled_denoiser_runs_the_film_hooks_like_the_eager_one(planned, monkeypatch):
    """nnU-Net compiles the network on CUDA (``nnUNet_compile=1``): the compiled denoiser, whose FiLM forward
    hooks read the timestep embedding set in ``forward``, computes what the eager one computes, at every
    timestep, and trains."""
    from orthodiff_nnunet.trainers.diffusion_pretraining import nnUNetTrainerOrthoDiffPretrain

    monkeypatch.setenv("nnUNet_compile", "1")
    root, plans_id = planned
    pid = write_shrunk_plans(root / "pre" / DATASET, plans_id, "compilePlans", max_features=4, max_stages=3)
    plans = json.loads((root / "pre" / DATASET / f"{pid}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((root / "pre" / DATASET / "dataset.json").read_text())
    trainer = nnUNetTrainerOrthoDiffPretrain(plans, "3d_diffusion", "all", dataset_json, torch.device("cuda"))
    trainer.precision = "fp32"
    trainer.initialize()
    assert hasattr(trainer.network, "_orig_mod")  # nnU-Net's torch.compile wrapper
    eager = trainer._model()
    torch.manual_seed(0)
    with torch.no_grad():
        for lin in eager.denoiser.film:  # FiLM layers start at zero (the identity): give them a timestep effect
            lin.weight.normal_(0, 0.05)
            lin.bias.normal_(0, 0.05)
    x = torch.randn(2, 1, *trainer.configuration_manager.patch_size, device="cuda")
    with torch.no_grad():
        outs = {}
        for t in (0, 700):
            tt = torch.full((2,), t, device="cuda")
            outs[t] = trainer.network(x, tt)
            torch.testing.assert_close(outs[t], eager(x, tt), rtol=1e-3, atol=1e-3)
        assert not torch.allclose(outs[0], outs[700], atol=1e-3)  # the hooks act inside the compiled graph

    dl_tr, _ = trainer.get_dataloaders()
    film = [lin.weight.detach().clone() for lin in eager.denoiser.film]
    losses = [float(trainer.train_step(next(dl_tr))["loss"]) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    assert all(not torch.equal(a, lin.weight) for a, lin in zip(film, eager.denoiser.film))  # FiLM trained


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_cuda_fp16_pretraining_scales_the_loss_and_skips_no_step_silently(planned, precision):
    """fp16 (the default on CUDA) trains with nnU-Net's GradScaler: its state is in the checkpoint, its scale
    is 2**16 halved once per overflowing step, and the optimizer took exactly the steps the scaler did not
    skip; fp32 trains without one."""
    import math

    from orthodiff_nnunet.conventions import PRETRAIN_RUN_RECORD as RUN_RECORD
    from orthodiff_nnunet.pretraining import pretrain

    root, plans_id = planned
    pid = write_shrunk_plans(root / "pre" / DATASET, plans_id, f"{precision}CudaPlans", max_features=4, max_stages=3)
    torch.manual_seed(0)
    res = pretrain(DATASET_ID, plans=pid, iterations=4, checkpoint_every=2, learning_rate=1e-3, device="cuda",
                   sample_steps=0, val_iterations=1, precision=precision)
    assert json.loads((res.output_folder / "diffusion_config.json").read_text())["precision"] == precision
    assert json.loads((res.output_folder / RUN_RECORD).read_text())["iterations_done"] == 4
    final = torch.load(res.output_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    steps = {int(s["step"]) for s in final["optimizer_state"]["state"].values()}
    assert all(np.isfinite(res.train_losses)) and all(np.isfinite(res.val_losses))
    assert all(bool(torch.isfinite(v).all()) for v in final["network_weights"].values() if v.is_floating_point())
    if precision == "fp32":
        assert final["grad_scaler_state"] is None and steps == {4}
        return
    scaler = final["grad_scaler_state"]
    skipped = math.log2(2.0 ** 16 / scaler["scale"])
    assert skipped.is_integer() and 0 <= skipped <= 4, scaler  # GradScaler's initial scale, halved per overflow
    assert steps == {4 - int(skipped)}  # an overflowing step is skipped, every other one taken
    assert scaler["_growth_tracker"] <= 4 - int(skipped)
