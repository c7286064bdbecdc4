"""Warm-started segmentation on a tiny planned phantom (CPU): encoder round trip, refusals, label
fraction on labeled cases, warm-up and freezing, a short training with validation, prediction with
the source geometry, and nnU-Net's own predictor finding our trainer."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from orthodiff_nnunet.api import convert
from orthodiff_nnunet.data.phantom import write_site
from orthodiff_nnunet.data.sites import SITE_3T
from orthodiff_nnunet.networks.build import architecture_hash, architecture_of, build_network, write_shrunk_plans
from orthodiff_nnunet.networks.encoder_io import EncoderMismatchError, export_encoder, read_encoder_checkpoint
from orthodiff_nnunet.utils import load_json

from conftest import nnunet_env

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 541
DATASET = "Dataset541_SegTestSag"
PLANS = "microPlans"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Sagittal phantom: 5 labeled + 2 unlabeled exams (slightly oblique, 1.6 mm pixels), planned,
    preprocessed, with micro plans and a 4-iteration diffusion pretraining of them."""
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.pretraining import pretrain

    root = tmp_path_factory.mktemp("seg")
    with nnunet_env(root), pytest.MonkeyPatch.context() as mp:
        site = dataclasses.replace(SITE_3T, in_plane_spacing_mm=1.6)
        labeled = write_site(root / "site", site, n_cases=5, seed=5, orientations=("sag",), obliquity_deg=6)
        rows = list(csv.DictReader(open(labeled)))
        unlabeled = write_site(root / "site", site, n_cases=2, seed=6, orientations=("sag",), with_labels=False,
                               case_prefix="UNL", patient_prefix="UPAT", obliquity_deg=6)
        rows += list(csv.DictReader(open(unlabeled)))
        with open(labeled, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        # a fixed key (outside the dataset): the same case names, hence the same folds, every run. With a random
        # key, 2 of 7 cases unlabeled left some fold without a labeled validation case in most runs; this key
        # gives every fold one (test_fold_without_a_labeled_validation_case_is_refused_by_name checks it)
        key = root / "pseudonym.key"
        key.write_text(hashlib.sha256(b"orthodiff segmentation tests 3").hexdigest() + "\n")
        convert(labeled, DATASET_ID, "SegTest", num_processes=1, pseudonym_key=key)
        result = plan_and_preprocess([DATASET_ID], num_processes=1, show_progress=False)
        # tiny network: 3 stages, 8 features, one residual block per stage, batch 2
        plans_id = write_shrunk_plans(root / "pre" / DATASET, result.datasets[0].plans_identifier, PLANS)
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

        mp.setattr(trainer_module, "default_num_processes", 1)  # validation export/metrics pools: one worker on 2 cores
        torch.manual_seed(0)
        pre = pretrain(DATASET_ID, plans=plans_id, iterations=4, checkpoint_every=2, device="cpu", sample_steps=0,
                       val_iterations=1)
        targets = load_json(root / "raw" / DATASET / "orthodiff_targets.json")["cases"]
        yield {"root": root, "plans": plans_id, "encoder": pre.encoder_path, "targets": targets}


def _trainer(root: Path, cls_name: str = "nnUNetTrainerOrthoDiffSeg", plans_id: str = PLANS, fold=0, **attrs):
    import orthodiff_nnunet.trainers.segmentation as seg

    pre = root / "pre" / DATASET
    plans = load_json(pre / f"{plans_id}.json")
    plans["continue_training"] = False
    trainer = getattr(seg, cls_name)(plans, "3d_fullres", fold, load_json(pre / "dataset.json"), torch.device("cpu"))
    trainer.num_epochs = 2
    trainer.num_iterations_per_epoch = 1
    trainer.num_val_iterations_per_epoch = 1
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


def _labeled(targets: dict) -> set[str]:
    return {c for c, v in targets.items() if v["segmentation"] == "labeled"}


def _folds(planned: dict, labeled_val: bool) -> list[int]:
    """Folds of the fixture's splits whose validation holds a labeled case (or, with False, none)."""
    splits = load_json(planned["root"] / "pre" / DATASET / "splits_final.json")
    labeled = _labeled(planned["targets"])
    return [i for i, s in enumerate(splits) if bool(set(s["val"]) & labeled) == labeled_val]


# -- pure -----------------------------------------------------------------------------------------

def test_warmup_then_nnunet_poly_schedule():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    from orthodiff_nnunet.trainers.segmentation import WarmupPolyLRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyLRScheduler(opt, 1e-2, max_steps=10, warmup_steps=3)
    lrs = []
    for epoch in range(10):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.0025, 0.005, 0.0075, 0.01] + [0.01 * (1 - k / 7) ** 0.9 for k in range(1, 7)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    # no warm-up: nnU-Net's PolyLRScheduler exactly
    poly = PolyLRScheduler(opt, 1e-2, 10)
    ours = WarmupPolyLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1e-2, 10, 0)
    for epoch in range(10):
        poly.step(epoch)
        ours.step(epoch)
        assert ours.get_last_lr()[0] == poly.get_last_lr()[0]


