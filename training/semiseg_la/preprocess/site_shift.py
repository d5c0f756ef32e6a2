"""A site-shift simulator: what another scanner or protocol does to an LGE-MRI scan.

A user's scans come from another site: another contrast curve, another coil (bias field), thicker
slices, more noise. No second-site LA data exist here, so tests and benchmarks pass held-out cases
through these families to see what a model loses and what fine-tuning wins back.

Each family takes a `strength` (0 = unchanged, 1 = a clearly different but plausible site) and a
`seed`. The seed fixes the *site* (its contrast curve, its slice thickness); `case_seed` varies what
differs from scan to scan at one site (bias field, noise). Every output keeps the input's grid, so the
input's label still fits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io.volume import Volume

#: intensities are mapped to [0, 1] between these percentiles before a contrast curve, and back after
ROBUST_PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass(frozen=True)
class SiteShift:
    """One simulated site: `family` (see `FAMILIES`), `strength` and `seed`."""

    family: str
    strength: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InputError(f"unknown site-shift family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if not np.isfinite(self.strength) or self.strength < 0:
            raise InputError(f"site-shift strength must be a finite number >= 0, got {self.strength}")

    def apply(self, volume: Volume, case_seed: int = 0) -> Volume:
        """The volume as this site would have acquired it, on the same grid (float32)."""
        if volume.array.ndim != 3:
            raise InputError(f"{volume.source}: site shift needs a 3D image, got shape {volume.shape}")
        return volume.with_array(self.apply_array(volume.array, volume.spacing, case_seed))

    def apply_array(self, array: np.ndarray, spacing: Sequence[float], case_seed: int = 0) -> np.ndarray:
        """`apply` on a bare (X, Y, Z) array with its voxel spacing in mm (float32 out)."""
        data = np.asarray(array, dtype=np.float64)
        site_rng = np.random.default_rng([self.seed, 0])
        case_rng = np.random.default_rng([self.seed, 1, case_seed])
        for step in FAMILIES[self.family]:
            data = step(data, spacing, self.strength, site_rng, case_rng)
        return data.astype(np.float32)

    def describe(self) -> str:
        return f"{self.family} (strength {self.strength:g}, seed {self.seed})"


Step = Callable[[np.ndarray, Sequence[float], float, np.random.Generator, np.random.Generator], np.ndarray]


# -- intensity helpers ------------------------------------------------------------------------------
def _to_unit(array: np.ndarray) -> Tuple[np.ndarray, float, float]:
    low, high = np.percentile(array, ROBUST_PERCENTILES)
    if high <= low:
        high = low + 1.0
    return (array - low) / (high - low), float(low), float(high)


def _curve(apply_unit: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Apply a [0, 1] -> [0, 1] curve to the robust range; the tails beyond it keep their offset, so an
    identity curve (strength 0) leaves every voxel as it was."""

    def run(array: np.ndarray) -> np.ndarray:
        unit, low, high = _to_unit(array)
        inside = np.clip(unit, 0.0, 1.0)
        return (apply_unit(inside) + (unit - inside)) * (high - low) + low

    return run


# -- contrast families (one curve per site) ------------------------------------------------------------
def contrast_gamma(array, spacing, strength, site_rng, case_rng):
    """A gamma curve: gamma = exp(+-0.8 strength), the sign chosen by the site."""
    gamma = float(np.exp(0.8 * strength * (1 if site_rng.random() < 0.5 else -1)))
    return _curve(lambda u: u ** gamma)(array)


def contrast_piecewise(array, spacing, strength, site_rng, case_rng):
    """A monotone piecewise-linear curve through 4 inner knots moved by up to 0.25 strength."""
    knots_x = np.linspace(0, 1, 6)
    moved = knots_x[1:-1] + site_rng.uniform(-0.25, 0.25, 4) * strength
    knots_y = np.concatenate([[0.0], np.sort(np.clip(moved, 0.02, 0.98)), [1.0]])
    return _curve(lambda u: np.interp(u, knots_x, knots_y))(array)


def contrast_inversion(array, spacing, strength, site_rng, case_rng):
    """Part of the range reflected (a non-monotone curve): a band of width 0.35 strength is mirrored."""
    width = min(0.35 * strength, 0.9)
    start = float(site_rng.uniform(0.05, max(0.95 - width, 0.06)))
    stop = start + width

    def invert(u: np.ndarray) -> np.ndarray:
        inside = (u >= start) & (u <= stop)
        return np.where(inside, start + stop - u, u)

    return _curve(invert)(array)


# -- acquisition families -----------------------------------------------------------------------------
def bias_field(array, spacing, strength, site_rng, case_rng):
    """A smooth multiplicative field: a sum of low-frequency cosines over the physical field of view,
    peak-to-peak about 0.8 strength in log units (x2.2 at strength 1); multiplied on the positive range."""
    coords = [np.arange(n) * float(s) for n, s in zip(array.shape, spacing)]
    extent = [max(c[-1], 1.0) for c in coords]
    log_field = np.zeros(array.shape)
    for _ in range(4):
        freqs = case_rng.uniform(0.2, 1.2, 3)
        phases = case_rng.uniform(0, 2 * np.pi, 3)
        terms = [np.cos(2 * np.pi * f * c / e + p) for f, c, e, p in zip(freqs, coords, extent, phases)]
        log_field += terms[0][:, None, None] * terms[1][None, :, None] * terms[2][None, None, :]
    span = log_field.max() - log_field.min()
    log_field = (log_field - log_field.mean()) / (span if span > 0 else 1.0) * 0.8 * strength
    unit, low, high = _to_unit(array)
    return unit * np.exp(log_field) * (high - low) + low


