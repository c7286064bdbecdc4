"""Why does (or doesn't) pretraining help? Linear probes of frozen per-voxel encoder features, and how much
fine-tuning rewrites them.

Runs on a ``bench/label_efficiency.py`` work folder (images rendered from real OAI label maps, synthetic
intensities), after its pretrainings and (for the second part) its arms:

1. **Linear probe.** Each encoder source -- nnU-Net's random initialisation (what scratch starts from), the
   diffusion encoder at its reference timestep (and at other timesteps, ``--timesteps``), the MAE encoder --
   is run frozen, exactly as the segmentation network runs it at initialisation (the encoder contract's stage
   affine included). Every stage's output is upsampled to the image grid and concatenated: one feature
   vector per voxel. A multinomial logistic regression (scikit-learn, standardised features, class-balanced
   voxel sample) is fitted on the SiteA scans of the study's first 10 % subset (the few-label regime) and
   predicts every voxel of the validation knees' scans (never labeled for training, never test knees). The
   raw intensity alone is the floor. If pretrained features are no better than random ones under a linear
   probe, the encoder has not learnt what the structures look like, whatever the fine-tuning does.
2. **Feature similarity before and after fine-tuning** (linear CKA, Kornblith et al. 2019, per encoder stage,
   on the validation scans' voxels): for every finished diffusion/MAE arm, its encoder at the start (the
   pretrained one) against its encoder at the end. Near 1: fine-tuning kept the pretrained features; near 0:
   it replaced them.

Usage::

    python -m bench.feature_probe --work /tmp/le3            # both parts, tables to bench/results/feature_probe.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, command_line, machine, markdown_table, now

SEG_CONFIGURATION = "3d_fullres"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a bench/label_efficiency.py work folder")
    ap.add_argument("--timesteps", type=int, nargs="*", default=[100, 300],
                    help="diffusion timesteps probed besides the reference one (default 100 300)")
    ap.add_argument("--voxels-per-class", type=int, default=1500,
                    help="probe training voxels per class and scan (default 1500)")
    ap.add_argument("--fold", type=int, default=1, help="splits_final.json fold whose train cases fit the probe "
                                                       "(default 1: the first 10 %% subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "feature_probe.md")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data and features
def load_scans(folder: Path, identifiers: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (C, Z, Y, X) float32, labels (Z, Y, X) int) of preprocessed cases, nnU-Net's dataset class."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    ds = infer_dataset_class(str(folder))(str(folder), identifiers)
    out = []
    for i in identifiers:
        data, seg, *_ = ds.load_case(i)
        out.append((np.asarray(data[:], dtype=np.float32), np.asarray(seg[:])[0].astype(np.int16)))
    return out


def encoder_skips(encoder, image: np.ndarray, multiple: int) -> list:
    """Every stage's output of ``encoder`` on ``image`` zero-padded to a multiple of the total stride
    (tensors (1, C, *), each at its own resolution)."""
    import torch

    pad = [(0, 0)] + [(0, (-s) % multiple) for s in image.shape[1:]]
    with torch.no_grad():
        return encoder(torch.from_numpy(np.pad(image, pad))[None])


def stage_features(encoder, image: np.ndarray, multiple: int) -> np.ndarray:
    """Every stage's output upsampled (trilinear) to the image grid and concatenated: (features, Z, Y, X)."""
    import torch
    import torch.nn.functional as F

    shape = image.shape[1:]
    skips = encoder_skips(encoder, image, multiple)
    size = tuple(s + (-s) % multiple for s in shape)
    with torch.no_grad():
        up = [F.interpolate(s, size=size, mode="trilinear", align_corners=False) for s in skips]
    return torch.cat(up, 1)[0, :, :shape[0], :shape[1], :shape[2]].numpy()


def sample_voxels(labels: np.ndarray, classes: list[int], per_class: int, rng) -> np.ndarray:
    """Flat indices: up to ``per_class`` voxels of every class present (class-balanced sample)."""
    flat = labels.reshape(-1)
    picks = []
    for c in classes:
        where = np.flatnonzero(flat == c)
        if where.size:
            picks.append(rng.choice(where, size=min(per_class, where.size), replace=False))
    return np.concatenate(picks)