def test_trainer_module_imports_by_bare_name_and_nnunet_finds_it():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import segmentation; "
        "assert segmentation.nnUNetTrainerOrthoDiffSegScratch.init == 'scratch'; "
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
        "print(find('nnUNetTrainerOrthoDiffSeg').__module__, find('nnUNetTrainerOrthoDiffSegScratch').init)"
    )
    env = dict(os.environ, nnUNet_extTrainer=str(REPO / "trainers"))
    done = subprocess.run([sys.executable, "-c", code, str(REPO / "trainers")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "segmentation scratch"


# -- trainer on the planned phantom ---------------------------------------------------------------

def test_encoder_round_trip_twin_differs_only_in_encoder(planned):
    root = planned["root"]
    payload = read_encoder_checkpoint(planned["encoder"])
    torch.manual_seed(123)
    scratch = _trainer(root, "nnUNetTrainerOrthoDiffSegScratch")
    scratch.initialize()
    torch.manual_seed(123)
    warm = _trainer(root)  # default encoder: the pretraining output of this dataset and plans
    warm.initialize()
    assert warm.resolved_encoder_path() == planned["encoder"]
    assert warm.encoder_report.tensors == len(payload["state_dict"]) > 0
    for k, v in warm.network.encoder.state_dict().items():
        assert torch.equal(v, payload["state_dict"][k]), k  # encoder weights equal the checkpoint's
    differ = [k for k, v in scratch.network.encoder.state_dict().items() if not torch.equal(v, payload["state_dict"][k])]
    assert differ  # ... which is not what a fresh initialisation gives
    warm_dec, scratch_dec = warm.network.decoder.state_dict(), scratch.network.decoder.state_dict()
    own = [k for k in warm_dec if not k.startswith("encoder.")]  # decoder.encoder.* aliases the encoder
    assert own and all(torch.equal(warm_dec[k], scratch_dec[k]) for k in own)  # decoder untouched
    log = Path(warm.log_file).read_text()
    assert "encoder warm start from" in log and f"loaded {len(payload['state_dict'])} encoder tensors" in log
    assert "nnUNetTrainerOrthoDiffSegScratch__microPlans__3d_fullres" in scratch.output_folder
    assert "nnUNetTrainerOrthoDiffSeg__microPlans__3d_fullres" in warm.output_folder


def test_encoder_of_other_plans_and_missing_encoder_are_refused(planned, tmp_path):
    from orthodiff_nnunet.errors import OrthodiffError
    from orthodiff_nnunet.cli.segmentation import add_train_seg_parser
    from orthodiff_nnunet.segmentation import SegmentationError, train_segmentation

    root = planned["root"]
    other_id = write_shrunk_plans(root / "pre" / DATASET, PLANS, "otherPlans", max_features=4)
    other = load_json(root / "pre" / DATASET / f"{other_id}.json")
    arch = architecture_of(other, "3d_fullres")
    foreign = export_encoder(build_network(other, "3d_fullres", 1, 12), tmp_path / "foreign.pt",
                             {"architecture_hash": architecture_hash(arch), "plans_identifier": other_id,
                              "orientation": "sag"})
    trainer = _trainer(root, encoder_path=str(foreign))
    with pytest.raises(EncoderMismatchError, match="pretrained with architecture .*--plans-from"):
        trainer.initialize()
    # plans never pretrained: the default encoder is absent and the message says what to run
    with pytest.raises(SegmentationError, match=f"run `orthodiff pretrain -d {DATASET} -p otherPlans` first"):
        train_segmentation(DATASET_ID, plans="otherPlans", device="cpu")
    parser = argparse.ArgumentParser()
    add_train_seg_parser(parser.add_subparsers())
    args = parser.parse_args(["seg", "-d", str(DATASET_ID), "-p", PLANS, "--init", "scratch", "--encoder", str(foreign)])
    with pytest.raises(OrthodiffError, match="--encoder is only used with --init diffusion"):
        args.func(args)
    args = parser.parse_args(["seg", "-d", str(DATASET_ID), "-p", PLANS, "--init", "scratch", "--fold", "one"])
    with pytest.raises(OrthodiffError, match="fold 'one'"):
        args.func(args)


def test_split_keeps_labeled_cases_and_label_fraction_is_deterministic(planned):
    root, targets = planned["root"], planned["targets"]
    splits = load_json(root / "pre" / DATASET / "splits_final.json")
    labeled = _labeled(targets)
    assert len(labeled) == 5 and len(targets) == 7
    fold_train = [c for c in splits[0]["train"] if c in labeled]
    full_tr, full_val = _trainer(root, "nnUNetTrainerOrthoDiffSegScratch").do_split()
    assert sorted(full_tr) == sorted(fold_train) and set(full_val) <= labeled
    assert set(full_val) == {c for c in splits[0]["val"] if c in labeled}
    half = [_trainer(root, cls, label_fraction=0.5, label_fraction_seed=7).do_split()
            for cls in ("nnUNetTrainerOrthoDiffSeg", "nnUNetTrainerOrthoDiffSegScratch")]
    assert half[0] == half[1]  # the twin trains on the same cases
    tr, val = half[0]
    assert len(tr) == round(0.5 * len(fold_train)) and set(tr) <= set(fold_train) and val == full_val
    tr_all, val_all = _trainer(root, fold="all").do_split()
    assert sorted(tr_all) == sorted(labeled) and val_all == tr_all  # nnU-Net's fold 'all', labeled only


def test_fold_without_a_labeled_validation_case_is_refused_by_name(planned, tmp_path):
    from orthodiff_nnunet.trainers.segmentation import SegmentationSetupError

    labeled = sorted(_labeled(planned["targets"]))
    unlabeled = sorted(set(planned["targets"]) - set(labeled))
    assert _folds(planned, labeled_val=True) == [0, 1, 2, 3, 4]  # the fixture's own folds: each has one
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": labeled, "val": unlabeled}]))
    trainer = _trainer(planned["root"])
    trainer.preprocessed_dataset_folder_base = str(tmp_path)  # a user's own split file (the data stay)
    with pytest.raises(SegmentationSetupError, match=rf"fold 0 of {DATASET} has no labeled validation case .*"
                                                     rf"{unlabeled[0]}.*another fold, or fold 'all'"):
        trainer.do_split()


def test_frozen_encoder_epochs_then_whole_network_trains(planned):
    trainer = _trainer(planned["root"], freeze_encoder_epochs=1, warmup_epochs=1)
    trainer.initialize()
    dl_train, _ = trainer.get_dataloaders()

    def snapshot(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    def changed(before, module):
        return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]

    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.initial_lr / 2)  # warm-up epoch
    enc, seg_layers = snapshot(trainer.network.encoder), snapshot(trainer.network.decoder.seg_layers)
    trainer.train_step(next(dl_train))
    assert not changed(enc, trainer.network.encoder)  # frozen
    assert changed(seg_layers, trainer.network.decoder.seg_layers)
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.initial_lr)
    trainer.train_step(next(dl_train))
    assert changed(enc, trainer.network.encoder)
    with pytest.raises(Exception, match="randomly initialised encoder"):
        _trainer(planned["root"], "nnUNetTrainerOrthoDiffSegScratch", freeze_encoder_epochs=1).initialize()


