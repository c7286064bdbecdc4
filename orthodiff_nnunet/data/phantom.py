"""Seeded procedural knee phantom: three 2D-style MRI series per exam, with labels and abnormalities.

**Synthetic data for tests and the demo; never evidence of clinical accuracy.**

One *exam* is one virtual knee, defined analytically in world coordinates and then "acquired" as a
sagittal, a coronal and an axial series:

* Coordinates are DICOM/SimpleITK patient coordinates **LPS, in mm**: ``x`` towards the patient's
  Left, ``y`` Posterior, ``z`` Superior. The joint line is near ``z = 0`` and the knee is centred
  near ``x = y = 0`` (plus a small random offset per exam).
* The anatomy is built from signed-distance-like primitives (ellipsoids, capsules, boxes) in an
  *anatomical frame* of a full-size adult knee (mm); ``scale`` shrinks it into world coordinates so
  that the default images stay small (82 x 82-89 pixels, 17-18 slices at SITE_3T; 73 x 73-79
  pixels, 15-16 slices at SITE_15T).
  Each exam draws small random variations of sizes and positions from its seed.
* The 11 structures of :data:`orthodiff_nnunet.schemes.KNEE_STRUCTURES` are labels (femur with shaft
  and two condyles, tibia, patella, fibula, three cartilages, two menisci, ACL, PCL); soft tissue,
  subcutaneous fat, the patellar and quadriceps tendons, the collateral ligaments (MCL, LCL) and the
  joint recesses are unlabelled tissue (label 0).
* The 8 abnormalities of :data:`orthodiff_nnunet.schemes.KNEE_ABNORMALITIES` change the image
  (deliberately conspicuous, so a small classifier can learn them):

  - ``ACL`` / ``PCL`` tear: the ligament is interrupted in its middle; the gap holds fluid signal
    and has label 0 (the ligament label keeps the remaining fibres).
  - ``MM`` / ``LM`` tear: a bright vertical (longitudinal) line through the posterior horn and body
    of that meniscus; the voxels keep the meniscus label.
  - ``MCL`` / ``LCL`` injury: oedema (bright) around that collateral ligament, which is itself
    brighter (partial tear).
  - ``PD``: the patella (bone and cartilage labels with it, and the tendons' ends) is displaced
    laterally (and slightly anteriorly).
  - ``EFFU``: the suprapatellar and parapatellar recesses are distended with fluid.

* Each series is acquired with the site's in-plane spacing and slice thickness (slice spacing =
  thickness): the noiseless signal is the mean of :data:`N_SUBSAMPLES` sub-samples across each
  slice (thick-slice partial volume), the label is the structure at the voxel centre. Site effects
  (contrast, bias field, Rician noise, vendor scaling) come from :func:`orthodiff_nnunet.data.sites.acquire`.

Randomness: anatomy and abnormality details come from ``default_rng([anatomy_seed, 0])`` and each
series' acquisition (noise, bias field, obliquity) from ``default_rng([seed, 1 + plane index])``;
so the same seed gives identical arrays, and an exam with and without an abnormality differ
essentially only where the abnormality is (same anatomy, same noise draws; sites with a contrast
factor below 1 also shift all values slightly, as ``apply_contrast`` uses the image mean).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from orthodiff_nnunet.data.sites import SITE_3T, TISSUE_SIGNAL, SiteProfile, acquire
from orthodiff_nnunet.schemes import KNEE_ABNORMALITIES, KNEE_STRUCTURES, ORIENTATIONS, normalize_orientation

__all__ = [
    "DEFAULT_SCALE",
    "N_SUBSAMPLES",
    "FOV_MM",
    "KneeAnatomy",
    "SeriesGeometry",
    "KneeExam",
    "sample_anatomy",
    "series_geometry",
    "make_exam",
    "sample_abnormalities",
    "abnormality_roi",
    "write_site",
    "MANIFEST_COLUMNS",
]

#: Default anatomy scale (world mm per anatomical mm): keeps the default images small.
DEFAULT_SCALE = 0.55
#: Sub-samples across each slice for the thick-slice partial volume (odd: the middle one is the centre).
N_SUBSAMPLES = 3
#: Field of view per orientation in *anatomical* mm (multiplied by ``scale``), as
#: ``(min, max)`` along the patient axes x (L), y (P), z (S), relative to the knee centre.
FOV_MM: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "sag": ((-50.0, 50.0), (-60.0, 60.0), (-62.0, 68.0)),
    "cor": ((-60.0, 60.0), (-45.0, 50.0), (-62.0, 68.0)),
    "ax": ((-60.0, 60.0), (-60.0, 60.0), (-35.0, 62.0)),
}
#: DICOM-like in-plane axes per plane (columns of the direction matrix: image i = columns,
#: image j = rows); the slice normal (k) is their cross product (right-handed).
#: sagittal: columns A->P, rows S->I; coronal: columns R->L, rows S->I; axial: columns R->L, rows A->P.
_INPLANE_AXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sag": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "cor": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "ax": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}
_PLANE_INDEX = {o: i for i, o in enumerate(ORIENTATIONS)}

#: Signals of the unlabelled tissues not in :data:`TISSUE_SIGNAL` (same arbitrary units).
_SUBCUT_FAT = 0.12  # fat-suppressed subcutaneous fat
_CORTEX = 0.04  # cortical bone rim
_TENDON = TISSUE_SIGNAL["collateral_ligament"]
_INJURED_LIGAMENT = 0.40  # collateral ligament with a partial tear (MCL/LCL injury)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "case_id", "patient_id", "site", "field_strength", "vendor", "image", "orientation", "label",
    *KNEE_ABNORMALITIES,
)

_L = KNEE_STRUCTURES


# --------------------------------------------------------------------------------------------
# signed-distance-like primitives (negative inside, ~mm outside); all float32 and vectorised
# --------------------------------------------------------------------------------------------
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def _ellipsoid(p: Coords, c: Sequence[float], a: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid, centre ``c``, semi-axes ``a``."""
    x = (p[0] - c[0]) / a[0]
    y = (p[1] - c[1]) / a[1]
    z = (p[2] - c[2]) / a[2]
    k0 = np.sqrt(x * x + y * y + z * z)
    k1 = np.sqrt((x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _ellipse2d(x: np.ndarray, y: np.ndarray, ax: np.ndarray | float, ay: np.ndarray | float) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse centred at 0 with semi-axes ``ax``, ``ay``."""
    u = x / ax
    v = y / ay
    k0 = np.sqrt(u * u + v * v)
    k1 = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _box(p: Coords, lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """Signed distance (mm) to an axis-aligned box ``[lo, hi]``."""
    q = [np.abs(p[i] - 0.5 * (lo[i] + hi[i])) - 0.5 * (hi[i] - lo[i]) for i in range(3)]
    outside = np.sqrt(sum(np.maximum(qi, 0.0) ** 2 for qi in q))
    inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0.0)
    return outside + inside


def _capsule(p: Coords, a: Sequence[float], b: Sequence[float], r: float) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (mm) to a capsule (cylinder with round ends) from ``a`` to ``b``, radius ``r``.

    Returns:
        ``(distance, h)`` with ``h`` in [0, 1] the position of the nearest axis point (0 at ``a``).
    """
    ba = np.asarray(b, dtype=np.float32) - np.asarray(a, dtype=np.float32)
    pa = [p[i] - a[i] for i in range(3)]
    h = np.clip((pa[0] * ba[0] + pa[1] * ba[1] + pa[2] * ba[2]) / float(ba @ ba), 0.0, 1.0)
    d = np.sqrt(sum((pa[i] - ba[i] * h) ** 2 for i in range(3)))
    return d - r, h


# --------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KneeAnatomy:
    """One random virtual knee, in an anatomical frame (mm, right-knee layout before mirroring).

    World (LPS, mm) point ``w`` maps to anatomical ``a = mirror * (w - centre) / scale``, with
    ``mirror`` flipping x for a left knee, so that in the anatomical frame lateral is always ``-x``.

    Attributes:
        scale: world mm per anatomical mm.
        centre: world position (LPS, mm) of the anatomical origin (knee centre at the joint line).
        side: ``"right"`` or ``"left"`` knee. For a right knee lateral is the patient's right (-x).
        p: named anatomical parameters (mm), jittered per exam (see :func:`sample_anatomy`).
    """

    scale: float
    centre: tuple[float, float, float]
    side: str
    p: Mapping[str, object]

    @property
    def lateral_sign_world(self) -> float:
        """Sign of world x pointing laterally: -1 for a right knee, +1 for a left knee."""
        return -1.0 if self.side == "right" else 1.0

    def to_local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Coords:
        """World LPS coordinates (mm) -> anatomical coordinates (mm, lateral = -x)."""
        inv = np.float32(1.0 / self.scale)
        mx = np.float32(-self.lateral_sign_world)  # right knee: +1 (no flip)
        return ((x - np.float32(self.centre[0])) * inv * mx,
                (y - np.float32(self.centre[1])) * inv,
                (z - np.float32(self.centre[2])) * inv)

    # ---- parts ------------------------------------------------------------------------------
    def _patella_shift(self, abn: Mapping[str, bool]) -> np.ndarray:
        return np.asarray(self.p["pd_shift"], np.float32) if abn.get("PD") else np.zeros(3, np.float32)

    def femur(self, q: Coords) -> np.ndarray:
        """Signed distance to the femur: shaft, metaphysis, two condyles and trochlea minus the notch."""
        P = self.p
        d = np.maximum(_ellipse2d(q[0] - P["shaft_c"][0], q[1] - P["shaft_c"][1], *P["shaft_a"]),
                       P["shaft_z0"] - q[2])
        d = np.minimum(d, _ellipsoid(q, P["meta_c"], P["meta_a"]))
        d = np.minimum(d, _ellipsoid(q, P["condyle_m_c"], P["condyle_a"]))
        d = np.minimum(d, _ellipsoid(q, P["condyle_l_c"], P["condyle_a"]))
        d = np.minimum(d, _ellipsoid(q, P["troch_c"], P["troch_a"]))
        return np.maximum(d, -self.notch(q))

    def notch(self, q: Coords) -> np.ndarray:
        """Signed distance to the intercondylar notch (a box between the condyles)."""
        w = self.p["notch_half_width"]
        return _box(q, (-w, -2.0, -20.0), (w, 60.0, self.p["notch_roof"]))

    def tibia(self, q: Coords) -> np.ndarray:
        """Signed distance to the tibia: plateau tapering into the shaft, minus the posterior fossa."""
        P = self.p
        zs = P["tibia_z"]
        ax = np.interp(q[2], zs, P["tibia_ax"]).astype(np.float32)
        ay = np.interp(q[2], zs, P["tibia_ay"]).astype(np.float32)
        cy = np.interp(q[2], zs, P["tibia_cy"]).astype(np.float32)
        d = np.maximum(_ellipse2d(q[0], q[1] - cy, ax, ay), q[2] - P["plateau_z"])
        fossa = _box(q, (-6.0, P["fossa_y0"], -14.0), (6.0, 60.0, 5.0))
        return np.maximum(d, -fossa)

    def fibula(self, q: Coords) -> np.ndarray:
        """Signed distance to the fibula: head (sphere) and shaft (capsule), lateral and posterior."""
        P = self.p
        head = _ellipsoid(q, P["fib_head_c"], (P["fib_head_r"],) * 3)
        shaft, _ = _capsule(q, P["fib_head_c"], P["fib_shaft_end"], P["fib_shaft_r"])
        return np.minimum(head, shaft)

    def patella(self, q: Coords, abn: Mapping[str, bool]) -> np.ndarray:
        """Signed distance to the patella (moved laterally with ``PD``)."""
        c = np.asarray(self.p["patella_c"], np.float32) + self._patella_shift(abn)
        return _ellipsoid(q, c, self.p["patella_a"])

    def ligament(self, q: Coords, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(distance, h)`` of a ligament capsule: ``ACL``, ``PCL``, ``MCL`` or ``LCL``."""
        a, b, r = self.p[name]
        return _capsule(q, a, b, r)

    def meniscus_coords(self, q: Coords, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(r, angle_deg, height)`` of points in a meniscus' compartment frame.

        ``r`` is the normalised elliptic radius around the compartment centre, ``angle`` the angle
        (degrees, 0 = towards the notch, 90 = posterior) and ``height`` = z above the tibial cartilage.
        """
        P = self.p
        cx, cy = P[f"menisc_{side}_c"]
        sx, sy = P["menisc_a"]
        u = (q[0] - cx) / sx
        v = (q[1] - cy) / sy
        r = np.sqrt(u * u + v * v)
        towards_notch = -np.sign(cx)  # +x for the lateral (negative x) compartment
        ang = np.degrees(np.arctan2(v, u * towards_notch))
        return r, ang, q[2] - P["tib_cart_top"]

    def meniscus(self, q: Coords, side: str) -> np.ndarray:
        """Boolean mask of a meniscus (``side`` = ``"medial"`` or ``"lateral"``): a C-shaped wedge."""
        P = self.p
        r, ang, h = self.meniscus_coords(q, side)
        r_in = P["menisc_r_in"]
        top = P["menisc_height"] * (r - r_in) / (1.0 - r_in)
        opening = P[f"menisc_{side}_opening"]
        return (r >= r_in) & (r <= 1.0) & (h >= 0.0) & (h <= top) & (np.abs(ang) >= opening)

    def tendons(self, q: Coords, abn: Mapping[str, bool]) -> np.ndarray:
        """Signed distance to the patellar and quadriceps tendons (unlabelled)."""
        P = self.p
        s = self._patella_shift(abn)
        pt_a, pt_b, pt_r = P["pat_tendon"]
        qt_a, qt_b, qt_r = P["quad_tendon"]
        d1, _ = _capsule(q, np.asarray(pt_a) + s, pt_b, pt_r)
        d2, _ = _capsule(q, np.asarray(qt_a) + s, qt_b, qt_r)
        return np.minimum(d1, d2)

    def recesses(self, q: Coords, effusion: bool) -> np.ndarray:
        """Signed distance to the fluid in the suprapatellar and parapatellar recesses."""
        P = self.p
        key = "effusion" if effusion else "normal"
        d = _ellipsoid(q, P[f"supra_c_{key}"], P[f"supra_a_{key}"])
        for side in ("medial", "lateral"):
            d = np.minimum(d, _ellipsoid(q, P[f"parapat_{side}_c"], P[f"parapat_a_{key}"]))
        return d

    def soft_tissue(self, q: Coords) -> np.ndarray:
        """Signed distance to the skin surface (elliptic cylinder along z)."""
        P = self.p
        return _ellipse2d(q[0], q[1] - P["skin_cy"], *P["skin_a"])

    # ---- rendering --------------------------------------------------------------------------
    def render(self, x: np.ndarray, y: np.ndarray, z: np.ndarray,
               abnormalities: Mapping[str, bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and noiseless signal at world points.

        Args:
            x, y, z: world LPS coordinates in mm (float32 arrays of one shape).
            abnormalities: abnormality name -> present (missing = absent).

        Returns:
            ``(label, signal)``: uint8 structure labels (:data:`KNEE_STRUCTURES`) and float32 signal
            (arbitrary units, about [0, 1]) of the same shape as ``x``.
        """
        abn = {k: bool(v) for k, v in (abnormalities or {}).items()}
        unknown = set(abn) - set(KNEE_ABNORMALITIES)
        if unknown:
            raise ValueError(f"unknown abnormalities {sorted(unknown)}; known: {list(KNEE_ABNORMALITIES)}")
        q = self.to_local(x.astype(np.float32), y.astype(np.float32), z.astype(np.float32))
        lab = np.zeros(q[0].shape, np.uint8)
        sig = np.zeros(q[0].shape, np.float32)
        # painted back to front: each layer overwrites what lies under it
        self._paint_soft_tissue(q, abn, sig)
        bone, d_fem, d_pat = self._paint_bones(q, abn, lab, sig)
        fem_cart, tib_cart, pat_cart = self._paint_cartilage(q, abn, lab, sig, bone, d_fem, d_pat)
        hard = bone | fem_cart
        self._paint_menisci(q, abn, lab, sig, hard)
        occupied = hard | (lab == _L["medial_meniscus"]) | (lab == _L["lateral_meniscus"]) | tib_cart | pat_cart
        self._paint_cruciates(q, abn, lab, sig, occupied)
        return lab, sig

    def _paint_soft_tissue(self, q: Coords, abn: Mapping[str, bool], sig: np.ndarray) -> None:
        """Soft tissue and subcutaneous fat, joint recesses, tendons and collateral ligaments (unlabelled)."""
        P = self.p
        d_skin = self.soft_tissue(q)
        sig[d_skin < 0] = TISSUE_SIGNAL["soft_tissue"]
        sig[(d_skin < 0) & (d_skin > -P["fat_thickness"])] = _SUBCUT_FAT
        # joint recesses (thin physiological fluid, distended with effusion)
        sig[self.recesses(q, abn.get("EFFU", False)) < 0] = TISSUE_SIGNAL["fluid"]
        # tendons and collateral ligaments (unlabelled); oedema around an injured collateral ligament
        sig[self.tendons(q, abn) < 0] = _TENDON
        for name in ("MCL", "LCL"):
            d, _ = self.ligament(q, name)
            if abn.get(name):
                sig[(d >= 0) & (d < P["oedema_width"])] = TISSUE_SIGNAL["oedema"]
                sig[d < 0] = _INJURED_LIGAMENT
            else:
                sig[d < 0] = TISSUE_SIGNAL["collateral_ligament"]

    def _paint_bones(self, q: Coords, abn: Mapping[str, bool], lab: np.ndarray, sig: np.ndarray):
        """Bones: marrow with a dark cortical rim. Returns ``(bone mask, femur distance, patella distance)``."""
        bone = np.zeros(q[0].shape, bool)
        d_fem = self.femur(q)
        d_tib = self.tibia(q)
        d_pat = self.patella(q, abn)
        for name, d in (("femur", d_fem), ("tibia", d_tib), ("fibula", self.fibula(q)), ("patella", d_pat)):
            m = d < 0
            lab[m] = _L[name]
            sig[m] = TISSUE_SIGNAL[name]
            sig[m & (d > -self.p["cortex"])] = _CORTEX
            bone |= m
        return bone, d_fem, d_pat

    def _paint_cartilage(self, q: Coords, abn: Mapping[str, bool], lab: np.ndarray, sig: np.ndarray,
                         bone: np.ndarray, d_fem: np.ndarray, d_pat: np.ndarray):
        """Cartilages, thin shells on the articular surfaces. Returns the femoral, tibial and patellar masks."""
        P = self.p
        notch = self.notch(q) < 0
        fem_cart = ((d_fem >= 0) & (d_fem < P["fem_cart"]) & (q[2] < P["fem_cart_zmax"])
                    & (np.abs(q[0]) < P["fem_cart_xmax"]) & ~notch & ~bone)
        tib_cart = ((q[2] >= P["plateau_z"]) & (q[2] < P["tib_cart_top"]) & (np.abs(q[0]) > P["tib_cart_xmin"])
                    & (_ellipse2d(q[0], q[1] - P["tibia_cy"][-1], P["tibia_ax"][-1] - 3.0,
                                  P["tibia_ay"][-1] - 3.0) < 0) & ~bone & ~fem_cart)
        pc = np.asarray(P["patella_c"], np.float32) + self._patella_shift(abn)
        pat_cart = (d_pat >= 0) & (d_pat < P["pat_cart"]) & (q[1] > pc[1] + 2.0) & ~bone
        for name, m in (("femoral_cartilage", fem_cart), ("tibial_cartilage", tib_cart),
                        ("patellar_cartilage", pat_cart)):
            lab[m] = _L[name]
            sig[m] = TISSUE_SIGNAL[name]
        return fem_cart, tib_cart, pat_cart

    def _paint_menisci(self, q: Coords, abn: Mapping[str, bool], lab: np.ndarray, sig: np.ndarray,
                       hard: np.ndarray) -> None:
        """Menisci, with a longitudinal vertical tear through the posterior horn and body."""
        P = self.p
        for side, key, lname in (("medial", "MM", "medial_meniscus"), ("lateral", "LM", "lateral_meniscus")):
            m = self.meniscus(q, side) & ~hard
            lab[m] = _L[lname]
            sig[m] = TISSUE_SIGNAL[lname]
            if abn.get(key):
                r, ang, _ = self.meniscus_coords(q, side)
                tear = m & (np.abs(r - P["tear_r"]) < P["tear_half_width"]) & (ang > P["tear_ang0"])
                sig[tear] = TISSUE_SIGNAL["fluid"]

    def _paint_cruciates(self, q: Coords, abn: Mapping[str, bool], lab: np.ndarray, sig: np.ndarray,
                         occupied: np.ndarray) -> None:
        """Cruciate ligaments in the notch; a tear leaves a fluid-filled gap in the middle."""
        P = self.p
        gaps = []
        for name in ("ACL", "PCL"):
            d, h = self.ligament(q, name)
            m = (d < 0) & ~occupied
            lab[m] = _L[name]
            sig[m] = TISSUE_SIGNAL[name]
            if abn.get(name):
                h0, h1 = P[f"{name}_gap"]
                gaps.append((h >= h0) & (h <= h1) & (d < P[name][2] * 0.6) & ~occupied)
        for g in gaps:
            lab[g] = 0
            sig[g] = TISSUE_SIGNAL["fluid"]

    def roi(self, name: str, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Region (boolean, same shape as ``x``) where abnormality ``name`` shows, for checks.

        ``ACL``/``PCL``: within 2 radii of the ligament's middle third; ``MM``/``LM``: the
        meniscus' posterior half; ``MCL``/``LCL``: within the oedema width of the ligament;
        ``EFFU``: the distended recesses; ``PD``: the displaced patella.
        """
        q = self.to_local(x.astype(np.float32), y.astype(np.float32), z.astype(np.float32))
        P = self.p
        if name in ("ACL", "PCL"):
            d, h = self.ligament(q, name)
            return (d < P[name][2]) & (h > 0.3) & (h < 0.75)
        if name in ("MM", "LM"):
            side = "medial" if name == "MM" else "lateral"
            r, ang, _ = self.meniscus_coords(q, side)
            return self.meniscus(q, side) & (ang > P["tear_ang0"])
        if name in ("MCL", "LCL"):
            d, _ = self.ligament(q, name)
            return d < P["oedema_width"]
        if name == "EFFU":
            return (self.recesses(q, True) < 0) & (self.femur(q) >= 0) & (self.patella(q, {}) >= 0)
        if name == "PD":
            return self.patella(q, {"PD": True}) < 0
        raise ValueError(f"unknown abnormality {name!r}")


def sample_anatomy(rng: np.random.Generator, scale: float = DEFAULT_SCALE, side: str = "right",
                   jitter: float = 1.0) -> KneeAnatomy:
    """Draw one random knee: small variations (a few %, a few mm) of sizes and positions.

    Long by design: one declarative table of the ~80 anatomical parameters, read top to bottom like
    the anatomy; its random draws must stay in this order (a seed's phantom is what tests and the
    demo's figures are built on), which splitting it into pieces would make easy to break.

    Args:
        rng: the generator all variations come from (the same number of draws whatever follows).
        scale: world mm per anatomical mm (1.0 = adult size, :data:`DEFAULT_SCALE` by default).
        side: ``"right"`` or ``"left"``.
        jitter: multiplies all random variations (0 = the mean knee).

    Returns:
        The anatomy; its ``centre`` is the origin plus a random offset of a few mm (world).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    j = float(jitter)

    def f(sd: float = 0.04) -> float:  # size factor
        return float(1.0 + j * sd * np.clip(rng.standard_normal(), -2.5, 2.5))

    def d(sd: float = 1.5) -> float:  # position offset (mm)
        return float(j * sd * np.clip(rng.standard_normal(), -2.5, 2.5))

    g = f(0.04)  # global size
    cw = 21.0 * g * f(0.03)  # condyle centre distance from the midline
    cond_a = (12.0 * g * f(), 24.0 * g * f(), 20.0 * g * f())
    plateau_z = -2.5
    cond_z = 2.5 + cond_a[2]
    lat = -1.0  # anatomical frame: lateral = -x
    med = 1.0
    p: dict[str, object] = {}
    p["skin_a"] = (56.0 * g * f(), 52.0 * g * f())
    p["skin_cy"] = 3.0 + d()
    p["fat_thickness"] = 5.0 * f(0.1)
    p["cortex"] = 1.6
    # femur
    p["shaft_c"] = (d(), 6.0 + d())
    p["shaft_a"] = (15.0 * g * f(), 14.0 * g * f())
    p["shaft_z0"] = 40.0
    p["meta_c"] = (0.0, 6.0 + d(), 30.0 + d())
    p["meta_a"] = (34.0 * g * f(), 20.0 * g * f(), 30.0 * g * f())
    p["condyle_m_c"] = (med * cw, 6.0 + d(), cond_z)
    p["condyle_l_c"] = (lat * cw, 6.0 + d(), cond_z + d(0.5))
    p["condyle_a"] = cond_a
    p["troch_c"] = (0.0, -2.0 + d(), 26.0 + d())
    p["troch_a"] = (30.0 * g * f(), 17.0 * g * f(), 18.0 * g * f())
    p["notch_half_width"] = 8.5 * f(0.06)
    p["notch_roof"] = 24.0 + d(1.0)
    p["fem_cart"] = 2.4 * f(0.06)
    p["fem_cart_zmax"] = 26.0
    p["fem_cart_xmax"] = cw + 0.85 * cond_a[0]
    # tibia (plateau -> shaft), posterior intercondylar fossa for the PCL
    p["plateau_z"] = plateau_z
    p["tib_cart_top"] = plateau_z + 2.3 * f(0.06)
    p["tib_cart_xmin"] = 6.5
    p["tibia_z"] = (-60.0, -45.0, -15.0, 0.0)  # increasing, for np.interp
    plateau_ax, plateau_ay = 38.0 * g * f(), 26.0 * g * f()
    p["tibia_ax"] = (16.0 * g, 17.0 * g * f(), plateau_ax, plateau_ax)
    p["tibia_ay"] = (14.0 * g, 15.0 * g * f(), plateau_ay, plateau_ay)
    p["tibia_cy"] = (8.0, 7.0 + d(), 4.0, 4.0)
    p["fossa_y0"] = 16.0 + d(1.0)
    # fibula: lateral, posterior, head below the plateau
    fh = (lat * (40.0 * g + d(1.0)), 20.0 + d(), -28.0 + d())
    p["fib_head_c"] = fh
    p["fib_head_r"] = 8.0 * g * f()
    p["fib_shaft_end"] = (fh[0] + 3.0, fh[1] + 2.0, -200.0)
    p["fib_shaft_r"] = 5.5 * g * f()
    # patella and its cartilage, tendons
    pc = (d(1.0), -33.0 * g + d(1.0), 33.0 + d())
    p["patella_c"] = pc
    p["patella_a"] = (21.0 * g * f(), 8.0 * g * f(), 18.0 * g * f())
    p["pat_cart"] = 2.8 * f(0.06)
    p["pd_shift"] = (lat * (20.0 + d(2.0)), -4.0 + d(1.0), d(1.0))
    p["pat_tendon"] = ((pc[0], pc[1] - 4.0, pc[2] - 16.0), (0.0, -17.0 + d(), -36.0), 4.5 * f(0.08))
    p["quad_tendon"] = ((pc[0], pc[1] - 1.0, pc[2] + 16.0), (0.0, -22.0 + d(), 95.0), 5.0 * f(0.08))
    # joint recesses: thin fluid normally, distended with effusion
    p["supra_c_normal"] = (0.0, -15.0 + d(0.5), 52.0 + d())
    p["supra_a_normal"] = (22.0, 1.4, 16.0)
    p["supra_c_effusion"] = (0.0, -16.5 + d(0.5), 53.0 + d())
    p["supra_a_effusion"] = (26.0 * f(0.08), 7.5 * f(0.1), 21.0 * f(0.08))
    p["parapat_medial_c"] = (med * 26.0, -20.0 + d(), 28.0 + d())
    p["parapat_lateral_c"] = (lat * 26.0, -20.0 + d(), 28.0 + d())
    p["parapat_a_normal"] = (1.0, 5.0, 10.0)
    p["parapat_a_effusion"] = (4.5 * f(0.1), 9.0, 15.0)
    # menisci: C-shaped wedges on the plateaus
    p["menisc_medial_c"] = (med * (cw + d(0.5)), 5.0 + d(0.5))
    p["menisc_lateral_c"] = (lat * (cw + d(0.5)), 5.0 + d(0.5))
    p["menisc_a"] = (15.5 * g * f(0.03), 21.0 * g * f(0.03))
    p["menisc_r_in"] = 0.45
    p["menisc_height"] = 8.5 * f(0.06)
    p["menisc_medial_opening"] = 40.0
    p["menisc_lateral_opening"] = 25.0
    p["tear_r"] = 0.78 + 0.03 * j * float(rng.uniform(-1, 1))
    p["tear_half_width"] = 0.1
    p["tear_ang0"] = 75.0  # tear from the body (90 deg = posterior ... ) to the posterior horn
    # cruciate ligaments (femoral end, tibial end, radius)
    p["ACL"] = ((lat * 6.0 + d(0.5), 20.0 + d(), 15.0 + d(0.5)), (med * 1.5 + d(0.5), -8.0 + d(), -1.0), 3.6 * f(0.05))
    p["PCL"] = ((med * 6.0 + d(0.5), -1.0 + d(), 15.0 + d(0.5)), (med * 1.0, 28.0 + d(), -11.0 + d()), 4.0 * f(0.05))
    c_acl = 0.5 + 0.06 * j * float(rng.uniform(-1, 1))
    c_pcl = 0.5 + 0.06 * j * float(rng.uniform(-1, 1))
    p["ACL_gap"] = (c_acl - 0.13, c_acl + 0.13)
    p["PCL_gap"] = (c_pcl - 0.12, c_pcl + 0.12)
    # collateral ligaments
    p["MCL"] = ((med * (cw + cond_a[0] + 3.0), 4.0 + d(), 26.0 + d()),
                (med * (39.0 * g + 2.5), 6.0 + d(), -42.0 + d()), 2.4 * f(0.05))
    p["LCL"] = ((lat * (cw + cond_a[0] + 2.5), 10.0 + d(), 24.0 + d()),
                (fh[0] + lat * 4.0, fh[1] - 2.0, fh[2] + 5.0), 2.4 * f(0.05))
    p["oedema_width"] = 6.0
    centre = (d(2.0) * scale, d(2.0) * scale, d(2.0) * scale)
    return KneeAnatomy(scale=float(scale), centre=centre, side=side, p=p)


# --------------------------------------------------------------------------------------------
# series geometry and acquisition
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesGeometry:
    """Grid of one series.

    Attributes:
        orientation: ``"sag"``, ``"cor"`` or ``"ax"``.
        size: number of voxels along the image axes ``(i, j, k)`` (SimpleITK order: columns,
            rows, slices); the numpy array of the image has shape ``(k, j, i)``.
        spacing: ``(in-plane, in-plane, slice thickness)`` in mm.
        origin: world LPS position (mm) of voxel ``(0, 0, 0)``'s centre.
        direction: 3x3 direction matrix; column ``n`` is the LPS unit vector of image axis ``n``
            (column 2 = slice normal).
    """

    orientation: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def points(self, normal_offsets_mm: Sequence[float] = (0.0,)) -> Coords:
        """World coordinates (mm) of the voxel centres, each shifted along the slice normal.

        Returns:
            ``(x, y, z)`` float32 arrays of shape ``(len(offsets), k, j, i)``.
        """
        ni, nj, nk = self.size
        D = self.direction
        ii = (np.arange(ni, dtype=np.float32) * np.float32(self.spacing[0]))[None, None, None, :]
        jj = (np.arange(nj, dtype=np.float32) * np.float32(self.spacing[1]))[None, None, :, None]
        kk = (np.arange(nk, dtype=np.float32) * np.float32(self.spacing[2]))[None, :, None, None]
        kk = kk + np.asarray(normal_offsets_mm, dtype=np.float32)[:, None, None, None]
        out = []
        for r in range(3):
            out.append((np.float32(self.origin[r]) + np.float32(D[r, 0]) * ii + np.float32(D[r, 1]) * jj
                        + np.float32(D[r, 2]) * kk).astype(np.float32))
        shape = (len(normal_offsets_mm), nk, nj, ni)
        return tuple(np.broadcast_to(o, shape) for o in out)  # type: ignore[return-value]

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """Wrap a numpy array of shape ``(k, j, i)`` as a SimpleITK image on this grid."""
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(float(s) for s in self.spacing))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return img


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * K @ K


def series_geometry(orientation: str, site: SiteProfile, scale: float = DEFAULT_SCALE,
                    centre: Sequence[float] = (0.0, 0.0, 0.0), rotation: np.ndarray | None = None,
                    fov_mm: Mapping[str, tuple] | None = None) -> SeriesGeometry:
    """Grid of a series covering the knee: site spacing, FOV :data:`FOV_MM` times ``scale``.

    Args:
        orientation: plane (``sag``, ``cor``, ``ax`` or an alias).
        site: in-plane spacing and slice thickness (mm) come from it.
        scale: anatomy scale; the field of view scales with it.
        centre: world LPS point (mm) the FOV is placed around (the knee centre).
        rotation: optional 3x3 rotation applied to the direction (oblique series).
        fov_mm: overrides :data:`FOV_MM` (same layout).

    Returns:
        The geometry; the number of voxels per axis is ``round(extent * scale / spacing)`` (at least 1).
    """
    o = normalize_orientation(orientation)
    ci, cj = (np.asarray(v, float) for v in _INPLANE_AXES[o])
    D = np.stack([ci, cj, np.cross(ci, cj)], axis=1)
    if rotation is not None:
        D = np.asarray(rotation, float) @ D
    box = (fov_mm or FOV_MM)[o]
    spacing = (float(site.in_plane_spacing_mm), float(site.in_plane_spacing_mm), float(site.slice_thickness_mm))
    sizes, mids = [], np.zeros(3)
    for n in range(3):  # image axis n runs along patient axis `ax`
        base = _INPLANE_AXES[o][n] if n < 2 else tuple(np.cross(ci, cj))
        ax = int(np.argmax(np.abs(base)))
        lo, hi = box[ax]
        sizes.append(max(1, int(round((hi - lo) * scale / spacing[n]))))
        mids[ax] = 0.5 * (lo + hi) * scale
    size = (sizes[0], sizes[1], sizes[2])
    c = np.asarray(centre, float) + mids
    half = D @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    origin = c - half
    return SeriesGeometry(orientation=o, size=size, spacing=spacing,
                          origin=(float(origin[0]), float(origin[1]), float(origin[2])), direction=D)


def _slab_offsets(thickness_mm: float) -> list[float]:
    """Offsets (mm) along the slice normal of the sub-samples: centres of equal sub-slabs."""
    t = float(thickness_mm)
    return [(m + 0.5) / N_SUBSAMPLES * t - 0.5 * t for m in range(N_SUBSAMPLES)]


def _acquire_series(anatomy: KneeAnatomy, geom: SeriesGeometry, abn: Mapping[str, bool],
                    rng: np.random.Generator, site: SiteProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noiseless signal (slab mean), labels (centre) and stored image of one series, numpy ``(k, j, i)``."""
    x, y, z = geom.points(_slab_offsets(geom.spacing[2]))
    lab, sig = anatomy.render(x, y, z, abn)
    clean = sig.mean(axis=0)
    label = np.ascontiguousarray(lab[N_SUBSAMPLES // 2])
    image = acquire(clean, rng, site)
    return clean.astype(np.float32), label, image


# --------------------------------------------------------------------------------------------
# exams
# --------------------------------------------------------------------------------------------
@dataclass
class KneeExam:
    """One synthetic exam: per-orientation series and label maps, and the abnormality labels.

    Attributes:
        seed: the exam's seed (acquisition randomness).
        anatomy_seed: the seed of the virtual knee (the same for two exams of one patient).
        site: the acquiring site.
        abnormalities: abnormality name -> 0/1, for all of :data:`KNEE_ABNORMALITIES`.
        images: orientation -> float32 SimpleITK image (stored values).
        labels: orientation -> uint8 SimpleITK label map on the identical grid.
        anatomy: the virtual knee (world <-> anatomy mapping, :meth:`KneeAnatomy.roi`).
        geometries: orientation -> grid.
        clean: orientation -> noiseless signal (numpy ``(k, j, i)``, before site effects).
    """

    seed: int
    anatomy_seed: int
    site: SiteProfile
    abnormalities: dict[str, int]
    images: dict[str, sitk.Image] = field(default_factory=dict)
    labels: dict[str, sitk.Image] = field(default_factory=dict)
    anatomy: KneeAnatomy | None = None
    geometries: dict[str, SeriesGeometry] = field(default_factory=dict)
    clean: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def orientations(self) -> tuple[str, ...]:
        return tuple(self.images)

    def __getitem__(self, orientation: str) -> tuple[sitk.Image, sitk.Image]:
        """``(image, label)`` of one orientation."""
        o = normalize_orientation(orientation)
        return self.images[o], self.labels[o]

    def arrays(self, orientation: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image, label)`` numpy arrays ``(k, j, i)`` = (slices, rows, columns) of one orientation."""
        img, lab = self[orientation]
        return sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)


def _abnormality_dict(abnormalities: Mapping[str, bool] | None) -> dict[str, int]:
    abn = {k: 0 for k in KNEE_ABNORMALITIES}
    for k, v in (abnormalities or {}).items():
        if k not in abn:
            raise ValueError(f"unknown abnormality {k!r}; known: {list(KNEE_ABNORMALITIES)}")
        abn[k] = int(bool(v))
    return abn


def make_exam(seed: int, abnormalities: Mapping[str, bool] | None = None, site: SiteProfile = SITE_3T,
              orientations: Sequence[str] = ORIENTATIONS, *, scale: float = DEFAULT_SCALE,
              obliquity_deg: float = 0.0, side: str = "right", anatomy_seed: int | None = None,
              jitter: float = 1.0, fov_mm: Mapping[str, tuple] | None = None) -> KneeExam:
    """Generate one exam: the same virtual knee acquired in each requested plane.

    Args:
        seed: acquisition seed (noise, bias field, obliquity); also the anatomy seed by default.
        abnormalities: name -> present, for names of :data:`KNEE_ABNORMALITIES` (missing = 0).
        site: acquiring site (spacing in mm, field strength, vendor scaling, noise).
        orientations: planes to acquire (``sag``, ``cor``, ``ax`` or aliases).
        scale: anatomy and field-of-view scale (world mm per anatomical mm); 1.0 = adult size
            (about 2x the default pixel counts per in-plane axis and slices).
        obliquity_deg: each series is rotated by a random angle in ``[-obliquity_deg, obliquity_deg]``
            degrees about a random axis (0 = straight planes).
        side: ``"right"`` or ``"left"`` knee.
        anatomy_seed: seed of the virtual knee (default ``seed``); give two exams the same one to
            simulate a patient scanned twice.
        jitter: amount of random anatomical variation (0 = the mean knee).
        fov_mm: overrides :data:`FOV_MM`.

    Returns:
        The exam; arrays are float32 (images) and uint8 (labels), numpy layout ``(k, j, i)``.
    """
    abn = _abnormality_dict(abnormalities)
    aseed = int(seed if anatomy_seed is None else anatomy_seed)
    anatomy = sample_anatomy(np.random.default_rng([aseed, 0]), scale=scale, side=side, jitter=jitter)
    exam = KneeExam(seed=int(seed), anatomy_seed=aseed, site=site, abnormalities=abn, anatomy=anatomy)
    flags = {k: bool(v) for k, v in abn.items()}
    for orientation in orientations:
        o = normalize_orientation(orientation)
        rng = np.random.default_rng([int(seed), 1 + _PLANE_INDEX[o]])
        axis = rng.standard_normal(3)
        angle = np.radians(obliquity_deg) * rng.uniform(-1.0, 1.0)
        rot = _rotation(axis, angle) if obliquity_deg > 0 else None
        geom = series_geometry(o, site, scale=scale, centre=anatomy.centre, rotation=rot, fov_mm=fov_mm)
        clean, label, image = _acquire_series(anatomy, geom, flags, rng, site)
        exam.geometries[o] = geom
        exam.clean[o] = clean
        exam.images[o] = geom.to_sitk(image)
        exam.labels[o] = geom.to_sitk(label)
    return exam


def abnormality_roi(exam: KneeExam, name: str, orientation: str) -> np.ndarray:
    """Boolean mask ``(k, j, i)`` of where abnormality ``name`` shows in one series.

    A voxel is in the region when any of its slab sub-samples (:data:`N_SUBSAMPLES` across the
    slice thickness) is.
    Computed from the exam's anatomy whether or not the abnormality is present (see
    :meth:`KneeAnatomy.roi`); meant for tests and demos.
    """
    o = normalize_orientation(orientation)
    geom = exam.geometries[o]
    x, y, z = geom.points(_slab_offsets(geom.spacing[2]))
    return exam.anatomy.roi(name, x, y, z).any(axis=0)


def sample_abnormalities(rng: np.random.Generator, prevalence: float = 0.35) -> dict[str, int]:
    """Independent Bernoulli(``prevalence``) draw of each of :data:`KNEE_ABNORMALITIES` (0/1)."""
    draws = rng.random(len(KNEE_ABNORMALITIES))
    return {k: int(u < prevalence) for k, u in zip(KNEE_ABNORMALITIES, draws)}


def write_site(out_dir: Path, site: SiteProfile, n_cases: int, seed: int,
               orientations: Sequence[str] = ORIENTATIONS, file_ending: str = ".nii.gz",
               with_labels: bool = True, prevalence: float = 0.35, patients_with_two_exams: int = 0,
               *, case_prefix: str = "EXAM", patient_prefix: str = "PAT", scale: float = DEFAULT_SCALE,
               obliquity_deg: float = 0.0) -> Path:
    """Write a synthetic site: series, label maps and a ``manifest.csv`` (docs/CONTRACTS.md).

    Files: ``out_dir/images/<case>_<orient><ending>`` and ``out_dir/labels/<case>_<orient><ending>``;
    the manifest has one row per series with paths relative to ``out_dir``, the ``orientation``
    column left blank (the converter detects it), ``label`` blank when ``with_labels`` is false,
    and 0/1 in the 8 abnormality columns.

    Args:
        out_dir: site folder (created).
        site: the acquiring site (its name, field strength and vendor go to the manifest).
        n_cases: number of exams.
        seed: all randomness (abnormalities, anatomies, acquisitions) derives from it.
        orientations: planes written per exam.
        file_ending: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` or ``.mhd``.
        with_labels: write label maps and fill the ``label`` column.
        prevalence: probability of each abnormality (independent).
        patients_with_two_exams: the first this many patients have two exams (same anatomy,
            independent abnormalities and acquisition); ``n_cases`` counts exams.
        case_prefix: source exam ids are ``f"{case_prefix}-{n:04d}"``.
        patient_prefix: source patient ids are ``f"{patient_prefix}-{n:04d}"``.
        scale: anatomy scale (see :func:`make_exam`).
        obliquity_deg: maximal random obliquity per series (degrees).

    Returns:
        Path of the written ``manifest.csv``.
    """
    if file_ending not in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        raise ValueError(f"unsupported file ending {file_ending!r}")
    if not 0 <= 2 * patients_with_two_exams <= n_cases:
        raise ValueError("patients_with_two_exams must be between 0 and n_cases / 2")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if with_labels:
        (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    orients = [normalize_orientation(o) for o in orientations]
    ss = np.random.SeedSequence(int(seed))
    abn_rng = np.random.default_rng(ss.spawn(1)[0])
    exam_seeds = [int(s.generate_state(1)[0]) for s in ss.spawn(n_cases)]
    rows = []
    patient = 0
    n = 0
    while n < n_cases:
        patient += 1
        n_exams = 2 if patient <= patients_with_two_exams else 1
        anatomy_seed = exam_seeds[n]
        for _ in range(n_exams):
            n += 1
            case_id = f"{case_prefix}-{n:04d}"
            abn = sample_abnormalities(abn_rng, prevalence)
            exam = make_exam(exam_seeds[n - 1], abn, site, orients, scale=scale, obliquity_deg=obliquity_deg,
                             anatomy_seed=anatomy_seed)
            for o in orients:
                img_rel = f"images/{case_id}_{o}{file_ending}"
                sitk.WriteImage(exam.images[o], str(out_dir / img_rel), True)
                lab_rel = ""
                if with_labels:
                    lab_rel = f"labels/{case_id}_{o}{file_ending}"
                    sitk.WriteImage(exam.labels[o], str(out_dir / lab_rel), True)
                rows.append({
                    "case_id": case_id, "patient_id": f"{patient_prefix}-{patient:04d}", "site": site.name,
                    "field_strength": f"{site.field_strength_t:g}", "vendor": site.vendor, "image": img_rel,
                    "orientation": "", "label": lab_rel, **{k: abn[k] for k in KNEE_ABNORMALITIES},
                })
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
