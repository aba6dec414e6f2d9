"""Projection matrices: build, decompose (fixed sign conventions), project, and detector <-> intrinsics."""

from __future__ import annotations

import math

import pytest
import torch

from torchdrr.geometry import carm_extrinsics, intrinsic_matrix, pixel_rays
from torchdrr.geometry.projection import (
    decompose_projection,
    detector_to_intrinsics,
    intrinsics_to_detector,
    project_points,
    projection_matrix,
)
from torchdrr.geometry.rotations import rotvec_to_matrix

F64 = torch.float64
SDD, SOD, HEIGHT, WIDTH, SPACING = 1020.0, 785.0, 24, 32, (0.9, 1.1)
ISOCENTER = torch.tensor([12.0, -30.0, 45.0], dtype=F64)


def random_carm_poses(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    primary = (torch.rand(count, generator=generator, dtype=F64) - 0.5) * 360
    secondary = (torch.rand(count, generator=generator, dtype=F64) - 0.5) * 80
    return carm_extrinsics(primary, secondary, SOD, ISOCENTER)


def test_projection_matrix_is_k_times_r_t_and_broadcasts():
    intrinsics = intrinsic_matrix(SDD, HEIGHT, WIDTH, SPACING)
    rotation, translation = random_carm_poses(5, seed=0)
    projection = projection_matrix(intrinsics, rotation, translation)
    assert projection.shape == (5, 3, 4)
    for index in range(5):
        expected = intrinsics @ torch.cat([rotation[index], translation[index, :, None]], 1)
        torch.testing.assert_close(projection[index], expected, atol=0, rtol=1e-14)  # batched vs single matmul: 1 ulp


def test_decomposition_recovers_mirrored_carm_cameras_exactly():
    intrinsics = intrinsic_matrix(SDD, HEIGHT, WIDTH, SPACING)
    assert intrinsics[0, 0] < 0  # the mirrored K this test is about
    rotation, translation = random_carm_poses(32, seed=1)
    projection = projection_matrix(intrinsics, rotation, translation)
    scales = torch.logspace(-3, 3, 32, dtype=F64)[:, None, None]
    for scaled in (projection, projection * scales):  # any positive scale
        recovered_k, recovered_r, recovered_t = decompose_projection(scaled)
        torch.testing.assert_close(recovered_k, intrinsics.expand(32, 3, 3), atol=1e-9, rtol=0)
        torch.testing.assert_close(recovered_r, rotation, atol=1e-12, rtol=0)
        torch.testing.assert_close(recovered_t, translation, atol=1e-9, rtol=0)
        torch.testing.assert_close(torch.linalg.det(recovered_r), torch.ones(32, dtype=F64))


def test_negative_scale_needs_a_reference_point_in_front_of_the_camera():
    intrinsics = intrinsic_matrix(SDD, HEIGHT, WIDTH, SPACING)
    rotation, translation = random_carm_poses(8, seed=2)
    flipped = -2.5 * projection_matrix(intrinsics, rotation, translation)
    recovered_k, recovered_r, recovered_t = decompose_projection(flipped, reference_point=ISOCENTER)
    torch.testing.assert_close(recovered_k, intrinsics.expand(8, 3, 3), atol=1e-9, rtol=0)
    torch.testing.assert_close(recovered_r, rotation, atol=1e-12, rtol=0)
    torch.testing.assert_close(recovered_t, translation, atol=1e-9, rtol=0)
    # Without it the scale is assumed positive: the same P read as a camera facing the other way, fu > 0.
    back_k, back_r, back_t = decompose_projection(flipped)
    assert bool((back_k[:, 0, 0] > 0).all()) and bool((back_k[:, 1, 1] > 0).all())
    torch.testing.assert_close(back_r, torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=F64)) @ rotation)
    torch.testing.assert_close(projection_matrix(back_k, back_r, back_t), flipped / 2.5, atol=1e-9, rtol=1e-12)
    depth = (back_r @ ISOCENTER + back_t)[:, 2]
    assert bool((depth < 0).all())  # the isocenter is behind that reading, which is why the reference point exists