def test_adamw_is_nnunets_adam_variant_with_the_same_schedule_and_trains(planned):
    from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import nnUNetTrainerAdam

    trainer = _trainer(planned["root"], "nnUNetTrainerOrthoDiffSegScratch", optimizer_name="adamw", warmup_epochs=1,
                       initial_lr=3e-3)
    trainer.initialize()
    opt = trainer.optimizer
    assert type(opt) is torch.optim.AdamW and opt.defaults["amsgrad"] is True
    reference, _ = nnUNetTrainerAdam.configure_optimizers(trainer)  # what nnU-Net's own variant builds
    assert {k: v for k, v in opt.defaults.items() if k != "lr"} == \
        {k: v for k, v in reference.defaults.items() if k != "lr"}
    assert opt.defaults["weight_decay"] == trainer.weight_decay
    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 / 2)  # the warm-up applies to AdamW as well
    dl_train, _ = trainer.get_dataloaders()
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.train_step(next(dl_train))
    assert any(not torch.equal(v, before[k]) for k, v in trainer.network.state_dict().items())
    assert len(opt.state) > 0 and all("max_exp_avg_sq" in st for st in opt.state.values())
    assert trainer.run_record()["schedule"]["optimizer"] == "adamw"
    with pytest.raises(Exception, match="optimizer 'adam'"):
        _trainer(planned["root"], optimizer_name="adam").initialize()
    from orthodiff_nnunet.segmentation import DEFAULT_LEARNING_RATES
    from orthodiff_nnunet.trainers.segmentation import OPTIMIZERS

    assert tuple(DEFAULT_LEARNING_RATES) == OPTIMIZERS  # the API's (and CLI's) choices are the trainer's


