"""Numerical health: no NaN or Inf in outputs or gradients, for any ray geometry and any attenuation.

Property tests (hypothesis) over random geometry: rays that graze voxel faces and the volume's outer faces (exactly,
on power-of-two grids where the boundaries are exact in floating point), rays that start or end inside the volume,
zero-length rays, rays through corners; and DRRs of objects so dense that ``exp(-mu A)`` underflows, with and
without noise and exposure control. A line integral is also bounded: ``0 <= integral <= max(volume) x length``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchdrr import DRR, raycast
from torchdrr.geometry import Camera, intrinsic_matrix
from torchdrr.physics import MaterialChannels, mass_attenuation
from torchdrr.physics.noise import Noise

from ..conftest import DEVICES

F64 = torch.float64
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


# --------------------------------------------------------------------------------------------------------------------
# The ray-cast op
# --------------------------------------------------------------------------------------------------------------------
@st.composite
def scenes(draw) -> dict:
    """A small volume on an axis-aligned power-of-two grid (boundaries exact in floating point) and 8 rays."""
    shape = tuple(draw(st.integers(1, 5)) for _ in range(3))
    spacing = [2.0 ** draw(st.integers(-2, 2)) for _ in range(3)]
    origin = [draw(st.integers(-4, 4)) * 0.5 for _ in range(3)]
    rays = [draw(rays_in_index_space(shape)) for _ in range(8)]
    return {"shape": shape, "spacing": spacing, "origin": origin, "rays": rays}


def rays_in_index_space(shape: tuple[int, int, int]) -> st.SearchStrategy:
    """Ray endpoints in voxel index coordinates: the outer box is ``[-1/2, n - 1/2]`` per axis."""

    def coordinate(n: int) -> st.SearchStrategy[float]:
        boundary = st.integers(0, n).map(lambda k: k - 0.5)  # a voxel face, or the outer face
        centre = st.integers(0, n - 1).map(float)
        anywhere = st.floats(-2.0 * n - 2, 3.0 * n + 2, allow_nan=False)
        inside = st.floats(-0.5, n - 0.5, allow_nan=False)
        return st.one_of(boundary, centre, anywhere, inside)

    point = st.tuples(*(coordinate(n) for n in shape))

    def grazing(args):
        start, axis, length = args
        end = list(start)
        end[axis] += length  # parallel to an axis: keeps the other two (face or centre) coordinates exactly
        return start, tuple(end)

    parallel = st.tuples(point, st.integers(0, 2), st.floats(-20.0, 20.0, allow_nan=False)).map(grazing)
    degenerate = point.map(lambda p: (p, p))  # zero length
    corner_to_corner = st.tuples(
        st.tuples(*(st.sampled_from([-0.5, n - 0.5]) for n in shape)),
        st.tuples(*(st.sampled_from([-0.5, n - 0.5]) for n in shape)),
    )
    return st.one_of(st.tuples(point, point), parallel, degenerate, corner_to_corner)


def world(affine: torch.Tensor, index_points: torch.Tensor) -> torch.Tensor:
    return index_points @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("mode", ["siddon", "trilinear"])
@pytest.mark.parametrize("device", DEVICES)
def test_raycast_finite_and_bounded_for_any_rays(device: str, mode: str, dtype: torch.dtype) -> None:
    @PROPERTY_SETTINGS
    @given(scene=scenes(), seed=st.integers(0, 2**31 - 1))
    def check(scene: dict, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        volume = torch.rand((2, *scene["shape"]), generator=generator, dtype=F64)
        volume = volume.to(device, dtype).requires_grad_(True)
        affine = torch.diag(torch.tensor([*scene["spacing"], 1.0], dtype=F64))
        affine[:3, 3] = torch.tensor(scene["origin"], dtype=F64)
        starts = torch.tensor([ray[0] for ray in scene["rays"]], dtype=F64)
        ends = torch.tensor([ray[1] for ray in scene["rays"]], dtype=F64)
        sources = world(affine, starts).to(device, dtype).requires_grad_(True)
        targets = world(affine, ends).to(device, dtype).requires_grad_(True)

        integrals = raycast(volume, affine, sources, targets, mode=mode)
        assert torch.isfinite(integrals).all(), (scene, integrals)
        length = (targets - sources).detach().norm(dim=-1, keepdim=True)
        bound = volume.detach().amax() * length
        slack = 1e-5 if dtype == torch.float32 else 1e-10
        assert (integrals.detach() >= -slack * (1 + bound)).all(), integrals
        assert (integrals.detach() <= bound * (1 + slack) + slack).all(), (scene, integrals, bound)

        weights = torch.rand(integrals.shape, generator=generator, dtype=F64).to(device, dtype)
        (integrals * weights).sum().backward()
        for name, tensor in (("volume", volume), ("sources", sources), ("targets", targets)):
            assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), (name, scene, tensor.grad)

    check()


@pytest.mark.parametrize("device", DEVICES)
def test_raycast_rays_on_faces_match_the_chord_length(device: str) -> None:
    """A ray along an outer face or an inner voxel face of a uniform volume still integrates its full chord (the
    boundary belongs to one side, never to neither or both)."""
    volume = torch.ones(4, 4, 4, dtype=F64, device=device)
    affine = torch.eye(4, dtype=F64)  # outer box [-0.5, 3.5] per axis
    y_values = [-0.5, 0.5, 1.5, 3.0]  # outer face, inner faces, a voxel centre
    sources = torch.tensor([[-10.0, y, 1.0] for y in y_values], dtype=F64, device=device)
    targets = torch.tensor([[10.0, y, 1.0] for y in y_values], dtype=F64, device=device)
    for mode in ("siddon", "trilinear"):
        chords = raycast(volume, affine, sources, targets, mode=mode).cpu()
        torch.testing.assert_close(chords, torch.full((4,), 4.0, dtype=F64), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# The DRR: attenuation so strong that exp underflows
# --------------------------------------------------------------------------------------------------------------------
def slab_drr(density: float, dtype: torch.dtype, device: str, **options) -> DRR:
    """A 120 mm cube of bone-density material (second channel) in air, 8^3 voxels of 15 mm."""
    densities = torch.zeros(2, 8, 8, 8, dtype=F64)
    densities[1] = density
    affine = torch.diag(torch.tensor([15.0, 15.0, 15.0, 1.0], dtype=F64))
    affine[:3, 3] = -52.5
    channels = MaterialChannels(densities, ("soft tissue", "cortical bone"))
    return DRR(channels, affine, dtype=dtype, **options).to(device)


def pose(offset: torch.Tensor, height: int = 6, width: int = 6, pitch: float = 40.0, sdd: float = 1000.0) -> Camera:
    """Looking along +z; the source at z = -(500 + offset z), so an offset above 440 mm puts it inside the cube."""
    translation = torch.tensor([0.0, 0.0, 500.0], dtype=F64, device=offset.device) + offset
    intrinsics = intrinsic_matrix(sdd, height, width, (pitch, pitch)).to(offset.device)
    return Camera(intrinsics, torch.eye(3, dtype=F64, device=offset.device), translation, height, width, sdd)


@pytest.mark.parametrize("device", DEVICES)
def test_drr_outputs_and_gradients_stay_finite_at_any_attenuation(device: str) -> None:
    @PROPERTY_SETTINGS
    @given(
        log_density=st.floats(-3.0, 4.0),
        dtype=st.sampled_from([torch.float32, F64]),
        noise=st.sampled_from([None, "radiography", "fluoroscopy", "fast", "gaussian"]),
        exposure=st.sampled_from(["fixed", "automatic"]),
        output=st.sampled_from(["line_integral", "intensity", "flat_field", "display"]),
        offset=st.tuples(st.floats(-60, 60), st.floats(-60, 60), st.floats(-300, 540)),
        mode=st.sampled_from(["siddon", "trilinear"]),
    )
    def check(log_density, dtype, noise, exposure, output, offset, mode) -> None:
        noise_model = Noise(method=noise, electronic_std_photons=2.0) if noise in ("fast", "gaussian") else noise
        exposure_options = {"photons_behind_patient": 500.0} if exposure == "automatic" else {"photons_per_pixel": 1e4}
        drr = slab_drr(10.0**log_density, dtype, device, noise=noise_model, mode=mode, **exposure_options)
        shift = torch.tensor(offset, dtype=F64, device=device, requires_grad=True)
        camera = pose(shift)
        image = drr(camera, output=output, generator=torch.Generator(device=device).manual_seed(0))
        assert torch.isfinite(image).all(), (log_density, noise, exposure, output, image)
        if output != "display":
            expected = drr(camera, output="line_integral", noisy=False)
            assert torch.isfinite(expected).all()
            expected.square().sum().backward()
            assert shift.grad is not None and torch.isfinite(shift.grad).all(), shift.grad

    check()


@pytest.mark.parametrize("device", DEVICES)
def test_saturated_exposure_leaves_unattenuated_pixels_finite(device: str) -> None:
    """Automatic exposure where every ray through the body is fully attenuated and one detector row misses it (the
    example hypothesis found on the H100): N0 saturates, and the row that misses the body stays finite in float32
    (with N0 at the float32 maximum, N0 times its flat-field signal was inf)."""
    drr = slab_drr(
        100.0,
        torch.float32,
        device,
        noise=Noise(method="gaussian", electronic_std_photons=2.0),
        photons_behind_patient=500.0,
    )
    camera = pose(torch.tensor((0.0, 16.0, 0.0), dtype=F64, device=device))
    line = drr(camera, output="line_integral", noisy=False)
    assert float(line[0, 0, 0].abs().max()) == 0.0 and float(line[0, 0, 1:].min()) > 100.0  # the scene as described
    image = drr(camera, output="intensity", noisy=False)
    assert torch.isfinite(image).all(), image
    assert float(image[0, 0, 0].min()) > 1e9  # saturated, not clipped to something small
    noisy = drr(camera, output="line_integral", generator=torch.Generator(device=device).manual_seed(0))
    assert torch.isfinite(noisy).all(), noisy  # the Gaussian noise squares the saturated signal


@pytest.mark.parametrize("dtype, attenuation_lengths", [(torch.float32, 300.0), (F64, 3000.0)])
def test_line_integral_exact_where_exp_underflows(dtype: torch.dtype, attenuation_lengths: float) -> None:
    """Monoenergetic 60 keV through bone: ``-log(I / I0) = mu/rho x A`` even where ``exp(-mu/rho A)`` is far below
    the smallest normal number of the dtype (float32: exp(-87); float64: exp(-708))."""
    mu = float(mass_attenuation("cortical bone", 60.0))  # cm^2/g
    mass_thickness = attenuation_lengths / mu  # g/cm^2 along the 120 mm (12 cm) central ray
    drr = slab_drr(mass_thickness / 12.0, dtype, "cpu", spectrum=60.0)
    image = drr(pose(torch.zeros(3, dtype=F64), height=1, width=1), output="line_integral")
    assert math.exp(-attenuation_lengths) < torch.finfo(dtype).tiny
    torch.testing.assert_close(image.reshape(()).double(), torch.tensor(attenuation_lengths, dtype=F64), rtol=1e-5,
                               atol=0.0)  # fmt: skip
    intensity = drr(pose(torch.zeros(3, dtype=F64), height=1, width=1), output="intensity")
    assert torch.isfinite(intensity).all() and (intensity >= 0).all()


def test_dataset_physics_finite_when_fully_attenuated() -> None:
    """``detect_samples`` (the training-data path) with automatic exposure behind a fully attenuating object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drr = slab_drr(5000.0, torch.float32, "cpu", noise="radiography")
    camera = pose(torch.zeros(3, dtype=F64))
    rows, flat_log, mean_energy = drr.sample_rows(drr.spectrum_weights)
    integrals = drr.material_line_integrals(camera)
    for seeds in (None, [7]):
        images = drr.detect_samples(
            integrals, camera.intrinsics.unsqueeze(0), camera.height, camera.width, rows.unsqueeze(0),
            flat_log.unsqueeze(0), torch.tensor([500.0]), torch.tensor([mean_energy]), seeds,
        )  # fmt: skip
        assert torch.isfinite(images).all(), images
