"""``orthodiff convert`` and ``orthodiff scan``: the parsers and their mapping onto the data stage."""

from __future__ import annotations

import argparse
from pathlib import Path

from orthodiff_nnunet.cli import options as opt


def add_convert_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``convert`` to ``orthodiff``'s subcommands."""
    p = opt.add_command(sub, "convert", _run_convert,
                        help="convert a site's series (DICOM/NIfTI/NRRD/MHA) into per-orientation nnU-Net raw datasets")
    p.add_argument("manifest", type=Path, help="manifest CSV, one row per series")
    p.add_argument("-d", "--dataset-id", type=int, required=True,
                   help="base dataset id: sagittal gets ID, coronal ID+1, axial ID+2")
    p.add_argument("-n", "--name", required=True, help="dataset name, e.g. KneeSiteA (letters and digits)")
    p.add_argument("--site-dir", type=Path, default=None,
                   help="folder that relative paths in the manifest start from (default: the manifest's folder)")
    p.add_argument("--allow-outside-site", action="store_true",
                   help="accept image/label paths that lead out of the site folder ('../' or absolute paths); "
                        "refused by default")
    opt.add_raw(p)
    p.add_argument("--external", action="store_true",
                   help="an external validation site: write imagesTs/labelsTs instead of imagesTr/labelsTr")
    p.add_argument("--labels", default=None,
                   help="comma-separated abnormality label columns (default: the 8 knee labels found in the manifest)")
    p.add_argument("--label-scheme", type=Path, default=None,
                   help="JSON {name: value} of segmentation labels (default: the 11 knee structures)")
    p.add_argument("--dry-run", action="store_true", help="only validate the manifest and every series; write nothing")
    p.add_argument("--key-file", type=Path, default=None,
                   help="also write a CSV mapping pseudonyms to source ids here (must lie outside nnUNet_raw's datasets)")
    p.add_argument("--pseudonym-key", type=Path, default=None,
                   help="secret key that makes pseudonyms stable across runs (default: <raw>/.orthodiff/pseudonym.key, created once)")
    p.add_argument("--folds", type=int, default=5, help="number of patient-grouped cross-validation folds (default 5)")
    opt.add_max_obliquity(p, "largest accepted angle (degrees) between slice normal and nearest patient axis")
    opt.add_num_processes(p, 2, "parallel workers (default 2)")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="while another conversion writes into the same nnUNet_raw, wait at most this long "
                        "(default: wait until it has finished; 0: refuse at once)")
    return p


def _run_convert(args: argparse.Namespace) -> int:
    """Convert one site's data, described by a manifest CSV (one row per series), into nnU-Net raw datasets, one per
    orientation: Dataset<ID>_<Name>Sag, Dataset<ID+1>_<Name>Cor, Dataset<ID+2>_<Name>Ax. Output names are
    pseudonyms; no DICOM value is copied. See the README for the manifest columns.
    """
    from orthodiff_nnunet.api import convert

    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    result = opt.call(convert, args, abnormality_labels=labels, num_folds=args.folds,
                      max_obliquity_deg=args.max_obliquity, lock_timeout_s=args.lock_timeout)
    return opt.report(result)


def add_scan_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``scan`` to ``orthodiff``'s subcommands."""
    p = opt.add_command(sub, "scan", _run_scan,
                        help="scan a PACS export (DICOM headers only) and write a draft manifest for convert")
    p.add_argument("export", type=Path, nargs="?", default=None,
                   help="the PACS export folder (or its DICOMDIR); or none with --dicomweb URL")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="the draft manifest CSV to write (site-private; refused inside nnUNet_raw/preprocessed/results)")
    p.add_argument("--site", default="SITE", help="the site column, a short site name (default SITE)")
    p.add_argument("--site-dir", type=Path, default=None,
                   help="folder the image paths start from (default: the manifest's folder when the export lies "
                        "inside it, else the export folder; then convert needs the same --site-dir)")
    p.add_argument("--min-slices", type=int, default=8,
                   help="series with fewer slices are flagged as localizers (default 8)")
    opt.add_max_obliquity(p, "series more oblique than this (degrees) are flagged (default 35, as convert)")
    opt.add_num_processes(p, None, "parallel header readers (default: the cores the load average leaves free, at most 8; "
                               "1 = serial)")
    p.add_argument("--threads", action="store_true", help="read with threads instead of processes")
    opt.add_no_progress(p, "no progress bar")
    from orthodiff_nnunet.io.dicomweb import add_scan_arguments

    add_scan_arguments(p)
    return p


def _run_scan(args: argparse.Namespace) -> int:
    """Walk a PACS export (and its DICOMDIR), read every file's DICOM header (never the pixel data), group the files
    into exams (studies) and series, and write a draft manifest for `orthodiff convert`: one row per series.
    Localizers, derived images, secondary captures, several stacks in one series and damaged files are written as
    commented rows ('#' before the case_id, skipped by convert) with the reason in the 'note' column; several series
    of one plane in an exam get a 'choose:' note and convert refuses them until you comment out all but one. The
    scan_* columns are hints (plane, obliquity, slices, echoes, TE/TR/TI, fat suppression, spacing, matrix) that
    convert ignores. PRIVACY: the manifest holds your site's identifiers (patient_id = PatientID, case_id =
    accession number or StudyInstanceUID); it stays at the site and is refused inside an nnU-Net folder. convert
    replaces these identifiers by pseudonyms.
    """
    from orthodiff_nnunet.dataset_conversion.scan import check_manifest_location, scan_export, write_manifest

    from orthodiff_nnunet.io.dicomweb import cache_for_scan

    if (args.export is None) == (args.dicomweb is None):
        raise opt.CommandError("give the export folder or --dicomweb URL (one of them)")
    check_manifest_location(args.output)  # before minutes of reading
    export, exclude = args.export, [args.output]
    fetched = cache_for_scan(args, args.output, show_progress=not args.no_progress)  # None without --dicomweb
    if fetched is not None:
        export, cached_out = fetched  # the cache is scanned as an export folder
        exclude += cached_out
    result = scan_export(
        export, workers=args.num_processes, executor="thread" if args.threads else "process",
        progress=not args.no_progress, min_slices=args.min_slices, max_obliquity_deg=args.max_obliquity,
        exclude=exclude,
    )
    site_dir = write_manifest(result, args.output, site=args.site, site_dir=args.site_dir)
    print(result.summary())
    print(f"draft manifest: {args.output} (site-private: it holds patient identifiers)")
    if args.site == "SITE":
        print("note: the site column says SITE; pass --site NAME (or edit the column)")
    manifest_dir = args.output.absolute().parent.resolve()
    extra = "" if site_dir == manifest_dir else f" --site-dir {site_dir}"
    print(f"next: review the manifest, then orthodiff convert {args.output}{extra} -d ID -n NAME --dry-run")
    return 0
