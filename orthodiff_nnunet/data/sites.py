"""Site and acquisition effects shared by the synthetic generators (phantom and renderer).

These produce *synthetic* images for tests and the demo; they are never evidence of clinical
accuracy. The effects are the ones that make cross-site validation interesting:

* field strength -> signal-to-noise ratio and tissue contrast (1.5 T: noisier, flatter contrast),
* vendor -> a global intensity scale and offset (scanners store different value ranges),
* slice thickness -> partial-volume blurring across slices (done by each generator),
* a smooth multiplicative bias field (coil sensitivity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Mean signal (arbitrary units, before vendor scaling) of each of the 11 knee structures plus
#: the non-structure tissues, roughly a proton-density fat-suppressed look: bone marrow dark,
#: cartilage intermediate-bright, menisci and ligaments very dark, fluid bright.
TISSUE_SIGNAL: dict[str, float] = {
    "air": 0.0,
    "soft_tissue": 0.35,  # muscle / fat-suppressed fat around the joint
    "femur": 0.22,
    "tibia": 0.22,
    "patella": 0.22,
    "fibula": 0.22,
    "femoral_cartilage": 0.62,
    "tibial_cartilage": 0.62,
    "patellar_cartilage": 0.62,
    "medial_meniscus": 0.06,
    "lateral_meniscus": 0.06,
    "ACL": 0.12,
    "PCL": 0.08,
    "collateral_ligament": 0.08,
    "fluid": 0.95,  # effusion, tear signal, oedema
    "oedema": 0.75,
}


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition characteristics of one (synthetic) site.

    Attributes:
        name: site name written to the manifest (e.g. ``"SiteA"``).
        field_strength_t: field strength in tesla; SNR scales linearly with it.
        vendor: vendor name written to the manifest.
        vendor_scale: multiplicative intensity scale of this vendor's stored values.
        vendor_offset: additive offset of stored values.
        slice_thickness_mm: slice thickness (= spacing) of the 2D series, mm.
        in_plane_spacing_mm: in-plane pixel spacing, mm.
        snr_at_3t: signal-to-noise ratio of the brightest tissue at 3 T.
        bias_strength: peak relative amplitude of the smooth bias field (0 = none).
    """

    name: str = "SiteA"
    field_strength_t: float = 3.0
    vendor: str = "VendorA"
    vendor_scale: float = 1000.0
    vendor_offset: float = 0.0
    slice_thickness_mm: float = 3.0
    in_plane_spacing_mm: float = 0.8
    snr_at_3t: float = 25.0
    bias_strength: float = 0.2
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def snr(self) -> float:
        """SNR of the brightest tissue: proportional to field strength."""
        return self.snr_at_3t * self.field_strength_t / 3.0

    @property
    def contrast(self) -> float:
        """Tissue contrast factor: 1 at 3 T, flatter (towards the mean) at lower field."""
        return float(np.clip(0.55 + 0.15 * self.field_strength_t, 0.5, 1.2))


#: Two sites used by the demo and tests: a 3 T training site and a 1.5 T external site.
SITE_3T = SiteProfile(name="SiteA", field_strength_t=3.0, vendor="VendorA", vendor_scale=1000.0,
                      slice_thickness_mm=3.0, in_plane_spacing_mm=0.8)
SITE_15T = SiteProfile(name="SiteB", field_strength_t=1.5, vendor="VendorB", vendor_scale=2500.0,
                       vendor_offset=100.0, slice_thickness_mm=3.5, in_plane_spacing_mm=0.9)


def apply_contrast(signal: np.ndarray, site: SiteProfile) -> np.ndarray:
    """Pull tissue signal towards its mean for sites with less contrast."""
    mean = float(signal.mean())
    return mean + (signal - mean) * site.contrast


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field ``1 + strength * p(x)``, p a random low-order polynomial in [-1, 1]."""
    if strength <= 0:
        return np.ones(shape, dtype=np.float32)
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape], indexing="ij")
    poly = np.zeros(shape, dtype=np.float32)
    for g in grids:
        poly += rng.uniform(-1, 1) * g + rng.uniform(-0.5, 0.5) * g * g
    poly /= max(float(np.abs(poly).max()), 1e-6)
    return (1.0 + strength * poly).astype(np.float32)


def acquire(signal: np.ndarray, rng: np.random.Generator, site: SiteProfile) -> np.ndarray:
    """Contrast, bias field, Rician noise and vendor scaling of a noiseless signal image.

    Args:
        signal: noiseless magnitude signal, any shape, values roughly in [0, 1].
        rng: the caller's generator (all randomness comes from it).
        site: the acquiring site.

    Returns:
        float32 stored values (vendor scale and offset applied), never negative.
    """
    s = apply_contrast(signal.astype(np.float32), site)
    s = s * bias_field(signal.shape, rng, site.bias_strength)
    sigma = 1.0 / site.snr
    real = s + rng.normal(0.0, sigma, size=s.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=s.shape).astype(np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician magnitude noise, as in MRI
    return (magnitude * site.vendor_scale + site.vendor_offset).astype(np.float32)