def thick_slices(array, spacing, strength, site_rng, case_rng):
    """Slices 1 + 3 strength times thicker along the site's through-plane axis (a box slice profile,
    sampled at the thick spacing), interpolated back onto the input grid."""
    factor = 1.0 + 3.0 * strength
    axis = int(np.argmax(spacing)) if len(set(spacing)) > 1 else 2
    return _resample_axis(array, axis, factor)


def anisotropic(array, spacing, strength, site_rng, case_rng):
    """In-plane resolution lowered by 1 + 1.5 strength (both in-plane axes), back on the input grid."""
    factor = 1.0 + 1.5 * strength
    through = int(np.argmax(spacing)) if len(set(spacing)) > 1 else 2
    for axis in range(3):
        if axis != through:
            array = _resample_axis(array, axis, factor)
    return array


def _resample_axis(array: np.ndarray, axis: int, factor: float) -> np.ndarray:
    if factor <= 1.0 + 1e-6:
        return array
    size = array.shape[axis]
    averaged = ndimage.uniform_filter1d(array, size=max(int(round(factor)), 1), axis=axis, mode="nearest")
    thick_positions = np.arange(0, size - 1 + 1e-9, factor)
    thick = np.take(averaged, np.round(thick_positions).astype(int), axis=axis)
    if thick.shape[axis] < 2:
        return np.broadcast_to(thick, array.shape).copy()
    where = np.arange(size) / factor
    where = np.clip(where, 0, thick.shape[axis] - 1)
    lower = np.floor(where).astype(int)
    upper = np.minimum(lower + 1, thick.shape[axis] - 1)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = size
    weight = (where - lower).reshape(weight_shape)
    return np.take(thick, lower, axis=axis) * (1 - weight) + np.take(thick, upper, axis=axis) * weight


def noise_gaussian(array, spacing, strength, site_rng, case_rng):
    """Additive Gaussian noise, sigma = 0.08 strength of the robust range."""
    unit, low, high = _to_unit(array)
    return (unit + case_rng.normal(0, 0.08 * strength, array.shape)) * (high - low) + low


def noise_rician(array, spacing, strength, site_rng, case_rng):
    """Rician noise on the magnitude: |u + n1 + i n2| with sigma = 0.08 strength, on u >= 0."""
    if strength <= 0:
        return array
    unit, low, high = _to_unit(array)
    sigma = 0.08 * strength
    magnitude = np.hypot(np.clip(unit, 0, None) + case_rng.normal(0, sigma, array.shape),
                         case_rng.normal(0, sigma, array.shape))
    return magnitude * (high - low) + low


def blur(array, spacing, strength, site_rng, case_rng):
    """Gaussian blur of 1.2 strength mm (a softer reconstruction kernel)."""
    sigma_vox = [1.2 * strength / float(s) for s in spacing]
    return ndimage.gaussian_filter(array, sigma_vox, mode="nearest") if strength > 0 else array


def outliers(array, spacing, strength, site_rng, case_rng):
    """0.3 strength % of voxels set to bright spikes (1.5-3 x the robust maximum): artefacts, fat."""
    unit, low, high = _to_unit(array)
    count = int(round(unit.size * 0.003 * strength))
    flat = unit.reshape(-1).copy()
    picks = case_rng.choice(flat.size, size=count, replace=False) if count else np.empty(0, int)
    flat[picks] = case_rng.uniform(1.5, 3.0, count)
    return flat.reshape(unit.shape) * (high - low) + low


#: family name -> the steps it applies, in order
FAMILIES: Dict[str, List[Step]] = {
    "gamma": [contrast_gamma],
    "piecewise": [contrast_piecewise],
    "inversion": [contrast_inversion],
    "bias": [bias_field],
    "thick-slices": [thick_slices],
    "anisotropic": [anisotropic],
    "gaussian-noise": [noise_gaussian],
    "rician-noise": [noise_rician],
    "blur": [blur],
    "outliers": [outliers],
    # another scanner: its contrast curve and coil, thicker slices, magnitude noise
    "scanner": [contrast_piecewise, bias_field, thick_slices, noise_rician],
    # an older protocol: gamma contrast, blur, in-plane resolution, Gaussian noise
    "protocol": [contrast_gamma, blur, anisotropic, noise_gaussian],
    # a hard site: part of the range inverted, strong bias, outliers
    "artefacts": [contrast_inversion, bias_field, outliers],
}


def shift_families() -> List[str]:
    return list(FAMILIES)


#: the single families a training augmentation draws from: what differs between real sites. Inversion and
#: outliers are left out (artefacts, not acquisitions a model should learn to treat as normal).
AUGMENTATION_FAMILIES = ("gamma", "piecewise", "bias", "thick-slices", "anisotropic", "gaussian-noise",
                         "rician-noise", "blur")


def random_site_shifts(rng: np.random.Generator, families: Sequence[str] = AUGMENTATION_FAMILIES,
                       max_strength: float = 1.0, max_families: int = 3) -> List[SiteShift]:
    """A random site for one training sample: 1..`max_families` distinct families, each with a strength drawn
    from [0, `max_strength`] and its own seed, applied in the order they are listed in `families`."""
    count = int(rng.integers(1, min(max_families, len(families)) + 1))
    picked = sorted(rng.choice(len(families), size=count, replace=False))
    return [SiteShift(families[i], float(rng.uniform(0.0, max_strength)), int(rng.integers(2 ** 31)))
            for i in picked]
