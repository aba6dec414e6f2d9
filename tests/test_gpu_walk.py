"""The GPU's ways of walking rays (csrc/raycast/ray_math.h), run on the CPU.

Siddon: the CUDA kernels walk rays one voxel at a time (``siddon_steps``); the CPU kernels walk runs of voxels.
Trilinear: the CUDA kernels sample the part of a ray whose stencils lie inside the grid without clamps
(``trilinear_samples_steps``); the CPU kernels clamp every sample. ``TORCHDRR_CPU_WALK=gpu`` makes the CPU use the
GPU's ways, so that machines without a GPU (CI) check them, with every visitor (forward, backward to the volume and
to the rays), against the CPU's own.
"""

from __future__ import annotations

import pytest
import torch

import torchdrr
from torchdrr.geometry import Camera
from torchdrr.ops import camera_raycast

from .geometry_cases import AFFINES

WALK_VARIABLE = "TORCHDRR_CPU_WALK"


def cameras(primary: list[float], secondary: list[float], sod_mm: float, sdd_mm: float, size: int) -> Camera:
    """C-arm cameras around the origin whose detector covers a 40 mm object at any of these distances."""
    return Camera.from_carm(
        torch.tensor(primary, dtype=torch.float64), torch.tensor(secondary, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64), sod_mm=sod_mm, sdd_mm=sdd_mm, height=size, width=size + 1,
        pixel_spacing_mm=(70.0 * sdd_mm / sod_mm / size, 70.0 * sdd_mm / sod_mm / size),
    )  # fmt: skip


