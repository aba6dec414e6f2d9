"""Tests of the voxel quads (torchdrr.ops.trilinear_quads) that the GPU's trilinear samples read instead of the
volume: their content for every layout, their checks, and images and gradients identical to the bit with and
without them (CPU, where they are checked and ignored, and CUDA, where the interior samples read them)."""

from __future__ import annotations

import itertools

import pytest
import torch

import torchdrr
from torchdrr.geometry import Camera
from torchdrr.ops import camera_raycast, contiguous_axis, trilinear_quads, with_contiguous_axis

from .conftest import cuda_ready

needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")


def expected_quads(values: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The definition, voxel by voxel: (v, v + a, v + b, v + a + b), neighbours past the last voxel clamped."""
    out = torch.empty((*values.shape, 4), dtype=values.dtype)
    sizes = values.shape
    for index in itertools.product(*(range(n) for n in sizes)):

        def step(idx, axis):
            moved = list(idx)
            moved[axis] = min(moved[axis] + 1, sizes[axis] - 1)
            return tuple(moved)

        out[index] = torch.stack([values[index], values[step(index, a)], values[step(index, b)],
                                  values[step(step(index, a), b)]])  # fmt: skip
    return out


@pytest.mark.parametrize("shape", [(4, 5, 6), (1, 5, 6), (4, 1, 6), (4, 5, 1)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_quads_hold_the_stencil_neighbours_for_every_layout(shape, axis) -> None:
    values = torch.rand(shape, generator=torch.Generator().manual_seed(axis))
    volume = with_contiguous_axis(values, axis)
    quads = trilinear_quads(volume)
    a = contiguous_axis(volume)
    b = 2 if a == 1 else 1  # the kernels' axis 1 after they relabel the contiguous axis as axis 2
    assert quads.shape == (*shape, 4) and quads.dtype == torch.float32
    assert quads.stride() == (*(4 * s for s in volume.stride()), 1)  # a voxel's quad at 4x its offset
    torch.testing.assert_close(quads, expected_quads(values, a, b), rtol=0, atol=0)
    assert not torch.equal(quads[..., 0], quads[..., 1]) or shape[a] == 1  # the neighbours are not the voxel


def test_quads_of_a_one_channel_4d_volume_keep_its_shape() -> None:
    volume = torch.rand(1, 3, 4, 5)
    quads = trilinear_quads(volume)
    assert quads.shape == (1, 3, 4, 5, 4)
    torch.testing.assert_close(quads[0], trilinear_quads(volume[0]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("volume", "error", "match"),
    [
        (torch.rand(3, 4, 5, dtype=torch.float64), TypeError, "float32"),
        (torch.rand(2, 3, 4, 5), ValueError, "one channel"),
        (torch.rand(6, 4, 5)[::2], ValueError, "dense"),
        (torch.rand(4, 5), ValueError, r"\[I, J, K\]"),
    ],
)
def test_quads_refuse_volumes_they_cannot_serve(volume, error, match) -> None:
    with pytest.raises(error, match=match):
        trilinear_quads(volume)


def scene(device="cpu", axis=2, shape=(23, 19, 11), seed=0):
    """A random float32 volume stored with `axis` contiguous (0.7 x 0.8 x 2.5 mm voxels around the origin) and three
    cameras: AP, oblique, and one whose source sits inside the volume (rays start inside and leave every face)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=generator)
    spacing = torch.tensor([0.7, 0.8, 2.5], dtype=torch.float64)
    affine = torch.diag(torch.cat([spacing, torch.ones(1, dtype=torch.float64)]))
    affine[:3, 3] = -0.5 * spacing * (torch.tensor(shape, dtype=torch.float64) - 1)
    centre = torch.zeros(3, dtype=torch.float64)
    cameras = (
        Camera.from_carm(primary, secondary, centre, sod_mm=sod, sdd_mm=600.0, height=21, width=17,
                         pixel_spacing_mm=(1.9, 2.3))
        for primary, secondary, sod in ((180.0, 0.0, 300.0), (133.0, 17.0, 300.0), (20.0, -8.0, 2.0))
    )  # fmt: skip
    sources, matrices = (
        torch.cat(parts).float().to(device) for parts in zip(*(c.ray_parameters() for c in cameras), strict=True)
    )
    return with_contiguous_axis(values.to(device), axis), affine, sources, matrices


