"""Synthetic 2D-style MR series rendered from real label maps ("synthesised from real label maps").

Real anatomy with exact ground truth: a label map in the 11-structure scheme (e.g. an OAI map on its
0.7 x 0.36 x 0.36 mm sagittal DESS grid, remapped with :mod:`orthodiff_nnunet.remap`) becomes one
sagittal, coronal and axial series per exam, each with its label map on the same grid. The images
are *not* real MR images: any figure measured on them must say "synthesised from real label maps".

Steps of :func:`render_exam`:

1. tissue signal on the label map's grid: one mean per structure from
   :data:`~orthodiff_nnunet.data.sites.TISSUE_SIGNAL`, jittered per exam; soft tissue inside a body
   outline (the structures dilated by ~15 mm, smoothed), air outside; a little multiplicative texture
   (fine for bone marrow and cartilage, coarse muscle/fat modulation for soft tissue). When the
   acquisition pixels are coarser than the label grid, the signal is block-averaged (exact partial
   volume, ``sitk.BinShrink``, blocks at most one output pixel wide) to save time.
2. acquisition point spread: a Gaussian whose FWHM is the slice thickness along the slice normal and
   the pixel spacing in-plane, applied along the label grid's axes (the covariance projected onto each
   axis: exact for grids aligned with the acquisition, an approximation for oblique ones).
3. resampling with SimpleITK onto the acquisition grid (slice normal along patient L-R / A-P / S-I,
   covering the label map's extent): linear for the image, nearest neighbour for the labels, which
   are taken at the slice centres from the full-resolution map.
4. :func:`orthodiff_nnunet.data.sites.acquire`: site contrast, bias field, Rician noise, vendor scale.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet.data.sites import SITE_3T, TISSUE_SIGNAL, SiteProfile, acquire
from orthodiff_nnunet.schemes import KNEE_STRUCTURES, ORIENTATIONS, normalize_orientation

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
N_LABELS = max(KNEE_STRUCTURES.values()) + 1

#: Acquisition frames (columns = image axes i, j, k in LPS), the same conventions as DICOM series:
#: sag i: A->P, j: S->I, k: R->L; cor i: R->L, j: S->I, k: A->P; ax i: R->L, j: A->P, k: I->S.
#: The slice normal is always the k axis.
ACQUISITION_FRAMES: dict[str, np.ndarray] = {
    "sag": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "cor": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),
    "ax": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float),
}

#: Relative texture amplitude per structure class (bone marrow trabecular, cartilage, fibrous tissue).
_TEXTURE = {"bone": 0.10, "cartilage": 0.06, "fibrous": 0.05, "soft_tissue": 0.08}
_BODY_MARGIN_MM = (12.0, 18.0)  # the body outline: structures dilated by this much (random per exam)
_BODY_GRID_MM = 2.0  # grid of the body-outline computation
_JITTER_SD = 0.06  # per-exam log-normal jitter of each structure's mean signal, clipped to +-2.5 sd


def _structure_class(name: str) -> str:
    if name in ("femur", "tibia", "patella", "fibula"):
        return "bone"
    if name.endswith("cartilage"):
        return "cartilage"
    return "fibrous"


def _check_labels(labels: sitk.Image) -> np.ndarray:
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("render_exam needs a scalar 3D label map")
    arr = sitk.GetArrayFromImage(labels)
    if arr.dtype.kind == "f":
        if np.any(arr != np.round(arr)):
            raise ValueError("the label map holds non-integer values")
        arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= N_LABELS:
        present = np.unique(arr)
        bad = [int(v) for v in present if not 0 <= v < N_LABELS]
        raise ValueError(
            f"label values {bad} are not in the 11-structure scheme (0..{N_LABELS - 1}); "
            "remap the map first (orthodiff_nnunet.remap.load_remap_table(...).apply)"
        )
    return arr.astype(np.uint8)


def _label_image(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(like)
    return out


def _corners(image: sitk.Image) -> np.ndarray:
    """Physical corners (8 x 3, LPS) of the image's voxel-edge bounding box."""
    size = np.array(image.GetSize(), dtype=float)
    pts = []
    for c in np.ndindex(2, 2, 2):
        idx = (-0.5 + np.array(c) * size).tolist()
        pts.append(image.TransformContinuousIndexToPhysicalPoint(idx))
    return np.asarray(pts)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    if max_deg <= 0:
        return np.eye(3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def acquisition_grid(
    labels: sitk.Image,
    orientation: str,
    in_plane_spacing_mm: float,
    slice_thickness_mm: float,
    max_in_plane_size: int | None = None,
    rotation: np.ndarray | None = None,
) -> sitk.Image:
    """An empty image (uint8) with the geometry of one 2D-style series covering ``labels``' extent.

    The slice normal (k axis) runs along patient L-R (sag), A-P (cor) or S-I (ax), optionally
    rotated by ``rotation``. ``max_in_plane_size`` coarsens the in-plane spacing until both in-plane
    sizes fit; the slice thickness is then never below the in-plane spacing (so the k axis stays the
    slice axis for :func:`orthodiff_nnunet.orientation.detect_plane`).
    """
    frame = ACQUISITION_FRAMES[normalize_orientation(orientation)]
    if rotation is not None:
        frame = rotation @ frame
    proj = _corners(labels) @ frame  # coordinates along i, j, k
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    extent = hi - lo
    sp_ip = float(in_plane_spacing_mm)
    if max_in_plane_size is not None:
        if max_in_plane_size < 2:
            raise ValueError("max_in_plane_size must be at least 2")
        sp_ip = max(sp_ip, float(max(extent[0], extent[1])) / max_in_plane_size)
    thick = max(float(slice_thickness_mm), sp_ip)
    spacing = np.array([sp_ip, sp_ip, thick])
    size = np.maximum(np.ceil(extent / spacing - 1e-6).astype(int), 1)
    if max_in_plane_size is not None:
        size[:2] = np.minimum(size[:2], max_in_plane_size)
    centre = (lo + hi) / 2.0
    first = centre - (size - 1) / 2.0 * spacing  # voxel-centre coordinates of index 0 along i, j, k
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(frame.flatten().tolist())
    grid.SetOrigin((frame @ first).tolist())
    return grid


def _tissue_tables(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-label mean signal and texture amplitude (index = label value) and the soft-tissue mean."""
    mean = np.zeros(N_LABELS, dtype=np.float32)
    amp = np.zeros(N_LABELS, dtype=np.float32)
    jitter = np.exp(np.clip(rng.normal(0.0, _JITTER_SD, size=N_LABELS + 1), -2.5 * _JITTER_SD, 2.5 * _JITTER_SD))
    for name, value in KNEE_STRUCTURES.items():
        if value == 0:
            continue
        mean[value] = TISSUE_SIGNAL[name] * jitter[value]
        amp[value] = _TEXTURE[_structure_class(name)]
    soft = float(TISSUE_SIGNAL["soft_tissue"] * jitter[N_LABELS])
    return mean, amp, soft


def _smooth_noise(like: sitk.Image, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian-correlated noise on ``like``'s grid (numpy order)."""
    shape = sitk.GetArrayViewFromImage(like).shape
    noise = sitk.GetImageFromArray(rng.standard_normal(shape, dtype=np.float32))
    noise.CopyInformation(like)
    out = sitk.GetArrayFromImage(_gaussian(noise, [sigma_mm] * 3))
    sd = float(out.std())
    return out / sd if sd > 0 else out


def _gaussian(image: sitk.Image, sigmas_mm: Sequence[float]) -> sitk.Image:
    """Separable Gaussian along the image axes (physical sigmas); axes with a tiny sigma are skipped."""
    out = image
    for axis, s in enumerate(sigmas_mm):
        if s >= 0.5 * image.GetSpacing()[axis]:
            out = sitk.RecursiveGaussian(out, float(s), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return out


def _soft_tissue(
    fg: np.ndarray, labels: sitk.Image, work: sitk.Image, margin_mm: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Body outline and soft-tissue modulation on the work grid (numpy order).

    Returns the fraction (0..1) of each work voxel inside the body outline (the structures dilated by
    ``margin_mm``, smoothed) and a smooth unit-variance field (muscle / fat compartments, ~5 mm),
    both computed on a ~2 mm grid and interpolated.
    """
    sp = np.array(labels.GetSpacing())
    factors = [max(1, int(round(_BODY_GRID_MM / s))) for s in sp]
    fg_img = sitk.Cast(_label_image(fg.astype(np.uint8), labels), sitk.sitkFloat32)
    coarse = sitk.BinShrink(fg_img, factors) > 0
    dist = sitk.SignedMaurerDistanceMap(coarse, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    body = _gaussian(sitk.Cast(dist <= margin_mm, sitk.sitkFloat32), [3.0, 3.0, 3.0])
    body = sitk.Resample(body, work, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mod = sitk.GetImageFromArray(_smooth_noise(coarse, rng, 5.0))
    mod.CopyInformation(coarse)
    mod = sitk.Resample(mod, work, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fraction = np.clip(sitk.GetArrayFromImage(body) * 2.0 - 0.5, 0.0, 1.0)  # sharpen the smoothed edge
    return fraction, sitk.GetArrayFromImage(mod)


def _psf_sigmas(work: sitk.Image, grid: sitk.Image, shrink: Sequence[int], label_spacing: Sequence[float]) -> list[float]:
    """Per work-axis Gaussian sigma (mm) of the acquisition PSF, less the block averaging already done."""
    frame = np.asarray(grid.GetDirection(), dtype=float).reshape(3, 3)
    fwhm = np.asarray(grid.GetSpacing(), dtype=float)
    cov = frame @ np.diag((fwhm * FWHM_TO_SIGMA) ** 2) @ frame.T
    wdir = np.asarray(work.GetDirection(), dtype=float).reshape(3, 3)
    sig = []
    for a in range(3):
        d = wdir[:, a]
        var = float(d @ cov @ d) - (shrink[a] * label_spacing[a]) ** 2 / 12.0
        sig.append(float(np.sqrt(max(var, 0.0))))
    return sig


def render_exam(
    labels: sitk.Image,
    seed: int,
    site: SiteProfile = SITE_3T,
    orientations: Sequence[str] = ORIENTATIONS,
    in_plane_spacing_mm: float | None = None,
    slice_thickness_mm: float | None = None,
    max_in_plane_size: int | None = None,
    max_obliquity_deg: float = 0.0,
) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """Render one exam (one series per orientation) from a label map in the 11-structure scheme.

    Args:
        labels: label map with values 0..11 (:data:`~orthodiff_nnunet.schemes.KNEE_STRUCTURES`), any
            grid and direction.
        seed: all randomness (tissue jitter, texture, body outline, bias field, noise) comes from it;
            each orientation's acquisition has its own stream, so a subset of orientations renders
            the same series as the full set.
        site: acquisition site (contrast, SNR, bias, vendor scale; default spacing and thickness).
        orientations: any of ``sag``, ``cor``, ``ax``.
        in_plane_spacing_mm: pixel spacing (default ``site.in_plane_spacing_mm``).
        slice_thickness_mm: slice thickness = slice spacing (default ``site.slice_thickness_mm``).
        max_in_plane_size: cap on both in-plane sizes (coarser pixels; small images for tests and
            benchmarks). The thickness is then raised to the pixel spacing if it is smaller.
        max_obliquity_deg: each series is tilted by a random rotation of up to this angle (0: the
            slice normal is exactly the patient axis).

    Returns:
        ``{orientation: (image float32, label uint8)}``, image and label on the same grid.
    """
    orients = [normalize_orientation(o) for o in orientations]
    lab = _check_labels(labels)
    sp_ip = float(in_plane_spacing_mm if in_plane_spacing_mm is not None else site.in_plane_spacing_mm)
    thick = float(slice_thickness_mm if slice_thickness_mm is not None else site.slice_thickness_mm)
    if sp_ip <= 0 or thick <= 0:
        raise ValueError("spacing and slice thickness must be positive")
    label_img = _label_image(lab, labels)
    exam_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    orient_rngs = {o: np.random.default_rng(np.random.SeedSequence([int(seed), 1 + ORIENTATIONS.index(o)]))
                   for o in ORIENTATIONS}
    rotations = {o: _random_rotation(orient_rngs[o], max_obliquity_deg) for o in ORIENTATIONS}
    grids = {o: acquisition_grid(label_img, o, sp_ip, thick, max_in_plane_size, rotations[o]) for o in orients}

    need = min(min(g.GetSpacing()) for g in grids.values()) if grids else 1.0
    work_img, shrink = _tissue_signal(lab, labels, need, exam_rng)
    return {o: _acquire_series(work_img, grids[o], label_img, shrink, labels.GetSpacing(), orient_rngs[o], site)
            for o in orients}


def _tissue_signal(lab: np.ndarray, labels: sitk.Image, need: float,
                   exam_rng: np.random.Generator) -> tuple[sitk.Image, list[int]]:
    """Step 1: tissue signal, block-averaged (exact partial volume) to a working grid.

    The working grid's blocks are at most ``need`` mm (the finest output pixel) wide; the PSF of
    :func:`_acquire_series` accounts for the block width. Returns the working image and the block size
    per axis.
    """
    mean, amp, soft = _tissue_tables(exam_rng)
    lsp = labels.GetSpacing()
    shrink = [max(1, int(need // s)) for s in lsp]
    fg = lab > 0

    def to_work(values: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(values)
        img.CopyInformation(labels)
        return sitk.BinShrink(img, shrink) if max(shrink) > 1 else img

    work = to_work(mean[lab])
    signal = sitk.GetArrayFromImage(work)
    amp_w = sitk.GetArrayFromImage(to_work(amp[lab]))
    bg_w = sitk.GetArrayFromImage(to_work((~fg).astype(np.float32)))
    body, mod = _soft_tissue(fg, labels, work, float(exam_rng.uniform(*_BODY_MARGIN_MM)), exam_rng)
    bg_w *= body
    del body
    signal += bg_w * soft * (1.0 + 0.15 * mod)
    amp_w += bg_w * _TEXTURE["soft_tissue"]
    del bg_w, mod
    signal *= 1.0 + amp_w * _smooth_noise(work, exam_rng, 0.7)  # marrow and tissue grain
    del amp_w
    np.clip(signal, 0.0, None, out=signal)
    work_img = sitk.GetImageFromArray(signal)
    work_img.CopyInformation(work)
    return work_img, shrink


def _acquire_series(work_img: sitk.Image, grid: sitk.Image, label_img: sitk.Image, shrink: Sequence[int],
                    label_spacing: Sequence[float], rng: np.random.Generator,
                    site: SiteProfile) -> tuple[sitk.Image, sitk.Image]:
    """Steps 2-4 for one orientation: partial volume, resampling onto the acquisition grid, site effects."""
    # 2. partial volume over the slice thickness and the in-plane pixel
    blurred = _gaussian(work_img, _psf_sigmas(work_img, grid, shrink, label_spacing))
    # 3. onto the acquisition grid
    img = sitk.Resample(blurred, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    seg = sitk.Resample(label_img, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # 4. site effects
    stored = acquire(sitk.GetArrayFromImage(img), rng, site)
    image = sitk.GetImageFromArray(stored.astype(np.float32))
    image.CopyInformation(grid)
    seg.CopyInformation(grid)
    return image, seg


def _patient_of(path: Path) -> str:
    """Patient id from a label-map file name: its first ``_``-separated token (OAI: ``9014797_00m_...``)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.split("_")[0] or name


def write_rendered_site(
    label_paths: Sequence[Path],
    out_dir: Path,
    site: SiteProfile,
    seed: int,
    remap: str | None,
    orientations: Sequence[str] = ORIENTATIONS,
    file_ending: str = ".nii.gz",
    patient_ids: Sequence[str] | None = None,
    **render_kwargs,
) -> Path:
    """Render every label map as one exam of ``site`` and write a converter-ready site folder.

    Writes ``images/RENDER-0001_sag{file_ending}``, ``labels/RENDER-0001_sag{file_ending}`` ...,
    ``manifest.csv`` (``docs/CONTRACTS.md``: case_id, patient_id, site, field_strength, vendor, image,
    orientation blank, label; the labels are already in the 11-structure scheme, so no label_remap;
    no abnormality columns) and ``render_info.json`` (sources, seed, and the note that the images are
    synthesised from real label maps).

    Args:
        label_paths: label maps, one exam each (case ids ``RENDER-0001``... in this order).
        out_dir: the site folder (created).
        site: acquisition site.
        seed: exam ``i`` is rendered with a seed derived from (seed, i).
        remap: remapping table (built-in name or JSON path) applied to every map; None when the maps
            are already in the 11-structure scheme.
        orientations: series rendered per exam.
        file_ending: image file ending (``.nii.gz``, ``.nrrd``, ``.mha`` ...).
        patient_ids: one per label map; default the first ``_``-separated token of each file name,
            so the OAI follow-up maps of one knee (``9014797_00m``, ``9014797_72m``) share a patient.
        **render_kwargs: passed to :func:`render_exam` (spacing, thickness, ``max_in_plane_size``...).

    Returns:
        The manifest path.
    """
    from orthodiff_nnunet.remap import load_remap_table

    out_dir = Path(out_dir)
    paths = [Path(p) for p in label_paths]
    if patient_ids is not None and len(patient_ids) != len(paths):
        raise ValueError("patient_ids must give one patient per label map")
    table = load_remap_table(remap) if remap is not None else None
    orients = [normalize_orientation(o) for o in orientations]
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    info: dict = {
        "note": "synthesised from real label maps: the images are not real MR images; the anatomy and "
                "the label maps are real (remapped to the 11 knee structures)",
        "site": site.name, "field_strength_t": site.field_strength_t, "vendor": site.vendor,
        "seed": int(seed), "remap": None if table is None else table.name,
        "render_kwargs": {k: v for k, v in render_kwargs.items()}, "cases": {},
    }
    for i, path in enumerate(paths, start=1):
        case = f"RENDER-{i:04d}"
        labels = sitk.ReadImage(str(path))
        if table is not None:
            labels = table.apply_image(labels)
        exam_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        series = render_exam(labels, exam_seed, site=site, orientations=orients, **render_kwargs)
        patient = patient_ids[i - 1] if patient_ids is not None else _patient_of(path)
        for o, (image, seg) in series.items():
            img_rel = f"images/{case}_{o}{file_ending}"
            lab_rel = f"labels/{case}_{o}{file_ending}"
            sitk.WriteImage(image, str(out_dir / img_rel), True)
            sitk.WriteImage(seg, str(out_dir / lab_rel), True)
            rows.append({
                "case_id": case, "patient_id": patient, "site": site.name,
                "field_strength": f"{site.field_strength_t:g}", "vendor": site.vendor,
                "image": img_rel, "orientation": "", "label": lab_rel,
            })
        info["cases"][case] = {"source": str(path), "seed": exam_seed, "orientations": list(series)}
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "patient_id", "site", "field_strength", "vendor",
                                               "image", "orientation", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "render_info.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return manifest