def volume_and_affine(affine_name: str, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random volume of ~8 mm voxels centred on the origin, with one of the test affines' linear parts."""
    generator = torch.Generator().manual_seed(seed)
    shape = (7, 5, 6)
    volume = torch.rand(channels, *shape, generator=generator, dtype=torch.float64) + 0.5
    affine = AFFINES[affine_name].clone()
    affine[:3, :3] *= 8.0
    centre_index = 0.5 * (torch.tensor(shape, dtype=torch.float64) - 1)
    affine[:3, 3] = -(affine[:3, :3] @ centre_index)
    return volume, affine


def set_walk(monkeypatch, walk: str | None) -> None:
    """Sets TORCHDRR_CPU_WALK for the test (None: unset, the CPU's own walk)."""
    if walk is None:
        monkeypatch.delenv(WALK_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(WALK_VARIABLE, walk)


def render_with_grads(
    monkeypatch, walk: str | None, volume, affine, sources, matrices, size, grad_weights, mode="siddon", step=None
):
    """Image, volume gradient and pose gradients of sum(image * grad_weights) with the given CPU walk."""
    set_walk(monkeypatch, walk)
    volume = volume.clone().requires_grad_(True)
    sources = sources.clone().requires_grad_(True)
    matrices = matrices.clone().requires_grad_(True)
    image = camera_raycast(volume, affine, sources, matrices, size, size + 1, mode=mode, step=step)
    grads = torch.autograd.grad((image * grad_weights).sum(), (volume, sources, matrices))
    return (image.detach(), *grads)


# Main axes x (lateral views), y (AP) and z (steep cranial tilt), sources inside and outside the volume.
POSES = {
    "ap": ([180.0, 170.0], [0.0, 10.0], 300.0, 500.0),
    "lateral": ([90.0, -95.0], [5.0, -3.0], 300.0, 500.0),
    "cranial": ([30.0, 200.0], [80.0, -75.0], 300.0, 500.0),
    "source_inside": ([0.0, 135.0], [20.0, -40.0], 12.0, 60.0),
}


@pytest.mark.parametrize("pose", sorted(POSES))
@pytest.mark.parametrize("affine_name", sorted(AFFINES))
def test_gpu_walk_matches_cpu_walk(monkeypatch, pose, affine_name) -> None:
    volume, affine = volume_and_affine(affine_name, channels=2, seed=len(pose) + len(affine_name))
    primary, secondary, sod_mm, sdd_mm = POSES[pose]
    camera = cameras(primary, secondary, sod_mm, sdd_mm, size=9)
    sources, matrices = camera.ray_parameters()
    weights = torch.rand(2, 9 * 10, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = render_with_grads(monkeypatch, None, volume, affine, sources, matrices, 9, weights)
    steps = render_with_grads(monkeypatch, "gpu", volume, affine, sources, matrices, 9, weights)
    assert int((runs[0] > 0).sum()) > runs[0].numel() // 3  # most rays cross the volume: the test can fail
    names = ("image", "volume grad", "source grad", "ray-matrix grad")
    for name, expected, got in zip(names, runs, steps, strict=True):
        assert float(expected.abs().max()) > 0, name
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()), msg=name)


@pytest.mark.parametrize("pose", sorted(POSES))
@pytest.mark.parametrize("affine_name", sorted(AFFINES))
def test_gpu_forward_walk_matches_cpu_walk(monkeypatch, pose, affine_name) -> None:
    """The no-grad forward (the visit-first walk, which ends at the first grid-leaving crossing instead of testing
    the offset every voxel) against the CPU's runs walk, one channel and two."""
    volume, affine = volume_and_affine(affine_name, channels=2, seed=3 * len(pose) + len(affine_name))
    primary, secondary, sod_mm, sdd_mm = POSES[pose]
    sources, matrices = cameras(primary, secondary, sod_mm, sdd_mm, size=9).ray_parameters()
    for vol in (volume, volume[0]):
        images = []
        for walk in (None, "gpu"):
            set_walk(monkeypatch, walk)
            with torch.no_grad():
                images.append(camera_raycast(vol, affine, sources, matrices, 9, 10))
        expected, got = images
        assert int((expected > 0).sum()) > expected.numel() // 3  # most rays cross the volume: the test can fail
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("pose", sorted(POSES))
@pytest.mark.parametrize("affine_name", sorted(AFFINES))
@pytest.mark.parametrize("step", [None, 1.3], ids=["default step", "1.3 mm"])
@pytest.mark.parametrize("layout", ["channels first", "channels last"])
def test_gpu_trilinear_sampling_matches_cpu(monkeypatch, pose, affine_name, step, layout) -> None:
    """The GPU's trilinear sampling (no clamps where the stencil is inside the grid, clamps near the faces) gives
    the CPU's clamped result. Same sample positions and order: equal to float64 rounding. A sample wrongly taken as
    interior would read an unclamped neighbour (another row of the volume) and differ by a whole voxel value.
    Channels last: the neighbour along k is not the next element (the interior loop's general-stride variant)."""
    volume, affine = volume_and_affine(affine_name, channels=2, seed=len(pose) + 3 * len(affine_name))
    if layout == "channels last":
        volume = volume.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
        assert volume.stride(-1) == 2
    primary, secondary, sod_mm, sdd_mm = POSES[pose]
    camera = cameras(primary, secondary, sod_mm, sdd_mm, size=9)
    sources, matrices = camera.ray_parameters()
    weights = torch.rand(2, 9 * 10, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    args = (volume, affine, sources, matrices, 9, weights, "trilinear", step)
    clamped = render_with_grads(monkeypatch, None, *args)
    gpu_way = render_with_grads(monkeypatch, "gpu", *args)
    assert int((clamped[0] > 0).sum()) > clamped[0].numel() // 3
    names = ("image", "volume grad", "source grad", "ray-matrix grad")
    for name, expected, got in zip(names, clamped, gpu_way, strict=True):
        assert float(expected.abs().max()) > 0, name
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()), msg=name)


def test_switch_reaches_the_kernel(monkeypatch) -> None:
    """In float32 the two walks round differently (runs sum whole voxels before scaling): seeing a difference
    proves that the variable switched the walk, so the test above compares two walks and not one with itself."""
    volume, affine = volume_and_affine("rotated", channels=1, seed=3)
    camera = cameras(*POSES["ap"], size=16)
    sources, matrices = (x.float() for x in camera.ray_parameters())
    volume = volume.float()
    monkeypatch.delenv(WALK_VARIABLE, raising=False)
    runs = camera_raycast(volume, affine, sources, matrices, 16, 17)
    monkeypatch.setenv(WALK_VARIABLE, "gpu")
    steps = camera_raycast(volume, affine, sources, matrices, 16, 17)
    assert not torch.equal(runs, steps)
    torch.testing.assert_close(steps, runs, rtol=2e-5, atol=1e-4)


def test_per_ray_op_uses_the_switch_too(monkeypatch) -> None:
    volume, affine = volume_and_affine("permuted_flipped", channels=3, seed=5)
    sources, targets = cameras(*POSES["lateral"], size=6).rays()
    results = []
    for walk in (None, "gpu"):
        set_walk(monkeypatch, walk)
        results.append(torchdrr.raycast(volume, affine, sources, targets))
    assert float(results[0].abs().max()) > 0
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)