def test_decomposition_of_general_cameras_round_trips_with_fixed_signs():
    generator = torch.Generator().manual_seed(3)
    count = 64
    rotation = rotvec_to_matrix(torch.randn(count, 3, generator=generator, dtype=F64))
    translation = 500 * torch.randn(count, 3, generator=generator, dtype=F64)
    fu = (800 + 400 * torch.rand(count, generator=generator, dtype=F64)) * torch.where(
        torch.rand(count, generator=generator) < 0.5, -1.0, 1.0
    ).to(F64)
    intrinsics = torch.zeros(count, 3, 3, dtype=F64)
    intrinsics[:, 0, 0] = fu
    intrinsics[:, 0, 1] = 5 * torch.randn(count, generator=generator, dtype=F64)  # skew survives
    intrinsics[:, 0, 2] = 100 * torch.randn(count, generator=generator, dtype=F64)
    intrinsics[:, 1, 1] = 700 + 500 * torch.rand(count, generator=generator, dtype=F64)
    intrinsics[:, 1, 2] = 100 * torch.randn(count, generator=generator, dtype=F64)
    intrinsics[:, 2, 2] = 1
    scale = 10 ** (4 * torch.rand(count, 1, 1, generator=generator, dtype=F64) - 2)
    projection = scale * projection_matrix(intrinsics, rotation, translation)
    recovered_k, recovered_r, recovered_t = decompose_projection(projection)
    torch.testing.assert_close(recovered_k, intrinsics, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(recovered_r, rotation, atol=1e-12, rtol=0)
    torch.testing.assert_close(recovered_t, translation, atol=1e-8, rtol=1e-12)
    rebuilt = projection_matrix(recovered_k, recovered_r, recovered_t)
    torch.testing.assert_close(rebuilt, projection / scale, atol=1e-8, rtol=1e-12)


def test_decomposition_is_differentiable():
    intrinsics = intrinsic_matrix(SDD / 100, 4, 5, (1.0, 1.2))
    rotation, translation = carm_extrinsics(torch.tensor([30.0]), torch.tensor([-10.0]), SOD / 100, ISOCENTER / 100)
    projection = projection_matrix(intrinsics, rotation, translation).requires_grad_(True)
    torch.autograd.gradcheck(decompose_projection, (projection,))


def test_project_points_sends_each_pixel_target_back_to_its_pixel():
    intrinsics = intrinsic_matrix(SDD, HEIGHT, WIDTH, SPACING)
    rotation, translation = random_carm_poses(6, seed=4)
    _, targets = pixel_rays(intrinsics, rotation, translation, HEIGHT, WIDTH, SDD)
    rows, cols = torch.meshgrid(torch.arange(HEIGHT, dtype=F64), torch.arange(WIDTH, dtype=F64), indexing="ij")
    expected = torch.stack([cols, rows], -1).reshape(1, -1, 2).expand(6, -1, -1)  # (u, v) = (c, r)
    from_projection = project_points(projection_matrix(intrinsics, rotation, translation), targets)
    from_kRt = project_points((intrinsics, rotation, translation), targets)
    torch.testing.assert_close(from_projection, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_kRt, expected, atol=1e-6, rtol=0)
    # The isocenter sits on the principal ray: it projects to the detector centre.
    centre = project_points((intrinsics, rotation, translation), ISOCENTER.reshape(1, 1, 3))
    torch.testing.assert_close(centre, torch.tensor([[[(WIDTH - 1) / 2, (HEIGHT - 1) / 2]]] * 6, dtype=F64))


def test_project_points_gradcheck():
    projection = projection_matrix(
        intrinsic_matrix(SDD, HEIGHT, WIDTH, SPACING), *carm_extrinsics(20.0, 5.0, SOD, ISOCENTER)
    ).requires_grad_(True)
    points = (ISOCENTER + torch.tensor([[10.0, -20.0, 5.0], [-40.0, 3.0, 60.0]], dtype=F64)).requires_grad_(True)
    torch.autograd.gradcheck(project_points, (projection, points))


def test_detector_and_intrinsics_round_trip():
    for mirror in (True, False):
        intrinsics = intrinsic_matrix(SDD, HEIGHT, WIDTH, SPACING, mirror=mirror)
        torch.testing.assert_close(
            detector_to_intrinsics(SDD, SPACING, HEIGHT, WIDTH, mirror=mirror), intrinsics, atol=0, rtol=0
        )
        detector = intrinsics_to_detector(intrinsics, SDD)
        torch.testing.assert_close(detector.pixel_spacing_mm, torch.tensor(SPACING, dtype=F64), atol=1e-15, rtol=0)
        torch.testing.assert_close(
            detector.principal_point_px, torch.tensor([(WIDTH - 1) / 2, (HEIGHT - 1) / 2], dtype=F64)
        )
        assert bool(detector.mirror) is mirror
    offsets = torch.tensor([[2.5, -1.25], [-7.0, 3.0]], dtype=F64)
    shifted = detector_to_intrinsics(torch.tensor([900.0, 1100.0], dtype=F64), SPACING, HEIGHT, WIDTH, offsets)
    detector = intrinsics_to_detector(shifted, torch.tensor([900.0, 1100.0], dtype=F64))
    torch.testing.assert_close(detector.pixel_spacing_mm, torch.tensor([SPACING] * 2, dtype=F64))
    centre = torch.tensor([(WIDTH - 1) / 2, (HEIGHT - 1) / 2], dtype=F64)
    torch.testing.assert_close(detector.principal_point_px - centre, offsets, atol=1e-13, rtol=0)
    assert detector.mirror.tolist() == [True, True]


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: decompose_projection(torch.zeros(3, 3, dtype=F64)), "projection"),
        (lambda: decompose_projection(torch.full((3, 4), math.nan, dtype=F64)), "projection"),
        (
            lambda: decompose_projection(
                torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 1.0], [0.0, 0.0, 1.0, 5.0]], dtype=F64)
            ),
            "projection",
        ),
        (lambda: decompose_projection(torch.eye(3, 4, dtype=F64), reference_point=torch.zeros(2)), "reference_point"),
        (lambda: project_points(torch.eye(3, 4), torch.zeros(5, 2)), "points"),
        (lambda: project_points(torch.eye(4), torch.zeros(5, 3)), "camera"),
        (lambda: project_points((torch.eye(3), torch.eye(3)), torch.zeros(5, 3)), "camera"),
        (lambda: projection_matrix(torch.eye(3), torch.eye(3), torch.zeros(4)), "translation"),
        (lambda: projection_matrix(torch.eye(2), torch.eye(3), torch.zeros(3)), "intrinsics"),
        (lambda: intrinsics_to_detector(torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]), 10.0), "intrinsics"),
        (lambda: intrinsics_to_detector(torch.eye(3), -1.0), "sdd_mm"),
        (lambda: detector_to_intrinsics(1000.0, (0.0, 1.0), 4, 4), "pixel_spacing_mm"),
        (lambda: detector_to_intrinsics(1000.0, (1.0, 1.0), 4, 4, (math.inf, 0.0)), "principal_offset_px"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
