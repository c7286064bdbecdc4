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

    Returns:
        What was written (or, for a dry run, what would be).

    Raises:
        ConversionError: listing every bad series and how to fix it; nothing is written then.
    """
    return convert_site(
        manifest, dataset_id, name, site_dir=site_dir, raw=raw, external=external,
        abnormality_labels=abnormality_labels, label_scheme=label_scheme, dry_run=dry_run, key_file=key_file,
        pseudonym_key=pseudonym_key, num_folds=num_folds, max_obliquity_deg=max_obliquity_deg,
        num_processes=num_processes, spacing_source=spacing_source,
    )


def demo(output: Path = Path("orthodiff_demo"), cases_per_site: int = 6, seed: int = 0) -> str:
    """End-to-end demo on two phantom sites; returns a text summary of what was produced.

    Steps available so far: generate a 3 T training site and a 1.5 T external site (procedural knee
    phantom with the 8 abnormalities), convert both into per-orientation nnU-Net raw datasets.
    """
    from orthodiff_nnunet.data.phantom import write_site
    from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T

    output = Path(output).resolve()
    raw = output / "nnUNet_raw"
    lines = [f"OrthoDiff-nnU-Net demo in {output}"]
    for site, base_id, external, site_seed in ((SITE_3T, 501, False, seed), (SITE_15T, 511, True, seed + 1000)):
        site_dir = output / "sites" / site.name
        log.info("generating phantom site %s (%g T, %d exams)", site.name, site.field_strength_t, cases_per_site)
        manifest = write_site(site_dir, site, n_cases=cases_per_site, seed=site_seed)
        result = convert(manifest, base_id, f"Knee{site.name}", raw=raw, external=external, num_processes=1)
        lines.append(f"[{site.name}, {site.field_strength_t:g} T, {'external' if external else 'training'}]")
        lines.append(result.summary())
    lines.append("next steps (plan_and_preprocess, pretrain, train, evaluate) are not implemented yet")
    return "\n".join(lines)
