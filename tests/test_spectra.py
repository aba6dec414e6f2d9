"""Tests for torchdrr.physics.spectra: tabulated W spectra, presets, filtration, mean energy and air-kerma HVL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchdrr.physics import materials, spectra

AL = materials.Material("aluminum", {"Al": 1.0}, 2.699)


def _mu_al_per_mm(energy_keV: float) -> float:
    return float(materials.mass_attenuation(AL, energy_keV)) * AL.density / 10.0


# --- SpekPy reference (design.md): 120 kVp, 12 deg W anode, 2.5 mm Al -> 54.4 keV mean, 4.2 mm Al first HVL ------
def test_spekpy_reference_mean_energy_and_hvl() -> None:
    e, n = spectra.spectrum(120, filtration_mm_al=2.5)
    assert spectra.mean_energy(e, n) == pytest.approx(54.4, rel=0.02)
    assert spectra.half_value_layer(e, n) == pytest.approx(4.2, rel=0.05)


@pytest.mark.parametrize("kvp", [40, 60, 90, 120.0, 150, 77.3])
def test_spectrum_normalised_and_zero_above_kvp(kvp: float) -> None:
    e, n = spectra.spectrum(kvp, filtration_mm_al=2.0)
    assert e.dtype == torch.float64 and n.dtype == torch.float64 and e.shape == n.shape and e.ndim == 1
    assert float(n.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((n >= 0).all())
    assert float(e.max()) <= kvp  # last bin centre within the kVp: nothing above it
    assert float(n[-1]) > 0
    assert torch.allclose(torch.diff(e), torch.ones(e.numel() - 1, dtype=torch.float64))


def test_table_covers_kvp_range() -> None:
    e, kvps, table = spectra._spectra_table()
    assert (kvps[0], kvps[-1]) == spectra.KVP_RANGE
    assert np.array_equal(kvps, np.arange(40, 151))
    # Integer kVp: the spectrum is exactly the (renormalised) table column.
    _, n = spectra.spectrum(97)
    col = table[: n.numel(), 97 - 40]
    assert np.allclose(n.numpy(), col / col.sum(), rtol=1e-14)
    assert np.all(table[e > 97, 97 - 40] == 0)


def test_fractional_kvp_lies_between_neighbours() -> None:
    m = [spectra.mean_energy(*spectra.spectrum(k, 3.0)) for k in (80, 80.5, 81)]
    assert m[0] < m[1] < m[2]


def test_energy_bin_width_rebins_without_losing_photons() -> None:
    e1, n1 = spectra.spectrum(90, 4.0)
    e5, n5 = spectra.spectrum(90, 4.0, energy_bin_keV=5)
    assert float(e5[1] - e5[0]) == 5.0
    assert float(n5.sum()) == pytest.approx(1.0)
    assert spectra.mean_energy(e5, n5) == pytest.approx(spectra.mean_energy(e1, n1), rel=0.01)
    with pytest.raises(ValueError, match="energy_bin_keV"):
        spectra.spectrum(90, energy_bin_keV=0.5)


# --- DeepDRR presets ---------------------------------------------------------------------------------------------
def test_presets() -> None:
    assert spectra.PRESETS == {"60kVp": (60, 3.5), "90kVp": (90, 4.0), "120kVp": (120, 4.3)}
    assert spectra.DEFAULT_PRESET == "90kVp"
    e, n = spectra.spectrum_preset()
    e90, n90 = spectra.spectrum(90, 4.0)
    assert torch.equal(e, e90) and torch.equal(n, n90)
    means = [spectra.mean_energy(*spectra.spectrum_preset(k)) for k in ("60kVp", "90kVp", "120kVp")]
    assert means == sorted(means)
    with pytest.raises(ValueError, match="60kVp.*90kVp"):
        spectra.spectrum_preset("100kVp")


# --- HVL and filtration physics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("energy", [20.0, 60.0, 100.0])
def test_monoenergetic_hvl_is_ln2_over_mu(energy: float) -> None:
    hvl = spectra.half_value_layer([energy], [1.0])
    assert hvl == pytest.approx(math.log(2.0) / _mu_al_per_mm(energy), rel=1e-6)


def test_aluminium_attenuation_matches_nist() -> None:
    # NIST XCOM/SRD 126 aluminium mu/rho at 60 keV: 0.2778 cm^2/g (guards the Al definition used by the HVL).
    assert _mu_al_per_mm(60.0) * 10.0 / 2.699 == pytest.approx(0.2778, rel=0.02)


def test_hvl_is_air_kerma_weighted() -> None:
    # Two lines of equal photon count: kerma weighting (E * mu_en/rho_air) favours the 20 keV line so strongly
    # (mu_en/rho: 0.539 vs 0.0304 cm^2/g) that the HVL must sit far below the fluence-weighted answer.
    e, n = [20.0, 60.0], [1.0, 1.0]
    hvl = spectra.half_value_layer(e, n)
    w = np.array([20 * 0.5389, 60 * 0.03041])
    mu = np.array([_mu_al_per_mm(20.0), _mu_al_per_mm(60.0)])
    ratio = float((w * np.exp(-mu * hvl)).sum() / w.sum())
    assert ratio == pytest.approx(0.5, rel=2e-3)  # tabulated mu_en at the nodes, so log-log interp is exact there
    fluence = float((np.exp(-mu * hvl)).sum() / 2)
    assert fluence > 0.55


def test_air_mu_en_interpolation() -> None:
    got = spectra.air_mass_energy_absorption(torch.tensor([20.0, 60.0, 3.203]))
    assert torch.allclose(got, torch.tensor([0.5389, 0.03041, 146.0], dtype=torch.float64))  # above the Ar edge
    mid = float(spectra.air_mass_energy_absorption(45.0))
    assert 0.03041 < mid < 0.06833


def test_filtration_hardens_beam() -> None:
    e, n = spectra.spectrum(90)
    soft = (spectra.mean_energy(e, n), spectra.half_value_layer(e, n))
    n2 = spectra.filter(e, n, "Al", 3.0)
    hard = (spectra.mean_energy(e, n2), spectra.half_value_layer(e, n2))
    assert hard[0] > soft[0] and hard[1] > soft[1]
    assert float(n2.sum()) < float(n.sum())  # not renormalised


def test_filter_is_beer_lambert_and_composes() -> None:
    e, n = spectra.spectrum(100)
    once = spectra.filter(e, n, "aluminum", 3.0)
    twice = spectra.filter(e, spectra.filter(e, n, "Al", 1.0), "Al", 2.0)
    assert torch.allclose(once, twice, rtol=1e-12)
    assert torch.equal(spectra.filter(e, n, "Al", 0.0), n)
    # spectrum(kvp, mm) is the unfiltered table spectrum filtered by Al, renormalised.
    _, nf = spectra.spectrum(100, 3.0)
    assert torch.allclose(nf, once / once.sum(), rtol=1e-12)
    water = spectra.filter([60.0], [1.0], "water", 10.0)
    expected = math.exp(-float(materials.mass_attenuation("water", 60.0)) * 1.0 * 1.0)
    assert float(water[0]) == pytest.approx(expected, rel=1e-12)


# --- Bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kvp", [39.9, 151, float("nan"), "abc"])
def test_kvp_outside_tables(kvp) -> None:
    with pytest.raises(ValueError, match="kvp"):
        spectra.spectrum(kvp)


def test_bad_thickness_material_and_spectra() -> None:
    e, n = spectra.spectrum(90)
    with pytest.raises(ValueError, match="thickness_mm"):
        spectra.filter(e, n, "Al", -1.0)
    with pytest.raises(ValueError, match="filtration_mm_al"):
        spectra.spectrum(90, filtration_mm_al=-0.1)
    with pytest.raises(ValueError, match="unobtainium"):
        spectra.filter(e, n, "unobtainium", 1.0)
    bad = n.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="photons.*finite"):
        spectra.mean_energy(e, bad)
    bad[3] = -1.0
    with pytest.raises(ValueError, match="photons.*non-negative"):
        spectra.half_value_layer(e, bad)
    with pytest.raises(ValueError, match="photons.*shape"):
        spectra.filter(e, n[:-1], "Al", 1.0)
    with pytest.raises(ValueError, match="photons.*zero"):
        spectra.mean_energy(e, torch.zeros_like(n))
    with pytest.raises(ValueError, match="energy_keV"):
        spectra.mean_energy(-e, n)
    with pytest.raises(ValueError, match="energy_keV"):
        spectra.mean_energy(torch.stack([e, e]), torch.stack([n, n]))


# --- Optional: agreement with SpekPy itself, only where the optional extra is installed ----------------------------
def test_against_spekpy_when_installed() -> None:
    spekpy = pytest.importorskip("spekpy")
    s = spekpy.Spek(kvp=120, th=12, dk=1)
    s.filter("Al", 2.5)
    e, n = spectra.spectrum(120, 2.5)
    assert spectra.mean_energy(e, n) == pytest.approx(s.get_emean(), rel=0.005)
    assert spectra.half_value_layer(e, n) == pytest.approx(s.get_hvl1(), rel=0.01)