def dice(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    a, b = pred == c, ref == c
    denom = a.sum() + b.sum()
    return float("nan") if denom == 0 else float(2 * (a & b).sum() / denom)


def probe(feature_fn, train, val, classes, per_class, seed) -> tuple[dict[int, float], int]:
    """Fit the logistic-regression probe on ``train`` scans' sampled voxels; (mean Dice per class on ``val``,
    feature dimensions)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for image, labels in train:
        f = feature_fn(image)
        idx = sample_voxels(labels, classes, per_class, rng)
        xs.append(f.reshape(f.shape[0], -1)[:, idx].T)
        ys.append(labels.reshape(-1)[idx])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    model.fit(np.concatenate(xs), np.concatenate(ys))
    scores: dict[int, list[float]] = {c: [] for c in classes if c}
    for image, labels in val:
        f = feature_fn(image)
        pred = model.predict(f.reshape(f.shape[0], -1).T).reshape(labels.shape)
        for c in scores:
            scores[c].append(dice(pred, labels, c))
    dice_of = {c: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for c, v in scores.items()}
    return dice_of, int(xs[0].shape[1])


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA of two (samples, features) matrices (Kornblith et al. 2019)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    hsic = np.linalg.norm(a.T @ b) ** 2
    return float(hsic / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


# ----------------------------------------------------------------------------------------------
def network_and_plans(work: Path, state: dict):
    from orthodiff_nnunet.networks.build import build_network
    from orthodiff_nnunet.utils import load_json

    folder = work / "preprocessed" / state["dataset"]
    plans = load_json(folder / f"{state['plans']}.json")
    labels = load_json(folder / "dataset.json")["labels"]
    data = folder / plans["configurations"][SEG_CONFIGURATION]["data_identifier"]
    strides = plans["configurations"][SEG_CONFIGURATION]["architecture"]["arch_kwargs"]["strides"]

    def fresh(seed: int):
        import torch

        torch.manual_seed(seed)
        return build_network(plans, SEG_CONFIGURATION, 1, len(labels)).eval()

    total = np.prod(np.array(strides), axis=0).max()
    return fresh, plans, data, int(total)


def encoder_sources(work: Path, state: dict, fresh, timesteps: list[int], seed: int):
    """(name, encoder) of every probed source, each as the segmentation network runs it at initialisation."""
    from orthodiff_nnunet.networks.encoder_io import load_encoder, read_encoder_checkpoint

    yield "random init (scratch's start)", fresh(seed).encoder
    for objective, path in sorted(state.get("encoders", {}).items()):
        if not Path(path).is_file():
            continue
        net = fresh(seed)
        load_encoder(net, Path(path))
        ref = int(read_encoder_checkpoint(Path(path)).get("provenance", {}).get("reference_timestep", 0))
        yield f"{objective} encoder (t = {ref}, the contract)", net.encoder
        if objective == "diffusion":
            for t in timesteps:
                net = fresh(seed)
                load_encoder(net, Path(path), timestep=t)
                yield f"diffusion encoder at t = {t}", net.encoder


def run(args) -> dict:
    work = args.work.resolve()
    state = json.loads((work / "state.json").read_text())
    fresh, plans, data, multiple = network_and_plans(work, state)
    splits = json.loads((work / "preprocessed" / state["dataset"] / "splits_final.json").read_text())
    fold = splits[args.fold]
    t0 = time.perf_counter()
    train, val = load_scans(data, fold["train"]), load_scans(data, fold["val"])
    labels = json.loads((work / "preprocessed" / state["dataset"] / "dataset.json").read_text())["labels"]
    names = {v: k for k, v in labels.items()}
    classes = sorted({int(c) for _, lab in train for c in np.unique(lab)})
    structures = [c for c in classes if c]
    rows = []
    r, dims = probe(lambda im: im, train, val, classes, args.voxels_per_class, args.seed)
    rows.append(("image intensity only (the floor)", dims, r))
    print(f"[probe] intensity: {r}", flush=True)
    for name, enc in encoder_sources(work, state, fresh, args.timesteps, args.seed):
        r, dims = probe(lambda im, e=enc: stage_features(e, im, multiple), train, val, classes, args.voxels_per_class,
                  args.seed)
        rows.append((name, dims, r))
        print(f"[probe] {name}: {r}", flush=True)
    cka = similarity_after_finetuning(work, state, fresh, val, multiple, args.seed)
    return {"rows": rows, "structures": structures, "names": names, "cka": cka, "train_cases": fold["train"],
            "val_cases": fold["val"], "seconds": time.perf_counter() - t0, "machine": machine()}


def similarity_after_finetuning(work: Path, state: dict, fresh, val, multiple: int, seed: int) -> list[dict]:
    """Per finished pretrained arm: linear CKA per encoder stage, start (the encoder file) vs end (the arm's
    final checkpoint), on a voxel sample of the validation scans."""
    import torch

    from orthodiff_nnunet.networks.encoder_io import load_encoder

    out = []
    rng = np.random.default_rng(seed)
    for res in sorted((work / "arms").glob("*/result.json")):
        r = json.loads(res.read_text())
        if r["init"] == "scratch" or r["init"] not in state.get("encoders", {}):
            continue
        start = fresh(seed)
        load_encoder(start, Path(state["encoders"][r["init"]]))
        end = fresh(seed)
        ckpt = torch.load(Path(r["model"]) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        end.load_state_dict(ckpt["network_weights"], strict=False)
        n_stages = len(start.encoder.stages)
        a_all, b_all = [[] for _ in range(n_stages)], [[] for _ in range(n_stages)]
        for image, _ in val:
            sa, sb = encoder_skips(start.encoder, image, multiple), encoder_skips(end.encoder, image, multiple)
            for i in range(n_stages):
                fa, fb = (x[0].reshape(x.shape[1], -1).numpy() for x in (sa[i], sb[i]))
                idx = rng.choice(fa.shape[1], size=min(4000, fa.shape[1]), replace=False)
                a_all[i].append(fa[:, idx].T)
                b_all[i].append(fb[:, idx].T)
        per_stage = [linear_cka(np.concatenate(a_all[i]), np.concatenate(b_all[i])) for i in range(n_stages)]
        out.append({"arm": res.parent.name, "init": r["init"], "fraction": r["fraction"], "seed": r["seed"],
                    "cka_per_stage": per_stage})
        print(f"[probe] CKA start vs end, {res.parent.name}: {[round(x, 3) for x in per_stage]}", flush=True)
    return out


def record(result: dict, args) -> None:
    names, structures = result["names"], result["structures"]
    header = ["features", "dims"] + [names[c].replace("_", " ") for c in structures] + ["mean"]
    rows = []
    for name, dims, r in result["rows"]:
        vals = [r[c] for c in structures]
        rows.append([name, str(dims)] + [f"{v:.3f}" for v in vals] + [f"{np.nanmean(vals):.3f}"])
    text = [f"## Linear probe of frozen per-voxel encoder features ({now()})", "",
            "Images rendered from real OAI label maps (real anatomy, synthetic intensities). Probe fitted on the "
            f"{len(result['train_cases'])} SiteA scans of the study's first 10 % subset, Dice on the "
            f"{len(result['val_cases'])} validation-knee scans (mean per structure).", "",
            markdown_table(header, rows), ""]
    if result["cka"]:
        n = len(result["cka"][0]["cka_per_stage"])
        header = ["arm"] + [f"stage {i}" for i in range(n)]
        text += ["Linear CKA between each arm's encoder at the start (the pretrained encoder) and at the end of "
                 "fine-tuning, per stage, on the validation scans (1 = unchanged features):", "",
                 markdown_table(header, [[c["arm"]] + [f"{x:.3f}" for x in c["cka_per_stage"]]
                                         for c in result["cka"]]), ""]
    text += [f"Command: `{command_line()}`; {result['seconds']:.0f} s; {result['machine']}.", ""]
    out = "\n".join(text)
    print(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Feature probe\n\n" + out)


def main(argv=None) -> int:
    args = parse_args(argv)
    record(run(args), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
