"""Volume memory layouts: the ray casts read any layout through its strides (the CUDA geometry relabels the
contiguous axis as axis 2, and the warp tiles follow it), so images and gradients do not depend on the layout."""

from __future__ import annotations

import pytest
import torch

import torchdrr
from torchdrr.geometry import Camera
from torchdrr.io import volume_center
from torchdrr.ops import (
    camera_raycast,
    carm_ray_parameters,
    contiguous_axis,
    ray_axis,
    row_axis,
    with_contiguous_axis,
)

from .conftest import cuda_ready

needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")


def _scene(dtype: torch.dtype, channels: int):
    generator = torch.Generator().manual_seed(11)
    volume = torch.rand(channels, 23, 19, 11, generator=generator, dtype=dtype)
    if channels > 1:
        volume = volume.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # channels-last, as DRR makes it
    affine = torch.diag(torch.tensor([0.9, 1.1, 2.5, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, -11.0, -12.0])
    camera = Camera.from_carm(
        torch.tensor([180.0, 160.0, 90.0], dtype=torch.float64), torch.tensor([0.0, 12.0, -7.0], dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64), sod_mm=60.0, sdd_mm=110.0, height=9, width=12, pixel_spacing_mm=(4.0, 3.5),
    )  # fmt: skip
    sources, matrices = camera.ray_parameters(dtype=dtype)
    return volume, affine, sources, matrices


def _gap_copy(volume: torch.Tensor) -> torch.Tensor:
    """The volume as a strided view with gaps (every other j row of a larger tensor)."""
    wide = torch.zeros(*volume.shape[:-2], volume.shape[-2] * 2, volume.shape[-1], dtype=volume.dtype)
    view = wide[..., ::2, :]
    view.copy_(volume)
    return view


def _render_and_grads(volume, affine, sources, matrices, mode, device):
    v = volume.detach().to(device).requires_grad_(True)
    s, m = sources.to(device).requires_grad_(True), matrices.to(device).requires_grad_(True)
    out = camera_raycast(v, affine, s, m, 9, 12, mode=mode)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=device).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), (v, s, m))
    return [t.detach().cpu() for t in (out, *grads)]


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("mode", ["siddon", "trilinear"])
def test_every_layout_gives_the_same_image_and_gradients(device, mode, channels) -> None:
    dtype = torch.float64
    volume, affine, sources, matrices = _scene(dtype, channels)
    reference = _render_and_grads(volume, affine, sources, matrices, mode, device)
    assert float(reference[0].abs().max()) > 1.0 and float(reference[1].abs().max()) > 0.0
    layouts = {axis: with_contiguous_axis(volume, axis) for axis in (0, 1, 2)}
    layouts["gaps"] = _gap_copy(volume)
    for name, layout in layouts.items():
        assert torch.equal(layout, volume)
        got = _render_and_grads(layout, affine, sources, matrices, mode, device)
        for what, a, b in zip(("image", "volume grad", "source grad", "matrix grad"), got, reference, strict=True):
            # Only the order of the per-axis arithmetic changes: float64 rounding, far below any chord length.
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()), msg=f"{name}: {what}")


@needs_cuda
@pytest.mark.parametrize("mode", ["siddon", "trilinear"])
def test_cuda_layouts_match_the_cpu_in_float32(mode) -> None:
    """float32 on the GPU with each layout (tall warp tiles for k contiguous, wide ones for i and j) against the CPU."""
    volume, affine, sources, matrices = _scene(torch.float32, 1)
    cpu = camera_raycast(volume, affine, sources, matrices, 9, 12, mode=mode)
    exact = camera_raycast(volume.double(), affine, sources.double(), matrices.double(), 9, 12, mode=mode)
    cpu_error = float((cpu.double() - exact).abs().max())
    for axis in (0, 1, 2):
        cuda = camera_raycast(
            with_contiguous_axis(volume.cuda(), axis), affine, sources.cuda(), matrices.cuda(), 9, 12, mode=mode
        ).cpu()
        assert float((cuda.double() - exact).abs().max()) <= 2 * cpu_error + 1e-6 * float(exact.abs().max())


def test_with_contiguous_axis_keeps_values_and_channel_position() -> None:
    channels_last = torch.rand(5, 6, 7, 4).permute(3, 0, 1, 2)
    channels_first = torch.rand(3, 5, 6, 7)
    single = torch.rand(5, 6, 7)
    for axis in (0, 1, 2):
        for volume, channel_stride_one in ((channels_last, True), (channels_first, False), (single, None)):
            result = with_contiguous_axis(volume, axis)
            assert torch.equal(result, volume) and contiguous_axis(result) == axis
            if channel_stride_one is not None:
                assert (result.stride(0) == 1) == channel_stride_one
            assert with_contiguous_axis(result, axis) is result  # already so: no copy
    assert contiguous_axis(single) == 2 and contiguous_axis(single.permute(2, 1, 0).contiguous().permute(2, 1, 0)) == 0