def test_cpu_checks_and_ignores_quads() -> None:
    volume, affine, sources, matrices = scene()
    plain = camera_raycast(volume, affine, sources, matrices, 21, 17, mode="trilinear")
    with_quads = camera_raycast(volume, affine, sources, matrices, 21, 17, mode="trilinear",
                                quads=trilinear_quads(volume))  # fmt: skip
    assert float(plain.abs().max()) > 1.0
    torch.testing.assert_close(with_quads, plain, rtol=0, atol=0)


def test_quads_errors_name_the_argument() -> None:
    volume, affine, sources, matrices = scene()
    quads = trilinear_quads(volume)
    cast = dict(affine=affine, sources=sources, ray_matrices=matrices, height=21, width=17)
    with pytest.raises(ValueError, match="trilinear renders only"):
        camera_raycast(volume, mode="siddon", quads=quads, **cast)
    with pytest.raises(TypeError, match="quads must be None or"):
        camera_raycast(volume, mode="trilinear", quads=quads.numpy(), **cast)
    with pytest.raises(ValueError, match=r"float32 \(23, 19, 11, 4\)"):
        camera_raycast(volume, mode="trilinear", quads=quads[..., :3], **cast)
    with pytest.raises(ValueError, match="float32"):
        camera_raycast(volume, mode="trilinear", quads=quads.double(), **cast)
    other_layout = trilinear_quads(with_contiguous_axis(volume, 0))  # the same values, another volume's strides
    with pytest.raises(ValueError, match="strides 4x the volume's"):
        camera_raycast(volume, mode="trilinear", quads=other_layout, **cast)
    with pytest.raises(ValueError, match="one-channel"):  # the op's own check, for direct callers
        torch.ops.torchdrr.camera_raycast_forward(
            volume.expand(2, *volume.shape), affine, sources, matrices, 21, 17, 1, 1, 0.0, quads[None]
        )


def test_opcheck_and_compile_with_quads() -> None:
    volume, affine, sources, matrices = scene(shape=(6, 5, 4))
    quads = trilinear_quads(volume)
    args = (volume[None], affine, sources, matrices, 5, 4, 1, 1, 0.0, quads[None])
    torch.library.opcheck(torch.ops.torchdrr.camera_raycast_forward.default, args)
    compiled = torch.compile(
        lambda v, q: camera_raycast(v, affine, sources, matrices, 5, 4, mode="trilinear", quads=q), fullgraph=True
    )
    expected = camera_raycast(volume, affine, sources, matrices, 5, 4, mode="trilinear")
    torch.testing.assert_close(compiled(volume, quads), expected, rtol=0, atol=0)


def gradients(volume, affine, sources, matrices, quads):
    """(image, d/dvolume, d/dsources, d/dmatrices) of a weighted sum of the trilinear image."""
    v, s, m = (t.detach().clone().requires_grad_() for t in (volume, sources, matrices))
    image = camera_raycast(v, affine, s, m, 21, 17, mode="trilinear", quads=quads)
    weights = torch.linspace(0.5, 1.5, image.numel(), device=image.device).reshape(image.shape)
    return (image.detach(), *torch.autograd.grad((image * weights).sum(), (v, s, m)))


