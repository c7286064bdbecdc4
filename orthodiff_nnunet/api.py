"""Typed API: one function per ``orthodiff`` command. The CLI only parses arguments and calls these."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from orthodiff_nnunet.dataset_conversion.site_converter import ConversionResult, convert_site

log = logging.getLogger(__name__)

__all__ = ["ConversionResult", "convert", "demo"]


def convert(
    manifest: Path,
    dataset_id: int,
    name: str,
    *,
    site_dir: Path | None = None,
    raw: Path | None = None,
    external: bool = False,
    abnormality_labels: Sequence[str] | None = None,
    label_scheme: Path | Mapping[str, int] | None = None,
    dry_run: bool = False,
    key_file: Path | None = None,
    pseudonym_key: Path | None = None,
    num_folds: int = 5,
    max_obliquity_deg: float = 35.0,
    num_processes: int = 2,
    spacing_source: str = "image header",
    allow_outside_site: bool = False,
    lock_timeout_s: float | None = None,
) -> ConversionResult:
    """Convert a site's series into nnU-Net raw datasets, one per orientation.

    Args:
        manifest: CSV with one row per series (columns in the README / docs/CONTRACTS.md).
        dataset_id: base id: sagittal -> ``dataset_id``, coronal -> +1, axial -> +2.
        name: dataset name (letters, digits); folders are ``Dataset{id:03d}_{name}{Sag|Cor|Ax}``.
        site_dir: folder the manifest's relative paths start from (default: the manifest's folder).
        raw: the nnUNet_raw folder (default: environment variable ``nnUNet_raw``).
        external: an external validation site (imagesTs/labelsTs, no splits).
        abnormality_labels: label columns (default: the 8 knee abnormalities present in the manifest).
        label_scheme: segmentation labels ``{name: value}`` or a JSON path (default: 11 knee structures).
        dry_run: validate everything, write nothing.
        key_file: also write the pseudonym -> source id CSV here (refused inside ``raw``).
        pseudonym_key: secret key file (default ``<raw>/.orthodiff/pseudonym.key``, created once).
        num_folds: patient-grouped folds of ``splits_final.json``.
        max_obliquity_deg: largest accepted slice-normal obliquity; beyond it the plane must be given.
        num_processes: worker processes reading series.
        spacing_source: recorded in ``dataset.json`` (``"user-supplied"`` when the header has none).
        allow_outside_site: accept ``image``/``label`` paths leading out of the site folder (``../``,
            absolute paths); refused by default so that no other site's images slip in.
        lock_timeout_s: one conversion at a time writes into a ``raw`` folder; another one waits this
            many seconds for it (``None``: as long as it takes, ``0``: refused at once).

    Returns:
        What was written (or, for a dry run, what would be).

    Raises:
        ConversionError: listing every bad series and how to fix it; nothing is written then.
    """
    return convert_site(
        manifest, dataset_id, name, site_dir=site_dir, raw=raw, external=external,
        abnormality_labels=abnormality_labels, label_scheme=label_scheme, dry_run=dry_run, key_file=key_file,
        pseudonym_key=pseudonym_key, num_folds=num_folds, max_obliquity_deg=max_obliquity_deg,
        num_processes=num_processes, spacing_source=spacing_source, allow_outside_site=allow_outside_site,
        lock_timeout_s=lock_timeout_s,
    )


def demo(output: Path = Path("orthodiff_demo"), cases_per_site: int = 6, seed: int = 0,
         pretrain_iterations: int = 30, seg_iterations: int = 20, cls_epochs: int = 3,
         device: str = "auto") -> str:
    """End-to-end demo on two phantom sites; returns a text summary of what was produced.

    From nothing: a 3 T training site and a 1.5 T external site are generated (procedural knee
    phantom with the 8 abnormalities), converted into per-orientation nnU-Net raw datasets, the
    training site is planned and preprocessed per orientation, and each orientation's diffusion
    model is pretrained briefly. Small settings (a tiny copy of the planned network, a few
    iterations) but the real code path. Synthetic data: never evidence of clinical accuracy.
    """
    import os
    import time

    from orthodiff_nnunet import paths
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T
    from orthodiff_nnunet.networks.build import write_shrunk_plans
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.pretraining import pretrain

    import json
    import shutil

    from orthodiff_nnunet.classification import default_test_folds

    from orthodiff_nnunet.errors import OrthodiffError

    output = Path(output).resolve()
    marker = output / ".orthodiff_demo"
    if output.exists() and any(output.iterdir()):
        if not marker.exists():
            raise OrthodiffError(f"{output} exists and is not an orthodiff demo folder: choose another -o")
        shutil.rmtree(output)  # a previous demo run: start from nothing again
    output.mkdir(parents=True, exist_ok=True)
    marker.write_text("created by orthodiff demo; removed and rebuilt by the next demo run\n")
    raw, pre, res = output / "nnUNet_raw", output / "nnUNet_preprocessed", output / "nnUNet_results"
    paths.set_nnunet_paths(raw, pre, res)
    lines = [f"OrthoDiff-nnU-Net demo in {output} (synthetic phantom data)"]
    t0 = time.perf_counter()

    def step(title: str) -> None:
        lines.append(f"\n== {title} ({time.perf_counter() - t0:.0f} s)")
        log.info("demo: %s", title)

    for site, base_id, external, site_seed in ((SITE_3T, 501, False, seed), (SITE_15T, 511, True, seed + 1000)):
        step(f"generate and convert {site.name} ({site.field_strength_t:g} T, {'external' if external else 'training'})")
        manifest = write_site(output / "sites" / site.name, site, n_cases=cases_per_site, seed=site_seed,
                              patients_with_two_exams=1)
        # 2 folds: with a handful of exams, fold 0's validation still holds several exams
        result = convert(manifest, base_id, f"Knee{site.name}", raw=raw, external=external, num_processes=1,
                         num_folds=2)
        lines.append(result.summary())

    step("plan_and_preprocess the training site (sag, cor, ax)")
    planning = plan_and_preprocess([501, 502, 503], num_processes=2, show_progress=False)
    lines.append(planning.summary())

    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # augmentation in-process: small data, 2 cores
    os.environ.setdefault("nnUNet_compile", "0")
    plans_id = "orthodiffDemoPlans"
    for dataset in planning.datasets:
        folder = pre / dataset.dataset_name
        write_shrunk_plans(folder, dataset.plans_identifier, plans_id, max_features=16, max_stages=4)
        step(f"pretrain {dataset.dataset_name} ({pretrain_iterations} iterations, tiny network)")
        # the classifier (fold 0) tests on exams the encoders must not have seen: leave them out here
        test_folds = default_test_folds(len(json.loads((folder / "splits_final.json").read_text())), 0)
        result = pretrain(dataset.dataset_name, plans=plans_id, iterations=pretrain_iterations,
                          checkpoint_every=max(1, pretrain_iterations // 3), learning_rate=1e-3, device=device,
                          sample_steps=5, exclude_folds=test_folds)
        lines.append(result.summary())
    from orthodiff_nnunet.segmentation import train_segmentation

    seg_models = {}
    for dataset in planning.datasets:
        step(f"train segmentation {dataset.dataset_name} (encoder from the pretraining, {seg_iterations} iterations)")
        trained = train_segmentation(dataset.dataset_name, fold="all", init="diffusion", plans=plans_id,
                                     epochs=2, iterations_per_epoch=max(1, seg_iterations // 2),
                                     val_iterations_per_epoch=2, device=device, validate=False)
        seg_models[dataset.orientation] = trained.model_folder
        lines.append(trained.summary())

    from orthodiff_nnunet.classification import train_classification

    step(f"train the three-view abnormality classifier (fine-tuned diffusion encoders, {cls_epochs} epochs)")
    cls = train_classification(501, plans=plans_id, fold=0, mode="finetune", epochs=cls_epochs,
                               iterations_per_epoch=5, batch_size=2, n_boot=100, device=device)
    lines.append(cls.summary())

    from orthodiff_nnunet.evaluation.external import evaluate

    step("evaluate on the external 1.5 T site (SiteB)")
    # Without mirroring (8 flips per patch) to keep the demo short on a CPU; the report records the choice.
    # `orthodiff evaluate` mirrors by default, like `predict seg` and nnU-Net.
    evaluation = evaluate([511], output / "report", seg_models=seg_models, cls_model=cls.output_folder, n_boot=200,
                          device=device, num_processes=1, mirroring=False)
    lines.append(evaluation.summary())
    step("done")
    lines.append(f"\nOpen the report: {evaluation.report_html}")
    lines.append("The demo's networks are tiny and trained for seconds: it shows the pipeline, not accuracy "
                 "(expect Dice near 0 and AUROC near 0.5); see BENCHMARKS.md for measured figures.")
    return "\n".join(lines)