def test_with_contiguous_axis_is_differentiable() -> None:
    volume = torch.rand(4, 5, 6, dtype=torch.float64, requires_grad=True)
    result = with_contiguous_axis(volume, 0)
    (grad,) = torch.autograd.grad((result * result).sum(), volume)
    torch.testing.assert_close(grad, 2 * volume.detach())


@pytest.mark.parametrize("axis", [-1, 3, 1.0, True, "i"])
def test_with_contiguous_axis_rejects_bad_axes(axis) -> None:
    with pytest.raises(ValueError, match=r"axis must be 0 \(i\), 1 \(j\) or 2 \(k\)"):
        with_contiguous_axis(torch.rand(3, 4, 5), axis)


def test_contiguous_axis_rejects_non_volumes() -> None:
    with pytest.raises(ValueError, match=r"volume must be an \[I, J, K\] or \[C, I, J, K\] tensor, got \(3, 4\)"):
        contiguous_axis(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"volume must be an \[I, J, K\] or \[C, I, J, K\] tensor, got list"):
        with_contiguous_axis([[1.0]], 0)


def test_row_axis_follows_the_detector_rows() -> None:
    """RAS CT, C-arm: AP rows run along x (i); a lateral view's rows along y (j); a permuted affine moves the axis."""
    affine = torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64))
    isocenter = volume_center(affine, (512, 512, 133))
    intrinsics = torch.tensor([[1000.0, 0.0, 100.0], [0.0, 1000.0, 80.0], [0.0, 0.0, 1.0]], dtype=torch.float64)

    def rows_for(primary_deg: float, affine: torch.Tensor) -> int:
        angles = torch.tensor([primary_deg], dtype=torch.float64)
        _, matrices = carm_ray_parameters(angles, 0.0, 850.0, isocenter, intrinsics, 1020.0)
        return row_axis(affine, matrices)

    def rays_for(primary_deg: float, affine: torch.Tensor) -> int:
        angles = torch.tensor([primary_deg], dtype=torch.float64)
        _, matrices = carm_ray_parameters(angles, 0.0, 850.0, isocenter, intrinsics, 1020.0)
        return ray_axis(affine, matrices, 160, 200)

    assert rays_for(180.0, affine) == 1 and rays_for(90.0, affine) == 0 and rays_for(90.0, affine[:, [1, 0, 2, 3]]) == 1
    assert rows_for(180.0, affine) == 0
    assert rows_for(90.0, affine) == 1
    swapped = affine[:, [1, 0, 2, 3]]  # index axis 0 is now y
    assert rows_for(180.0, swapped) == 1
    with pytest.raises(ValueError, match=r"ray_matrices must be \[B, 3, 3\] or \[3, 3\]"):
        row_axis(affine, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"height must be a positive number of pixels, got 0"):
        ray_axis(affine, torch.eye(3), 0, 10)


def test_drr_contiguous_axis_changes_only_the_layout(device) -> None:
    """The DRR module's material volume in each layout renders the same image (bit for bit on the CPU, which keeps
    k contiguous; to float32 rounding on CUDA, where the layout is applied)."""
    generator = torch.Generator().manual_seed(3)
    hu = torch.rand(20, 18, 12, generator=generator) * 1800.0 - 900.0
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    camera = torchdrr.Camera.from_carm(
        torch.tensor([180.0, 95.0], dtype=torch.float64), 0.0, volume_center(affine, hu.shape), sod_mm=80.0,
        sdd_mm=150.0, height=10, width=12, pixel_spacing_mm=(5.0, 5.0),
    )  # fmt: skip
    images = {}
    for axis in (None, 0, 1, 2):
        drr = torchdrr.DRR(hu, affine, contiguous_axis=axis).to(device)
        volume = drr.material_volume()
        expected_axis = 2 if axis is None or device == "cpu" else axis
        assert contiguous_axis(volume) == expected_axis and volume.stride(0) == 1
        with torch.no_grad():
            images[axis] = drr(camera).cpu()
    assert float(images[None].abs().max()) > 0.1
    for axis in (0, 1, 2):
        torch.testing.assert_close(images[axis], images[None], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("axis", [3, -1, True, "j"])
def test_drr_rejects_bad_contiguous_axes(axis) -> None:
    with pytest.raises(ValueError, match=r"contiguous_axis must be None, 0 \(i\), 1 \(j\) or 2 \(k\)"):
        torchdrr.DRR(torch.zeros(4, 4, 4), torch.eye(4, dtype=torch.float64), contiguous_axis=axis)