def test_gradients_with_quads_are_the_volumes(device) -> None:
    """The backward reads the volume, never the quads: the same image to the bit and the same gradients (up to the
    order of the threads' sums)."""
    volume, affine, sources, matrices = scene(device, 0)
    with_quads = gradients(volume, affine, sources, matrices, trilinear_quads(volume))
    plain = gradients(volume, affine, sources, matrices, None)
    torch.testing.assert_close(with_quads[0], plain[0], rtol=0, atol=0)  # the image
    for got, expected in zip(with_quads[1:], plain[1:], strict=True):
        assert float(expected.abs().max()) > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


# ------------------------------------------------------------------------------------------------------------
# CUDA: the interior samples read the quads; the image must not change by one bit
# ------------------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("supersample", [1, 2])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cuda_image_with_quads_is_bit_identical(axis, supersample) -> None:
    volume, affine, sources, matrices = scene("cuda", axis)
    cast = dict(mode="trilinear", supersample=supersample)
    for step in (None, 0.3, 1.7):  # samples closer and farther apart than the voxels
        plain = camera_raycast(volume, affine, sources, matrices, 21, 17, step=step, **cast)
        with_quads = camera_raycast(volume, affine, sources, matrices, 21, 17, step=step,
                                    quads=trilinear_quads(volume), **cast)  # fmt: skip
        assert float(plain.abs().max()) > 1.0
        torch.testing.assert_close(with_quads, plain, rtol=0, atol=0)
        # and as close to the float64 image as the CPU's float32 image is (rays along voxel faces turn endpoint
        # rounding into differences above any fixed tolerance, on both)
        host = (volume.cpu(), affine, sources.cpu(), matrices.cpu(), 21, 17)
        cpu = camera_raycast(*host, step=step, **cast)
        exact = camera_raycast(host[0].double(), affine, host[2].double(), host[3].double(), 21, 17, step=step, **cast)
        cpu_error, gpu_error = (cpu.double() - exact).abs(), (with_quads.cpu().double() - exact).abs()
        assert float(gpu_error.max()) <= 2 * float(cpu_error.max()) + 1e-6 * float(exact.abs().max())


@needs_cuda
def test_cuda_quads_see_the_whole_volume() -> None:
    """One hot voxel at a time, at the corners and faces of the grid: every one shows in the image with quads
    exactly as without them (a quad built from the wrong neighbour or read at the wrong offset would not)."""
    volume, affine, sources, matrices = scene("cuda", 0, shape=(9, 8, 7))
    volume = torch.zeros_like(volume)
    for index in itertools.product((0, 1, 4, 7), (0, 3, 7), (0, 2, 6)):
        volume.zero_()
        volume[index] = 1.0
        plain = camera_raycast(volume, affine, sources, matrices, 21, 17, mode="trilinear", step=0.2)
        with_quads = camera_raycast(volume, affine, sources, matrices, 21, 17, mode="trilinear", step=0.2,
                                    quads=trilinear_quads(volume))  # fmt: skip
        torch.testing.assert_close(with_quads, plain, rtol=0, atol=0)


@needs_cuda
def test_cuda_graph_replays_the_quads_render() -> None:
    volume, affine, sources, matrices = scene("cuda", 0)
    quads = trilinear_quads(volume)

    def render(source_points: torch.Tensor) -> torch.Tensor:
        return camera_raycast(volume, affine, source_points, matrices, 21, 17, mode="trilinear", quads=quads)

    replay = torchdrr.cuda_graphed(render, sources)
    moved = sources + torch.tensor([1.5, -2.0, 0.5], device="cuda")
    torch.testing.assert_close(replay(moved), camera_raycast(volume, affine, moved, matrices, 21, 17,
                                                             mode="trilinear"), rtol=0, atol=0)  # fmt: skip


@needs_cuda
def test_cuda_quads_must_be_on_the_volumes_device() -> None:
    volume, affine, sources, matrices = scene("cuda", 2)
    with pytest.raises(ValueError, match="quads must be"):
        camera_raycast(volume, affine, sources, matrices, 21, 17, mode="trilinear",
                       quads=trilinear_quads(volume.cpu()))  # fmt: skip