def test_channels_last_reaches_the_network_and_steps_as_the_default_format(planned):
    """``channels_last``: the network's weights and the images it receives are channels-last-3d, the optimizer
    updates those same weights, and a train step gives the loss and weights of the default layout."""
    layout = torch.channels_last_3d
    trainers = {}
    for cl in (False, True):
        torch.manual_seed(0)
        # SGD: an update proportional to the gradient (Adam would turn the ~1e-9 rounding-level gradient of a
        # bias before instance norm into a full step of either sign)
        trainers[cl] = _trainer(planned["root"], channels_last=cl)
        trainers[cl].initialize()
    plain, fast = trainers[False], trainers[True]
    convs = [m.weight for m in fast.network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(w.is_contiguous(memory_format=layout) for w in convs)
    assert sum(not w.is_contiguous() for w in convs) >= len(convs) // 2  # (one input channel, 1x1x1: both at once)
    assert all(w.is_contiguous() for m in plain.network.modules() if isinstance(m, torch.nn.Conv3d) for w in [m.weight])
    optimised = {id(q) for g in fast.optimizer.param_groups for q in g["params"]}
    assert optimised == {id(q) for q in fast.network.parameters()}  # converted in place, not copied
    for a, b in zip(plain.network.state_dict().values(), fast.network.state_dict().values()):
        assert torch.equal(a, b)  # same weights (the encoder loaded into both), another layout
    start = {k: q.clone() for k, q in fast.network.state_dict().items()}
    seen = {}
    fast.network.register_forward_pre_hook(lambda m, inputs: seen.setdefault("x", inputs[0]))
    dl, _ = plain.get_dataloaders()
    batch = next(dl)
    for t in (plain, fast):
        t.current_epoch = 0
        t.on_train_epoch_start()
    loss_plain = plain.train_step(batch)["loss"]
    loss_fast = fast.train_step(batch)["loss"]
    assert seen["x"].is_contiguous(memory_format=layout)  # (one channel: the same bytes as the default layout)
    assert torch.equal(seen["x"], torch.as_tensor(batch["data"]))  # same values, another layout
    assert float(loss_fast) == pytest.approx(float(loss_plain), rel=1e-5)
    assert any(not torch.equal(q, start[k]) for k, q in fast.network.state_dict().items())  # it did step
    for (name, a), b in zip(plain.network.named_parameters(), fast.network.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert fast.run_record()["schedule"]["channels_last"] is True
    assert plain.run_record()["schedule"]["channels_last"] is False


def test_cross_site_augmentation_puts_more_and_stronger_noise_into_the_batches(planned):
    """``augmentation="cross-site"``: the pipeline nnU-Net's training loader applies (taken from the loader) adds
    noise to about half the patches, up to sd 0.6, where nnU-Net's own adds it to 10 %, up to sd 0.1; the run
    record says which profile trained; an unknown profile is refused before training."""
    from orthodiff_nnunet.trainers.segmentation import SegmentationSetupError

    noisy, strongest = {}, {}
    for profile in ("nnunet", "cross-site"):
        trainer = _trainer(planned["root"], augmentation=profile)
        trainer.initialize()
        dl, _ = trainer.get_dataloaders()
        pipeline = dl.data_loader.transforms  # what every training batch goes through (in-process augmentation)
        patch = tuple(trainer.configuration_manager.patch_size)
        torch.manual_seed(0)
        # a blank patch: blur, brightness, contrast, gamma, low resolution, rotation and mirroring keep it blank,
        # so what is left in it is the added noise
        sds = np.array([float(pipeline(image=torch.zeros(1, *patch),
                                       segmentation=torch.zeros(1, *patch, dtype=torch.int16))["image"].std())
                        for _ in range(300)])
        noisy[profile], strongest[profile] = float((sds > 1e-4).mean()), float(sds.max())
        assert trainer.run_record()["schedule"]["augmentation"] == profile
    assert 0.03 < noisy["nnunet"] < 0.17 and strongest["nnunet"] <= 0.12
    assert 0.38 < noisy["cross-site"] < 0.62 and 0.4 < strongest["cross-site"] < 0.8
    with pytest.raises(SegmentationSetupError, match="augmentation 'heavy': use one of nnunet, cross-site"):
        _trainer(planned["root"], augmentation="heavy").initialize()


def test_run_seed_pairs_the_two_inits_on_the_same_random_weights_and_batches(planned):
    """One ``run_seed``: the scratch twin and the diffusion init start from the same decoder and heads and draw the
    same first batches (in-process augmentation); only the encoder differs."""
    from orthodiff_nnunet.utils import seed_everything

    runs = {}
    for cls_name in ("nnUNetTrainerOrthoDiffSegScratch", "nnUNetTrainerOrthoDiffSeg"):
        seed_everything(7)
        trainer = _trainer(planned["root"], cls_name)
        trainer.initialize()
        dl, _ = trainer.get_dataloaders()
        runs[cls_name] = (trainer.network, [next(dl) for _ in range(2)])
    (scratch, b_scratch), (diffusion, b_diffusion) = runs.values()
    for name, w in scratch.decoder.state_dict().items():
        if not name.startswith("encoder."):  # the decoder holds a reference to the encoder
            assert torch.equal(w, diffusion.decoder.state_dict()[name]), name
    assert not all(torch.equal(w, diffusion.encoder.state_dict()[k]) for k, w in scratch.encoder.state_dict().items())
    for a, b in zip(b_scratch, b_diffusion):
        assert list(a["keys"]) == list(b["keys"]) and torch.equal(torch.as_tensor(a["data"]), torch.as_tensor(b["data"]))
    seed_everything(8)
    other = _trainer(planned["root"], "nnUNetTrainerOrthoDiffSegScratch")
    other.initialize()
    assert not torch.equal(other.network.decoder.seg_layers[-1].weight, scratch.decoder.seg_layers[-1].weight)


def test_run_seed_repeats_a_training_run_bit_for_bit(planned):
    from orthodiff_nnunet.segmentation import train_segmentation

    common = dict(orientation="sag", fold=_folds(planned, labeled_val=True)[-1], plans=PLANS, label_fraction=0.75, init="scratch", epochs=1,
                  iterations_per_epoch=2, val_iterations_per_epoch=1, device="cpu", validate=False)
    weights = []
    for seed in (7, 7, 8):
        result = train_segmentation(DATASET_ID, run_seed=seed, **common)
        weights.append(torch.load(result.checkpoint, map_location="cpu", weights_only=False)["network_weights"])
        assert result.run_record["schedule"]["run_seed"] == seed
        done = result.model_folder.with_name(f"{result.model_folder.name}_seed{seed}_{len(weights)}")
        result.model_folder.rename(done)  # the next run starts fresh in the same place
    assert all(torch.equal(w, weights[1][k]) for k, w in weights[0].items())
    assert not all(torch.equal(w, weights[2][k]) for k, w in weights[0].items())


# -- the API end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(planned):
    from orthodiff_nnunet.segmentation import train_segmentation

    torch.manual_seed(0)
    return train_segmentation(DATASET_ID, orientation="sag", fold=0, plans=PLANS, label_fraction=0.5,
                              epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1, device="cpu",
                              validation_mirroring=False)


def test_short_cpu_training_leaves_checkpoint_validation_summary_and_run_record(planned, trained):
    from orthodiff_nnunet.segmentation import SegmentationError, model_folder, train_segmentation

    root = planned["root"]
    assert trained.results_root == root / "res" / "label_fraction_0.5"  # its own complete nnU-Net tree
    assert trained.model_folder == model_folder(DATASET_ID, "diffusion", PLANS, label_fraction=0.5)
    assert trained.model_folder.name == f"nnUNetTrainerOrthoDiffSeg__{PLANS}__3d_fullres"
    ckpt = torch.load(trained.checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["trainer_name"] == "nnUNetTrainerOrthoDiffSeg"
    for f in ("plans.json", "dataset.json"):
        assert (trained.model_folder / f).is_file()

    summary = load_json(trained.validation_summary)
    assert set(summary["mean"]) == {str(i) for i in range(1, 12)}
    assert len(summary["metric_per_case"]) == len(trained.run_record["validation_cases"]) >= 1
    assert list(trained.dice)[:3] == ["femur", "tibia", "patella"] and len(trained.dice) == 11
    assert all(0.0 <= d <= 1.0 for d in trained.dice.values() if not np.isnan(d))

    record = trained.run_record
    labeled = _labeled(planned["targets"])
    assert record["init"] == "diffusion" and record["encoder"] == str(planned["encoder"].resolve())
    assert record["encoder_provenance"]["iterations"] == 4 and record["encoder_tensors_loaded"] > 0
    assert record["label_fraction"] == 0.5 and record["label_fraction_seed"] == 12345 and record["fold"] == 0
    assert set(record["training_cases"]) <= labeled and set(record["validation_cases"]) <= labeled
    assert len(record["training_cases"]) == round(0.5 * record["labeled_train_cases_in_fold"])
    assert record["excluded_unlabeled_train"] + record["excluded_unlabeled_val"] == 2
    assert record["schedule"]["warmup_epochs"] == 1 and record["schedule"]["num_iterations_per_epoch"] == 2
    lrs = ckpt["logging"]["lrs"]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)  # linear warm-up, then poly

    common = dict(orientation="sag", fold=0, plans=PLANS, label_fraction=0.5, epochs=2, iterations_per_epoch=2,
                  device="cpu", validate=False)
    with pytest.raises(SegmentationError, match="already holds a training run: pass --continue"):
        train_segmentation(DATASET_ID, **common)
    other_copy = root / "encoder_copy.pt"
    other_copy.write_bytes(planned["encoder"].read_bytes())
    with pytest.raises(SegmentationError, match="--continue with other settings"):
        train_segmentation(DATASET_ID, **common, continue_training=True, encoder=other_copy)


def test_predict_keeps_source_geometry_and_equals_nnunetv2_predict(planned, trained, tmp_path):
    from orthodiff_nnunet.segmentation import SegmentationError, predict_segmentation

    root = planned["root"]
    case = trained.run_record["validation_cases"][0]
    source = root / "raw" / DATASET / "imagesTr" / f"{case}_0000.nii.gz"
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / source.name).symlink_to(source)
    ours = predict_segmentation(inp, tmp_path / "ours", trained.output_folder, device="cpu", mirroring=False,
                                num_processes=0, show_progress=False)
    assert [m.name for m in ours.masks] == [f"{case}.nii.gz"]
    image, mask = sitk.ReadImage(str(source)), sitk.ReadImage(str(ours.masks[0]))
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
    assert not np.allclose(image.GetDirection(), np.eye(3).ravel())  # an oblique series: a real check
    values = np.unique(sitk.GetArrayFromImage(mask))
    assert set(values.tolist()) <= set(range(12))

    # nnU-Net's own command line finds our trainer through nnUNet_extTrainer and predicts the same mask
    env = dict(os.environ, nnUNet_results=str(trained.results_root), nnUNet_extTrainer=str(REPO / "trainers"),
               OMP_NUM_THREADS="2")
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(inp), "-o", str(tmp_path / "theirs"),
           "-d", str(DATASET_ID), "-tr", "nnUNetTrainerOrthoDiffSeg", "-p", PLANS, "-c", "3d_fullres", "-f", "0",
           "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    theirs = sitk.ReadImage(str(tmp_path / "theirs" / f"{case}.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(theirs), sitk.GetArrayFromImage(mask))

    # an image outside the converter's layout is refused with what to do
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    sitk.WriteImage(sitk.DICOMOrient(image, "RAS"), str(flipped / source.name))
    with pytest.raises(SegmentationError, match="orthodiff convert"):
        predict_segmentation(flipped, tmp_path / "x", trained.model_folder, device="cpu", num_processes=0)
