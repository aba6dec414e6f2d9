"""The Monte Carlo transport (torchdrr.physics.montecarlo, csrc/montecarlo): self-consistency with the analytic DRR,
a published Monte Carlo benchmark (AAPM TG-195 Case 2), the physics trends of scatter, reproducibility, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from torchdrr import DRR
from torchdrr.geometry.camera import Camera, intrinsic_matrix
from torchdrr.learned.scatter import ScatterCNN
from torchdrr.ops import camera_raycast
from torchdrr.physics import (
    AntiScatterGrid,
    EnergyIntegratingDetector,
    Material,
    MaterialChannels,
    MonteCarloScatter,
    PhotonCountingDetector,
    attenuation_table,
    register_material,
    spectrum_preset,
    transport,
)
from torchdrr.physics.detector import falloff_factor
from torchdrr.physics.scatter_data import transport_tables

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Small test runs are noisy per pixel by design (the tests sum over regions); the warning is tested on its own.
QUIET = pytest.mark.filterwarnings("ignore:the scatter estimate is noisy")


def _axial_camera(sdd: float, pixels: int, pitch: float, device: str = "cpu") -> Camera:
    """A source at the world origin looking along +z onto a centred pixels x pixels detector at z = sdd."""
    k = intrinsic_matrix(sdd, pixels, pixels, (pitch, pitch))
    eye = torch.eye(3, dtype=torch.float64)
    return Camera(k, eye, torch.zeros(3, dtype=torch.float64), pixels, pixels, sdd).to(device)


def _slab(thickness_mm: float, lateral_mm: float, z_front_mm: float, voxel_mm: float = 10.0):
    """Water slab centred on the z axis: densities [1, n, n, nz] and affine (voxel centres on a regular grid)."""
    n = max(1, round(lateral_mm / voxel_mm))
    nz = max(1, round(thickness_mm / voxel_mm))
    densities = torch.ones(1, n, n, nz)
    affine = torch.diag(torch.tensor([lateral_mm / n, lateral_mm / n, thickness_mm / nz, 1.0], dtype=torch.float64))
    affine[0, 3] = affine[1, 3] = -lateral_mm / 2 + lateral_mm / n / 2
    affine[2, 3] = z_front_mm + thickness_mm / nz / 2
    return densities, affine


# --- self-consistency: the Monte Carlo primary is the analytic polychromatic primary --------------------------------


@QUIET
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_primary_matches_analytic_polychromatic_primary(device):
    """With two materials and a 90 kVp spectrum, every pixel's primary agrees with the analytic DRR's expectation
    within its standard error: chi-square per pixel ~ 1 and no pixel beyond 5 sigma. The analytic image averages 64
    sub-rays per pixel, as the Monte Carlo aims its photons over the whole pixel."""
    densities = torch.zeros(2, 12, 12, 12)
    densities[0, 1:11, 1:11, 2:10] = 1.06  # soft tissue block
    densities[1, 4:8, 3:9, 4:8] = 1.92  # a bone block inside it
    densities[0, 4:8, 3:9, 4:8] = 0.0
    affine = torch.diag(torch.tensor([8.0, 8.0, 8.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = -44.0 + 500.0 * torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    camera = _axial_camera(1000.0, 20, 6.0, device)
    energy, photons = spectrum_preset("90kVp")
    materials = ["soft tissue", "cortical bone"]
    result = transport(densities.to(device), affine, materials, camera, (energy, photons), photons_per_pixel=4000,
                       seed=11)  # fmt: skip
    sources, rays = camera.ray_parameters(dtype=torch.float64)
    integrals = camera_raycast(densities.double().to(device), affine, sources, rays, 20, 20, supersample=8) / 10.0
    mu = attenuation_table(materials, energy).to(device)
    p = (photons / photons.sum()).to(device)
    analytic = (p * energy.to(device) * torch.exp(-integrals @ mu)).sum(-1).reshape(1, 20, 20, 64).mean(-1)
    z = (result.primary - analytic) / result.primary_error
    dof = z.numel()
    assert abs(float((z**2).mean()) - 1.0) < 5 * math.sqrt(2.0 / dof)
    assert float(z.abs().max()) < 5.0
    # The bone block is in the image: the test compares more than a flat field.
    assert float(analytic.min()) < 0.5 * float(analytic.max())


# --- physics: AAPM TG-195 Case 2 -------------------------------------------------------------------------------------

# AAPM Task Group 195 (Sechopoulos et al., "Monte Carlo reference data sets for imaging research", Med. Phys. 42(10):
# 5679-5691, 2015), Case 2 (radiography), 56.4 keV: energy deposited in the 39 x 39 x 20 cm ICRU soft-tissue box per
# emitted photon, in eV, by EGSnrc, Geant4, MCNP and PENELOPE. The values and the case's geometry (source at z = 0,
# box from z = 155 to 175 cm, world of air, field collimated to 39 x 39 cm at 180 cm) as tabulated in the
# XRayMClib/DXMClib validation (github.com/medicalphysics/XRayMClib, validation/data/TG195results.txt).
TG195_CASE2_MONO_EV = {"EGSnrc": 33171.0, "Geant4": 33205.4, "MCNP": 33134.9, "PENELOPE": 33174.3}


def _tg195_case2(device: str, photons_per_pixel: float) -> tuple[float, float]:
    for name, composition, density in (
        (
            "TG-195 soft tissue",
            {
                "H": 0.105,
                "C": 0.256,
                "N": 0.027,
                "O": 0.602,
                "Na": 0.001,
                "P": 0.002,
                "S": 0.003,
                "Cl": 0.002,
                "K": 0.002,
            },
            1.03,
        ),  # fmt: skip
        ("TG-195 air", {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827}, 0.001205),
    ):
        register_material(Material(name, composition, density), overwrite=True)
    # x, y in [-300, 300] mm (15 mm voxels), z in [0, 1800] mm (50 mm voxels): air, with the box at 1550-1750 mm.
    centres = torch.arange(40) * 15.0 - 292.5
    z_centres = torch.arange(36) * 50.0 + 25.0
    lateral = centres.abs() < 195.0
    box = lateral[:, None, None] & lateral[None, :, None] & ((z_centres > 1550) & (z_centres < 1750))[None, None, :]
    densities = torch.zeros(2, 40, 40, 36)
    densities[0] = torch.where(box, 0.0, 0.001205)
    densities[1] = torch.where(box, 1.03, 0.0)
    affine = torch.diag(torch.tensor([15.0, 15.0, 50.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-292.5, -292.5, 25.0], dtype=torch.float64)
    camera = _axial_camera(1800.0, 39, 10.0, device)
    # An isotropic point source: emission per area on the detector falls as cos^3 (the detector's falloff); TG-195
    # counts every emitted photon, so divide by the mean weight.
    detector = EnergyIntegratingDetector(falloff=True)
    mean_weight = float(falloff_factor(camera.intrinsics, 39, 39, supersample=16).mean())
    result = transport(
        densities.to(device), affine, ["TG-195 air", "TG-195 soft tissue"], camera,
        (torch.tensor([56.4]), torch.tensor([1.0])), photons_per_pixel=photons_per_pixel, detector=detector, seed=5,
    )  # fmt: skip
    return float(result.absorbed[0, 1]) * 1000 / mean_weight, float(result.absorbed_error[0, 1]) * 1000 / mean_weight


@QUIET
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_tg195_case2_energy_deposited_in_the_box(device):
    """Energy deposited in the soft-tissue box per photon agrees with the four TG-195 codes: within 0.5 % of their
    mean (they span 0.2 %); our statistical error is about 0.05 %. Without the air between source and box the
    deposit is 3 % higher, so the test sees the geometry as well as the interaction physics."""
    deposited, error = _tg195_case2(device, 2000.0 if device == "cpu" else 20000.0)
    reference = sum(TG195_CASE2_MONO_EV.values()) / len(TG195_CASE2_MONO_EV)
    assert error < 0.001 * reference
    assert abs(deposited - reference) < 0.005 * reference


# --- physics trends of the scatter-to-primary ratio -----------------------------------------------------------------


def _central_spr(thickness_mm: float, field_mm: float, grid: AntiScatterGrid | None = None, ppp: float = 3000.0):
    """SPR in the central 3 x 3 pixels behind a water slab (200 x 200 mm, front at z = 850 mm) with a 150 mm air gap,
    for a square field of field_mm at the detector (SDD 1150 mm, 10 mm pixels)."""
    densities, affine = _slab(thickness_mm, 300.0, 1000.0 - thickness_mm, voxel_mm=25.0)
    camera = _axial_camera(1150.0, 31, 10.0)
    half = field_mm / 20.0
    field = (15.0 - half, 15.0 + half, 15.0 - half, 15.0 + half)
    result = transport(densities, affine, ["water"], camera, spectrum_preset("90kVp"), photons_per_pixel=ppp,
                       field=field, grid=grid, seed=7)  # fmt: skip
    centre = slice(14, 17)
    scatter, primary = result.scatter[0, centre, centre].sum(), result.primary[0, centre, centre].sum()
    error = result.scatter_error[0, centre, centre].pow(2).sum().sqrt()
    return float(scatter / primary), float(error / primary)


@QUIET
def test_scatter_grows_with_thickness_and_field_and_falls_with_a_grid():
    thin, thin_err = _central_spr(50.0, 200.0)
    thick, thick_err = _central_spr(150.0, 200.0)
    narrow, narrow_err = _central_spr(150.0, 60.0)
    gridded, gridded_err = _central_spr(150.0, 200.0, grid=AntiScatterGrid(ratio=10.0))
    assert thick - thin > 5 * math.hypot(thick_err, thin_err)
    assert thick - narrow > 5 * math.hypot(thick_err, narrow_err)
    assert thick - gridded > 5 * math.hypot(thick_err, gridded_err)
    # A 10:1 grid removes most scatter: the SPR falls by a factor of several (primary transmission counted).
    assert gridded < 0.4 * thick


def test_chest_scatter_is_below_one_in_the_lungs_and_several_in_the_mediastinum():
    """The bundled chest CT, PA at 90 kVp without a grid: the SPR map is low over the lungs and high over the
    mediastinum (design.md §4; Niklason et al. 1981 measured scatter fractions near 90 % in the mediastinum)."""
    from torchdrr.io import Volume, bundled_ct_path

    ct = Volume.load(bundled_ct_path(), fix_padding=True)
    camera = Camera.from_carm(torch.tensor([0.0]), torch.tensor([0.0]), ct.center, height=24, width=31,
                              pixel_spacing_mm=(12.04, 12.04))  # fmt: skip
    drr = DRR(ct, output="intensity")
    primary = drr(camera)
    with pytest.warns(UserWarning, match="noisy"):
        mc = DRR(ct, output="intensity", scatter=MonteCarloScatter(photons_per_pixel=400, binning=1))
        total = mc(camera)
    spr = ((total - primary) / primary)[0, 0]
    columns = spr.shape[1]
    lungs = torch.cat([spr[8:16, columns // 2 - 9 : columns // 2 - 5], spr[8:16, columns // 2 + 5 : columns // 2 + 9]])
    mediastinum = spr[8:16, columns // 2 - 1 : columns // 2 + 2]
    assert float(lungs.median()) < 1.0
    assert float(mediastinum.median()) > 2.0


# --- reproducibility ------------------------------------------------------------------------------------------------


def _small_run(**kwargs):
    densities, affine = _slab(60.0, 120.0, 450.0, voxel_mm=20.0)
    camera = _axial_camera(1000.0, 8, 20.0)
    args = dict(photons_per_pixel=500, seed=3, progress=False)
    args.update(kwargs)
    return transport(densities, affine, ["water"], camera, spectrum_preset("60kVp"), **args)


@QUIET
def test_same_seed_same_tally_and_launch_split_does_not_matter():
    a, b = _small_run(), _small_run()
    assert torch.equal(a.primary, b.primary) and torch.equal(a.multiple, b.multiple)
    split = _small_run(photons_per_launch=1000)
    torch.testing.assert_close(split.scatter, a.scatter, rtol=1e-12, atol=0)
    torch.testing.assert_close(split.primary, a.primary, rtol=1e-12, atol=0)
    other = _small_run(seed=4)
    assert not torch.equal(other.primary, a.primary)
    # Different seeds are independent estimates of one expectation.
    z = (other.primary - a.primary) / torch.sqrt(other.primary_error**2 + a.primary_error**2)
    assert float(z.abs().max()) < 5.0


@QUIET
@CUDA
def test_cuda_and_cpu_draw_the_same_photons():
    """Philox streams are addressed by (seed, camera, photon): the GPU follows the CPU's photons, so the primary
    tallies agree far inside their statistical error (only float rounding in exp/log can send a photon elsewhere)."""
    cpu = _small_run(photons_per_pixel=5000)
    densities, affine = _slab(60.0, 120.0, 450.0, voxel_mm=20.0)
    cuda = transport(densities.cuda(), affine, ["water"], _axial_camera(1000.0, 8, 20.0, "cuda"),
                     spectrum_preset("60kVp"), photons_per_pixel=5000, seed=3)  # fmt: skip
    difference = (cuda.primary.cpu() - cpu.primary).abs()
    assert float((difference / cpu.primary_error).max()) < 0.2
    assert float((cuda.scatter.cpu() - cpu.scatter).abs().sum() / cpu.scatter.sum()) < 0.02


def test_op_schema_and_fake_kernel():
    densities, affine = _slab(40.0, 80.0, 450.0, voxel_mm=20.0)
    tables = transport_tables(["water"], 60.0)
    camera = _axial_camera(1000.0, 4, 20.0)
    sources, rays = camera.ray_parameters(dtype=torch.float32)
    energy = torch.tensor([40.5, 50.5], dtype=torch.float32)
    args = (
        densities, affine, sources, rays, 4, 4, [-0.5, 3.5, -0.5, 3.5], energy, torch.tensor([0.5, 1.0]),
        tables.grid_start_keV, tables.grid_step_keV, tables.interaction, tables.total.sum(-1) * 1.1,
        torch.ones(tables.interaction.shape[0]), 5.0, tables.compton_sf, tables.compton_x_step, tables.rayleigh_icdf,
        tables.rayleigh_fraction, 2000, 1, 0, 0.0, 1.0, False,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.torchdrr.montecarlo_transport.default, args,
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    tally, absorbed = torch.ops.torchdrr.montecarlo_transport(*args)
    assert tally.shape == (1, 6, 4, 4) and absorbed.shape == (1, 1, 2)
    assert float(tally[:, 0].sum()) > 0


# --- bad input ------------------------------------------------------------------------------------------------------


def test_too_few_photons_warn_with_the_expected_noise():
    with pytest.warns(UserWarning, match=r"relative noise of 32%"):
        _small_run(photons_per_pixel=10)


def test_materials_without_scatter_data_are_refused_by_name():
    densities, affine = _slab(40.0, 80.0, 450.0, voxel_mm=20.0)
    with pytest.raises(ValueError, match="einsteinium.*no scattering data.*Es"):
        transport(densities, affine, [Material("einsteinium", {"Es": 1.0}, 8.8)], _axial_camera(1000.0, 4, 20.0),
                  spectrum_preset("60kVp"))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"photons_per_pixel": -1.0}, "photons_per_pixel must be a positive"),
        ({"field": (3.0, 1.0, 0.0, 2.0)}, "field must be"),
        ({"detector": PhotonCountingDetector(thresholds_keV=(20.0,))}, "EnergyIntegratingDetector"),
        ({"spectrum": (torch.tensor([50.0]), torch.tensor([-1.0]))}, "spectrum weights"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    densities, affine = _slab(40.0, 80.0, 450.0, voxel_mm=20.0)
    spectrum = kwargs.pop("spectrum", spectrum_preset("60kVp"))
    with pytest.raises((ValueError, TypeError), match=match):
        transport(densities, affine, ["water"], _axial_camera(1000.0, 4, 20.0), spectrum, **kwargs)


def test_drr_scatter_argument():
    densities = MaterialChannels(torch.ones(1, 4, 4, 4), ("water",))
    affine = torch.eye(4, dtype=torch.float64)
    assert isinstance(DRR(densities, affine, scatter="montecarlo").scatter, MonteCarloScatter)
    assert isinstance(DRR(densities, affine, scatter="cnn").scatter, ScatterCNN)
    with pytest.raises(ValueError, match="scatter must be"):
        DRR(densities, affine, scatter="kernel")
    with pytest.raises(ValueError, match="EnergyIntegratingDetector"):
        DRR(densities, affine, scatter="montecarlo", detector=PhotonCountingDetector(thresholds_keV=(20.0,)))
