"""Tests of the camera ray-casting op (torchdrr.ops.camera_raycast): the rays of pixel_rays, cast in one launch,
with pose gradients reduced inside the kernel (CPU and, where present, CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import torchdrr
from torchdrr.geometry import Camera, camera_ray_parameters, pixel_rays
from torchdrr.ops import RAYCAST_MODES, camera_raycast, camera_raycast_reference

from .conftest import cuda_ready

MODES = ("siddon", "trilinear")
needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")


def scene(dtype=torch.float64, device="cpu", channels=2, batch=2, seed=0, shape=(9, 7, 8)):
    """A random volume 30 mm voxels around the origin and C-arm cameras at random angles that see all of it."""
    generator = torch.Generator().manual_seed(seed)
    volume = torch.rand(channels, *shape, generator=generator, dtype=torch.float64)
    affine = torch.diag(torch.tensor([30.0, 25.0, 35.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = -0.5 * torch.tensor([30.0 * (shape[0] - 1), 25.0 * (shape[1] - 1), 35.0 * (shape[2] - 1)])
    primary = torch.rand(batch, generator=generator, dtype=torch.float64) * 360 - 180
    secondary = torch.rand(batch, generator=generator, dtype=torch.float64) * 60 - 30
    camera = Camera.from_carm(
        primary, secondary, torch.zeros(3, dtype=torch.float64), sod_mm=600.0, sdd_mm=1000.0, height=6, width=5,
        pixel_spacing_mm=(40.0, 50.0),
    )  # fmt: skip
    sources, matrices = camera.ray_parameters()
    cast = dict(dtype=dtype, device=device)
    return volume.to(**cast), affine, sources.to(**cast), matrices.to(**cast), camera


@pytest.mark.parametrize("supersample", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_matches_pixel_rays_through_raycast(device, mode, supersample) -> None:
    volume, affine, sources, matrices, camera = scene(device=device)
    got = camera_raycast(volume, affine, sources, matrices, 6, 5, mode=mode, supersample=supersample)
    ray_sources, ray_targets = camera.to(device).rays(supersample)
    expected = torchdrr.raycast(volume, affine, ray_sources, ray_targets, mode=mode)
    assert got.shape == expected.shape == (2, 6 * 5 * supersample**2, 2)
    assert float(expected.abs().min()) > 0  # every ray crosses the volume: no zeros hide unwritten outputs
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(device, mode) -> None:
    volume, affine, sources, matrices, _ = scene(device=device, channels=3, seed=3)
    got = camera_raycast(volume, affine, sources, matrices, 6, 5, mode=mode, step=None if mode == "siddon" else 7.0)
    expected = camera_raycast_reference(
        volume, affine, sources, matrices, 6, 5, mode=mode, step=None if mode == "siddon" else 7.0
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-9)


def test_uniform_box_central_ray_is_the_box_thickness(device) -> None:
    """A uniform box seen head-on: the central pixel's ray crosses exactly the box's depth (analytic chord)."""
    volume = torch.ones(1, 11, 13, 9, dtype=torch.float32, device=device)
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, -18.0, -16.0])
    camera = Camera.from_carm(0.0, 0.0, torch.zeros(3, dtype=torch.float64), height=3, width=3, pixel_spacing_mm=(1, 1))
    sources, matrices = camera.ray_parameters()
    out = camera_raycast(volume, affine, sources.float().to(device), matrices.float().to(device), 3, 3)
    # At (0, 0) the beam runs along world y; the box spans 13 voxels x 3 mm = 39 mm along y.
    assert abs(float(out[0, 4, 0]) - 39.0) < 39.0 * 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_volume_sources_matrices(device, mode) -> None:
    volume, affine, sources, matrices, _ = scene(device=device, batch=2, seed=5, shape=(5, 4, 6))
    inputs = (volume.requires_grad_(), sources.requires_grad_(), matrices.requires_grad_())
    step = None if mode == "siddon" else 11.0

    def cast(v, s, m):
        return camera_raycast(v, affine, s, m, 3, 2, mode=mode, step=step, supersample=2)

    assert gradcheck(cast, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_pose_gradients_match_autograd_through_pixel_rays(device, mode) -> None:
    """The in-kernel reduction gives what autograd gives through the explicit rays, at a size with many blocks."""
    volume, affine, _, _, _ = scene(device=device, channels=1, seed=7, shape=(20, 18, 16))
    angles = torch.tensor([20.0, -35.0], dtype=torch.float64, requires_grad=True)
    camera = Camera.from_carm(
        angles, torch.tensor([10.0, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
        sod_mm=600.0, sdd_mm=1000.0, height=40, width=52, pixel_spacing_mm=(14.0, 12.0),
    )  # fmt: skip
    weights = torch.rand(2, 40 * 52, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    sources, matrices = camera.ray_parameters()
    fused = camera_raycast(volume, affine, sources.to(device), matrices.to(device), 40, 52, mode=mode)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), angles, retain_graph=True)
    ray_sources, ray_targets = camera.rays()
    explicit = torchdrr.raycast(volume, affine, ray_sources.to(device), ray_targets.to(device), mode=mode)
    (explicit_grad,) = torch.autograd.grad((explicit * weights).sum(), angles)
    assert float(explicit_grad.abs().min()) > 1.0
    torch.testing.assert_close(fused_grad, explicit_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("want", ["volume", "pose", "both"])
def test_backward_computes_only_what_is_needed(device, want) -> None:
    volume, affine, sources, matrices, _ = scene(device=device)
    volume.requires_grad_(want in ("volume", "both"))
    sources.requires_grad_(want in ("pose", "both"))
    camera_raycast(volume, affine, sources, matrices, 6, 5).sum().backward()
    assert (volume.grad is not None) == (want in ("volume", "both"))
    assert (sources.grad is not None) == (want in ("pose", "both"))
    assert matrices.grad is None
    out = torch.ops.torchdrr.camera_raycast_backward(
        torch.ones(2, 30, 2, dtype=torch.float64, device=device), volume.detach(), affine, sources.detach(),
        matrices, 6, 5, 1, 0, 0.0, want != "pose", want != "volume",
    )  # fmt: skip
    assert (out[0].numel() > 0) == (want != "pose") and (out[1].numel() > 0) == (want != "volume")


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, mode) -> None:
    volume, affine, sources, matrices, _ = scene(device=device, seed=2, shape=(4, 5, 3))
    args = (volume, affine, sources, matrices, 3, 2, 2, RAYCAST_MODES[mode], 0.0)
    torch.library.opcheck(torch.ops.torchdrr.camera_raycast_forward.default, args)
    grad = torch.rand(2, 24, 2, dtype=torch.float64, device=device)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.torchdrr.camera_raycast_backward.default, (grad, *args, *flags))


def test_torch_compile_fullgraph_matches_eager(device) -> None:
    volume, affine, sources, matrices, _ = scene(device=device, dtype=torch.float32)
    sources.requires_grad_()

    def loss(s):
        return camera_raycast(volume, affine, s, matrices, 6, 5).square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    torch.testing.assert_close(compiled(sources), loss(sources))
    (eager_grad,) = torch.autograd.grad(loss(sources), sources)
    (compiled_grad,) = torch.autograd.grad(compiled(sources), sources)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_three_dimensional_volume_gives_one_value_per_ray() -> None:
    volume, affine, sources, matrices, _ = scene()
    out = camera_raycast(volume[0], affine, sources, matrices, 6, 5)
    assert out.shape == (2, 30)
    torch.testing.assert_close(out, camera_raycast(volume, affine, sources, matrices, 6, 5)[..., 0])


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(sources=torch.zeros(2, 4, dtype=torch.float64)), ValueError, "sources must be \\[B, 3\\]"),
        (dict(ray_matrices=torch.zeros(3, 3, 3, dtype=torch.float64)), ValueError, "ray_matrices must be \\[B, 3"),
        (dict(sources=torch.zeros(2, 3)), TypeError, "sources must have the volume's dtype"),
        (dict(height=0), ValueError, "height must be a whole number >= 1, got 0"),
        (dict(supersample=1.5), ValueError, "supersample must be a whole number"),
        (dict(mode="nearest"), ValueError, "mode must be one of"),
        (dict(step=0.5), ValueError, "step applies to mode='trilinear' only"),
        (dict(affine=torch.eye(3)), ValueError, "affine must be \\[4, 4\\]"),
        (dict(volume=torch.zeros(2, 3, 4, 5, dtype=torch.int32)), TypeError, "volume must be float32 or float64"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(change, error, message) -> None:
    volume, affine, sources, matrices, _ = scene()
    kwargs = dict(
        volume=volume, affine=affine, sources=sources, ray_matrices=matrices, height=6, width=5, mode="siddon"
    )
    kwargs.update(change)
    with pytest.raises(error, match=message):
        camera_raycast(**kwargs)


def test_direct_op_calls_are_checked_too() -> None:
    volume, affine, sources, matrices, _ = scene()
    with pytest.raises(ValueError, match="ray_matrices must be \\[B, 3, 3\\]"):
        torch.ops.torchdrr.camera_raycast_forward(volume, affine, sources, matrices[:1], 6, 5, 1, 0, 0.0)
    with pytest.raises(ValueError, match="grad_output must be \\[B, R, C\\]"):
        torch.ops.torchdrr.camera_raycast_backward(
            torch.ones(2, 29, 2, dtype=torch.float64), volume, affine, sources, matrices, 6, 5, 1, 0, 0.0, True, True
        )


def test_camera_ray_parameters_give_the_pixel_rays() -> None:
    _, _, _, _, camera = scene(batch=3, seed=11)
    sources, matrices = camera_ray_parameters(camera.intrinsics, camera.rotation, camera.translation, camera.sdd_mm)
    ray_sources, ray_targets = pixel_rays(
        camera.intrinsics, camera.rotation, camera.translation, camera.height, camera.width, camera.sdd_mm, 3
    )
    from torchdrr.ops import camera_pixel_grid

    pixels = camera_pixel_grid(camera.height, camera.width, 3)
    torch.testing.assert_close(sources[:, None, :].expand_as(ray_sources), ray_sources)
    torch.testing.assert_close(sources[:, None, :] + pixels @ matrices.transpose(1, 2), ray_targets)


# ------------------------------------------------------------------------------------------------------------
# CUDA against the CPU, at a clinical size (the kernel's warp tiles, packed channels and block reduction)
# ------------------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu_on_a_clinical_size(mode, channels) -> None:
    generator = torch.Generator().manual_seed(4)
    volume = torch.rand(64, 60, 40, channels, generator=generator).permute(3, 0, 1, 2)  # channels-last
    if channels == 1:
        volume = volume.contiguous()
    affine = torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-22.0, -21.0, -49.0])
    angles = torch.tensor([180.0, 195.0, 90.0], dtype=torch.float64)
    camera = Camera.from_carm(
        angles, torch.tensor([0.0, 10.0, -5.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
        height=77, width=93, pixel_spacing_mm=(1.3, 1.1),
    )  # fmt: skip
    sources64, matrices64 = camera.ray_parameters()
    sources, matrices = sources64.float(), matrices64.float()
    cpu = camera_raycast(volume, affine, sources, matrices, 77, 93, mode=mode)
    cuda = camera_raycast(volume.cuda(), affine, sources.cuda(), matrices.cuda(), 77, 93, mode=mode).cpu()
    exact = camera_raycast(volume.double(), affine, sources64, matrices64, 77, 93, mode=mode)
    assert float(exact.abs().max()) > 1.0
    # The GPU (its own float32 ray arithmetic and walk) is as accurate as the CPU's float32: rays nearly parallel to
    # voxel faces turn endpoint rounding into differences far above the chord tolerance, in both.
    cpu_error, cuda_error = (cpu.double() - exact).abs(), (cuda.double() - exact).abs()
    assert float(cuda_error.max()) <= 2 * float(cpu_error.max()) + 1e-6 * float(exact.abs().max())
    assert float(cuda_error.mean()) <= 2 * float(cpu_error.mean()) + 1e-7 * float(exact.abs().max())

    # Backward: pose (reduced per block on the GPU) and volume (atomic back-projection), against float64 again: the
    # ray-matrix gradient sums u, v-weighted endpoint gradients that cancel, so float32 rounding shows in both.
    weights = torch.rand(cpu.shape, generator=generator, dtype=torch.float64)
    grads = {}
    for name, dev, dtype in (
        ("exact", "cpu", torch.float64),
        ("cpu", "cpu", torch.float32),
        ("cuda", "cuda", torch.float32),
    ):
        v = volume.to(dev, dtype).requires_grad_()
        s, m = sources64.to(dev, dtype).requires_grad_(), matrices64.to(dev, dtype).requires_grad_()
        out = camera_raycast(v, affine, s, m, 77, 93, mode=mode)
        grads[name] = [g.cpu().double() for g in torch.autograd.grad((out * weights.to(dev, dtype)).sum(), (v, s, m))]
    for exact_grad, cpu_grad, cuda_grad in zip(grads["exact"], grads["cpu"], grads["cuda"], strict=True):
        scale = float(exact_grad.abs().max())
        assert scale > 0
        cpu_error, cuda_error = (cpu_grad - exact_grad).abs().max(), (cuda_grad - exact_grad).abs().max()
        assert float(cuda_error) <= 2 * float(cpu_error) + 1e-5 * scale
