"""Registration error metrics: hand-computed values, batching, gradients, landmarks and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from torchdrr.geometry.camera import Camera
from torchdrr.geometry.rotations import rotvec_to_matrix
from torchdrr.registration.metrics import (
    RegistrationErrors,
    mtre,
    registration_errors,
    reprojection_error_px,
    rotation_error_deg,
    target_registration_error,
    translation_error_mm,
    volume_landmarks,
)

F64 = torch.float64


def _pose(rotvec: tuple[float, float, float], translation: tuple[float, float, float]) -> tuple[torch.Tensor, ...]:
    rotation = rotvec_to_matrix(torch.tensor(rotvec, dtype=F64))[None]
    return rotation, torch.tensor(translation, dtype=F64)[None]


def _all_metrics(k, r_est, t_est, r_true, t_true, landmarks, center=None) -> list[torch.Tensor]:
    return [
        target_registration_error(r_est, t_est, r_true, t_true, landmarks),
        rotation_error_deg(r_est, r_true),
        translation_error_mm(r_est, t_est, r_true, t_true, center),
        reprojection_error_px(k, r_est, t_est, r_true, t_true, landmarks),
    ]


K_SIMPLE = torch.tensor([[1000.0, 0.0, 100.0], [0.0, 1000.0, 50.0], [0.0, 0.0, 1.0]], dtype=F64)
LANDMARKS = torch.tensor([[0.0, 0.0, 0.0], [10.0, -20.0, 5.0], [-30.0, 15.0, 40.0], [50.0, 60.0, -70.0]], dtype=F64)


# ------------------------------------------------------------------------------------------ hand-computed values


def test_identical_poses_give_exact_zero_and_finite_gradients() -> None:
    rotation, translation = _pose((0.3, -0.2, 0.5), (10.0, -5.0, 800.0))
    rotation_est = rotation.clone().requires_grad_(True)
    translation_est = translation.clone().requires_grad_(True)
    for center in (None, torch.tensor([1.0, 2.0, 3.0], dtype=F64)):
        metrics = _all_metrics(K_SIMPLE, rotation_est, translation_est, rotation, translation, LANDMARKS, center)
        for value in metrics:
            assert value.shape == (1,)
            assert float(value.detach()) == 0.0
        rotation_est.grad = translation_est.grad = None
        sum(metrics).sum().backward()
        assert torch.isfinite(rotation_est.grad).all() and torch.isfinite(translation_est.grad).all()
        # The zero subgradient of a distance at its minimum.
        assert float(rotation_est.grad.abs().max()) == 0.0 and float(translation_est.grad.abs().max()) == 0.0


def test_pure_translation_offset() -> None:
    rotation, translation = _pose((0.4, 0.1, -0.7), (5.0, 10.0, 900.0))
    offset = torch.tensor([3.0, 4.0, 12.0], dtype=F64)  # |d| = 13
    translation_est = translation + offset
    assert torch.allclose(
        mtre(rotation, translation_est, rotation, translation, LANDMARKS),
        torch.tensor([13.0], dtype=F64),
        rtol=0,
        atol=1e-12,
    )
    assert float(rotation_error_deg(rotation, rotation)) == pytest.approx(0.0, abs=1e-12)
    # Sources -R^T t differ by -R^T d, whose norm is |d|; about any centre the point moves by d in the camera frame.
    assert float(translation_error_mm(rotation, translation_est, rotation, translation)) == pytest.approx(
        13.0, abs=1e-12
    )
    center = torch.tensor([-40.0, 7.0, 3.0], dtype=F64)
    assert float(translation_error_mm(rotation, translation_est, rotation, translation, center)) == pytest.approx(
        13.0, abs=1e-12
    )


def test_translation_error_of_a_rotation_about_the_source_is_zero_at_the_source() -> None:
    # Same source s, different orientation: t = -R s for both.
    source = torch.tensor([0.0, -850.0, 0.0], dtype=F64)
    r_true, _ = _pose((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    r_est, _ = _pose((0.0, 0.0, math.radians(10.0)), (0.0, 0.0, 0.0))
    t_true, t_est = -(r_true[0] @ source)[None], -(r_est[0] @ source)[None]
    assert float(translation_error_mm(r_est, t_est, r_true, t_true)) == pytest.approx(0.0, abs=1e-10)
    # About the origin (850 mm from the source) the 10-degree turn moves the point by 2 * 850 * sin(5 deg).
    origin = torch.zeros(3, dtype=F64)
    expected = 2 * 850.0 * math.sin(math.radians(5.0))
    assert float(translation_error_mm(r_est, t_est, r_true, t_true, origin)) == pytest.approx(expected, rel=1e-12)


def _perpendicular_basis(axis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    first = torch.linalg.cross(axis, helper)
    first = first / first.norm()
    return first, torch.linalg.cross(axis, first)


@pytest.mark.parametrize("theta_deg", [1e-4, 1.0, 90.0, 179.9])
def test_known_rotation_about_an_axis_through_the_origin(theta_deg: float) -> None:
    axis = torch.tensor([1.0, 2.0, 2.0], dtype=F64) / 3.0
    theta = math.radians(theta_deg)
    turn = rotvec_to_matrix(theta * axis)
    r_true, t_true = _pose((0.2, -0.6, 0.3), (15.0, -25.0, 780.0))
    r_est, t_est = r_true @ turn, t_true.clone()  # the turn is applied in the world, before the true pose
    assert float(rotation_error_deg(r_est, r_true)) == pytest.approx(theta_deg, abs=1e-6)
    # Landmarks at radius r from the axis (anywhere along it) move by the chord 2 r sin(theta / 2).
    radius = 37.0
    first, second = _perpendicular_basis(axis)
    angles = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=F64)
    heights = torch.tensor([0.0, -20.0, 35.0, 100.0], dtype=F64)
    landmarks = radius * (angles.cos()[:, None] * first + angles.sin()[:, None] * second) + heights[:, None] * axis
    chord = 2 * radius * math.sin(theta / 2)
    assert float(mtre(r_est, t_est, r_true, t_true, landmarks)) == pytest.approx(chord, rel=1e-9, abs=1e-12)
    # Sources: s_est = turn^T s_true, a chord of the circle of radius |s_perp| about the axis.
    source = -(r_true[0].T @ t_true[0])
    source_perp = source - (source @ axis) * axis
    expected = 2 * float(source_perp.norm()) * math.sin(theta / 2)
    assert float(translation_error_mm(r_est, t_est, r_true, t_true)) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # The origin is on the axis: it does not move.
    origin = torch.zeros(3, dtype=F64)
    assert float(translation_error_mm(r_est, t_est, r_true, t_true, origin)) == pytest.approx(0.0, abs=1e-9)


def test_rotation_error_is_symmetric_and_exact_at_half_turn_and_float32() -> None:
    axis = torch.tensor([0.0, 0.6, 0.8], dtype=F64)
    r_true, _ = _pose((0.5, 0.5, -0.2), (0.0, 0.0, 0.0))
    half_turn = r_true @ rotvec_to_matrix(math.pi * axis)
    assert float(rotation_error_deg(half_turn, r_true)) == pytest.approx(180.0, abs=1e-6)
    one_degree = r_true @ rotvec_to_matrix(math.radians(1.0) * axis)
    assert float(rotation_error_deg(r_true, one_degree)) == pytest.approx(1.0, abs=1e-9)
    value32 = rotation_error_deg(one_degree.float(), r_true.float())
    assert value32.dtype == torch.float32 and float(value32) == pytest.approx(1.0, abs=1e-3)


def test_reprojection_error_by_hand() -> None:
    rotation = torch.eye(3, dtype=F64)[None]
    t_true = torch.tensor([[0.0, 0.0, 1000.0]], dtype=F64)
    landmarks = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 1000.0]], dtype=F64)
    # Shift (1, 2, 0) mm: at depth 1000 a pixel of 1000 / 1000 -> (1, 2) px; at depth 2000 -> (0.5, 1) px.
    t_est = torch.tensor([[1.0, 2.0, 1000.0]], dtype=F64)
    expected = (2 * math.sqrt(5.0) + math.sqrt(1.25)) / 3
    value = reprojection_error_px(K_SIMPLE, rotation, t_est, rotation, t_true, landmarks)
    assert float(value) == pytest.approx(expected, rel=1e-12)
    # Depth shift: the source moves 1000 mm back. (10, 0, 0): u 110 -> 105; (0, 0, 0) and the on-axis point stay.
    t_far = torch.tensor([[0.0, 0.0, 2000.0]], dtype=F64)
    value = reprojection_error_px(K_SIMPLE, rotation, t_far, rotation, t_true, landmarks)
    assert float(value) == pytest.approx(5.0 / 3.0, rel=1e-12)
    # A mirrored K (fu < 0) gives the same distances.
    mirrored = K_SIMPLE.clone()
    mirrored[0, 0] = -1000.0
    value = reprojection_error_px(mirrored, rotation, t_est, rotation, t_true, landmarks)
    assert float(value) == pytest.approx(expected, rel=1e-12)


def test_reprojection_matches_camera_project() -> None:
    isocenter = torch.tensor([5.0, -10.0, 20.0], dtype=F64)
    true = Camera.from_carm(torch.tensor([0.0, 30.0], dtype=F64), torch.tensor([0.0, -10.0], dtype=F64), isocenter)
    est = Camera.from_carm(torch.tensor([1.0, 29.0], dtype=F64), torch.tensor([0.5, -9.0], dtype=F64), isocenter)
    landmarks = LANDMARKS + isocenter
    expected = (est.project(landmarks) - true.project(landmarks)).norm(dim=-1).mean(-1)
    value = reprojection_error_px(
        true.intrinsics, est.rotation, est.translation, true.rotation, true.translation, landmarks
    )
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    assert float(value.min()) > 1.0  # a degree of error is many pixels: the check is not vacuous


def test_landmarks_behind_the_source_are_left_out_with_a_warning() -> None:
    rotation = torch.eye(3, dtype=F64)[None]
    t_true = torch.tensor([[0.0, 0.0, 1000.0]], dtype=F64)
    t_est = torch.tensor([[1.0, 2.0, 1000.0]], dtype=F64)
    landmarks = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, -1500.0], [0.0, 0.0, -1000.0]], dtype=F64)
    t_est_grad = t_est.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match=r"behind the source plane"):
        value = reprojection_error_px(K_SIMPLE, rotation, t_est_grad, rotation, t_true, landmarks)
    assert float(value.detach()) == pytest.approx(math.sqrt(5.0), rel=1e-12)  # only the two visible landmarks count
    value.sum().backward()
    assert torch.isfinite(t_est_grad.grad).all()  # the depth-0 landmark does not poison the gradient
    # Every landmark behind the source in the second pose: NaN for it, a finite value for the first.
    t_batch = torch.tensor([[1.0, 2.0, 1000.0], [0.0, 0.0, -5000.0]], dtype=F64)
    with pytest.warns(UserWarning, match=r"pose\(s\) \[1\] have no landmark left"):
        value = reprojection_error_px(K_SIMPLE, rotation, t_batch, rotation, t_true, landmarks[:2])
    assert float(value[0]) == pytest.approx(math.sqrt(5.0), rel=1e-12) and math.isnan(float(value[1]))


# ---------------------------------------------------------------------------------------------- batching, API


def _batch() -> tuple[torch.Tensor, ...]:
    rotvecs = torch.tensor([[0.1, 0.2, 0.3], [-0.4, 0.0, 0.2], [0.0, 1.2, -0.3]], dtype=F64)
    r_est = rotvec_to_matrix(rotvecs)
    t_est = torch.tensor([[1.0, 2.0, 800.0], [-5.0, 0.0, 820.0], [3.0, 3.0, 790.0]], dtype=F64)
    r_true = rotvec_to_matrix(rotvecs + torch.tensor([0.01, -0.02, 0.005], dtype=F64))
    t_true = torch.tensor([[0.0, 0.0, 800.0], [-4.0, 1.0, 810.0], [0.0, 5.0, 800.0]], dtype=F64)
    return r_est, t_est, r_true, t_true


@pytest.mark.parametrize("center", [None, torch.tensor([1.0, -2.0, 3.0], dtype=F64)])
def test_batch_items_equal_single_calls(center) -> None:
    r_est, t_est, r_true, t_true = _batch()
    batched = _all_metrics(K_SIMPLE, r_est, t_est, r_true, t_true, LANDMARKS, center)
    for b in range(3):
        single = _all_metrics(K_SIMPLE, r_est[b], t_est[b], r_true[b : b + 1], t_true[b : b + 1], LANDMARKS, center)
        for many, one in zip(batched, single, strict=True):
            assert many.shape == (3,) and one.shape == (1,)
            torch.testing.assert_close(many[b : b + 1], one, rtol=1e-13, atol=1e-12)
        assert float(batched[0][b]) > 0.1  # non-trivial errors


def test_batch_of_one_broadcasts_against_three() -> None:
    r_est, t_est, r_true, t_true = _batch()
    k_batch = K_SIMPLE.expand(3, 3, 3)
    broadcast = _all_metrics(k_batch, r_est, t_est, r_true[:1], t_true[:1], LANDMARKS)
    expanded = _all_metrics(K_SIMPLE, r_est, t_est, r_true[:1].expand(3, 3, 3), t_true[:1].expand(3, 3), LANDMARKS)
    for a, b in zip(broadcast, expanded, strict=True):
        assert a.shape == (3,)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dtypes_follow_the_poses(device: str) -> None:
    r_est, t_est, r_true, t_true = (x.float().to(device) for x in _batch())
    landmarks = LANDMARKS.to(device)  # float64 landmarks and K are cast to the poses' dtype and device
    values = _all_metrics(K_SIMPLE.to(device), r_est, t_est, r_true, t_true, landmarks)
    reference = _all_metrics(K_SIMPLE, *_batch(), LANDMARKS)
    for value, expected in zip(values, reference, strict=True):
        assert value.dtype == torch.float32 and value.device.type == device
        torch.testing.assert_close(value.cpu().double(), expected, rtol=1e-4, atol=2e-3)


def test_registration_errors_from_cameras() -> None:
    isocenter = torch.tensor([0.0, 0.0, 10.0], dtype=F64)
    true = Camera.from_carm(torch.tensor([0.0, 45.0, 90.0], dtype=F64), 0.0, isocenter)
    est = Camera.from_carm(torch.tensor([2.0, 44.0, 90.5], dtype=F64), 1.0, isocenter + 2.0)
    errors = registration_errors(est, true, LANDMARKS, center=isocenter)
    assert isinstance(errors, RegistrationErrors)
    expected = _all_metrics(
        true.intrinsics, est.rotation, est.translation, true.rotation, true.translation, LANDMARKS, isocenter
    )
    for value, reference in zip(errors, expected, strict=True):
        assert value.shape == (3,)
        torch.testing.assert_close(value, reference, rtol=1e-13, atol=1e-12)
    assert bool((errors.mtre_mm > 1.0).all()) and bool((errors.rotation_deg > 0.5).all())
    single = registration_errors(est, Camera.from_carm(0.0, 0.0, isocenter.float()).to(dtype=F64), LANDMARKS)
    assert single.mtre_mm.shape == (3,)  # a one-pose true camera broadcasts


# ------------------------------------------------------------------------------------------------- gradients


def test_gradcheck_mtre_and_reprojection_in_translation() -> None:
    r_est, t_est, r_true, t_true = _batch()
    t_est = t_est.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mtre(r_est, t, r_true, t_true, LANDMARKS), (t_est,))
    assert torch.autograd.gradcheck(
        lambda t: reprojection_error_px(K_SIMPLE, r_est, t, r_true, t_true, LANDMARKS), (t_est,)
    )
    assert torch.autograd.gradcheck(lambda t: translation_error_mm(r_est, t, r_true, t_true), (t_est,))


def test_gradcheck_rotation_error_in_rotvec() -> None:
    rotvec = torch.tensor([[0.3, -0.5, 0.8], [1.0, 0.2, -0.1]], dtype=F64, requires_grad=True)
    r_true = rotvec_to_matrix(torch.tensor([0.1, 0.1, 0.1], dtype=F64))
    assert torch.autograd.gradcheck(lambda v: rotation_error_deg(rotvec_to_matrix(v), r_true), (rotvec,))
    # Near identity the gradient has unit norm in degrees per degree (the angle is |rotvec difference|).
    small = torch.tensor([[1e-3, 0.0, 0.0]], dtype=F64, requires_grad=True)
    rotation_error_deg(rotvec_to_matrix(small), torch.eye(3, dtype=F64)).sum().backward()
    torch.testing.assert_close(small.grad, torch.tensor([[180.0 / math.pi, 0.0, 0.0]], dtype=F64))


# ------------------------------------------------------------------------------------------------- landmarks


AFFINE = torch.tensor(
    [[2.0, 0.0, 0.0, -100.0], [0.0, 3.0, 0.0, 50.0], [0.0, 0.0, 0.5, 10.0], [0.0, 0.0, 0.0, 1.0]], dtype=F64
)
SHAPE = (20, 10, 30)


def _to_index(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    inverse = torch.linalg.inv(affine)
    return points @ inverse[:3, :3].T + inverse[:3, 3]


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.25])
def test_landmarks_lie_in_the_shrunk_box(margin: float) -> None:
    points = volume_landmarks(SHAPE, AFFINE, count=4000, seed=3, margin=margin)
    assert points.shape == (4000, 3) and points.dtype == F64
    index = _to_index(points, AFFINE)
    size = torch.tensor(SHAPE, dtype=F64)
    low, high = -0.5 + margin * size, size - 0.5 - margin * size
    assert bool((index >= low).all()) and bool((index <= high).all())
    # Uniform: they fill the box (within 2 % of each face) and average to its centre.
    assert bool((index.amin(0) < low + 0.02 * (high - low)).all()) and bool(
        (index.amax(0) > high - 0.02 * (high - low)).all()
    )
    torch.testing.assert_close(index.mean(0), (size - 1) / 2, rtol=0, atol=0.03 * float(size.max()))


def test_landmarks_margin_excludes_the_border() -> None:
    wide = _to_index(volume_landmarks(SHAPE, AFFINE, count=2000, margin=0.0), AFFINE)
    narrow = _to_index(volume_landmarks(SHAPE, AFFINE, count=2000, margin=0.3), AFFINE)
    border = torch.tensor(SHAPE, dtype=F64) * 0.3 - 0.5
    assert bool((wide[:, 0] < border[0]).any())  # margin 0 does reach the border
    assert not bool((narrow[:, 0] < border[0]).any())


def test_landmarks_are_reproducible_and_seeded() -> None:
    first = volume_landmarks(SHAPE, AFFINE, count=50, seed=7)
    again = volume_landmarks(SHAPE, AFFINE, count=50, seed=7)
    other = volume_landmarks(SHAPE, AFFINE, count=50, seed=8)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_landmarks_use_the_affine() -> None:
    identity = volume_landmarks(SHAPE, torch.eye(4, dtype=F64), count=100, seed=1)
    scaled = volume_landmarks(SHAPE, AFFINE, count=100, seed=1)
    scale = torch.tensor([2.0, 3.0, 0.5], dtype=F64)
    offset = torch.tensor([-100.0, 50.0, 10.0], dtype=F64)
    torch.testing.assert_close(scaled, identity * scale + offset, rtol=0, atol=1e-12)
    # Numpy affines and float32 tensors are accepted; the dtype follows a tensor affine.
    torch.testing.assert_close(volume_landmarks(SHAPE, AFFINE.numpy(), count=100, seed=1), scaled)
    assert volume_landmarks(SHAPE, AFFINE.float(), count=5).dtype == torch.float32


def test_landmarks_respect_a_mask() -> None:
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[3, 1, 2] = True  # a border voxel: outside a 10 % margin box
    with pytest.raises(ValueError, match="no True voxel inside the box"):
        volume_landmarks(SHAPE, AFFINE, count=10, mask=mask)
    points = volume_landmarks(SHAPE, AFFINE, count=10, mask=mask, margin=0.0)
    torch.testing.assert_close(points, torch.tensor([[-94.0, 53.0, 11.0]], dtype=F64).expand(10, 3))
    # A body-like block: every point maps back to the centre of a True voxel inside the margin box.
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[5:15, 2:8, 4:20] = True
    mask[7, 3, 10] = False
    points = volume_landmarks(SHAPE, AFFINE, count=500, seed=2, mask=mask, margin=0.2)
    index = _to_index(points, AFFINE)
    rounded = index.round()
    torch.testing.assert_close(index, rounded, rtol=0, atol=1e-9)
    i, j, k = rounded.long().unbind(-1)
    assert bool(mask[i, j, k].all())
    size = torch.tensor(SHAPE, dtype=F64)
    assert bool((rounded >= -0.5 + 0.2 * size).all()) and bool((rounded <= size - 0.5 - 0.2 * size).all())
    assert len({tuple(row) for row in rounded.tolist()}) > 50  # spread over many voxels


# ------------------------------------------------------------------------------------------------- bad input

_R, _T = torch.eye(3, dtype=F64)[None], torch.tensor([[0.0, 0.0, 800.0]], dtype=F64)
_NAN_T = torch.tensor([[0.0, math.nan, 800.0]], dtype=F64)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: mtre(torch.eye(3, 4, dtype=F64)[None], _T, _R, _T, LANDMARKS),
            r"rotation_est must have shape \[B, 3, 3\] \(or \[3, 3\]\), got \(1, 3, 4\)",
        ),
        (
            lambda: mtre(_R, _T[:, :2], _R, _T, LANDMARKS),
            r"translation_est must have shape \[B, 3\] \(or \[3\]\), got \(1, 2\)",
        ),
        (
            lambda: mtre(_R, _T, _R, _T, LANDMARKS[:, :2]),
            r"landmarks must have shape \[N, 3\] \(world mm\), got \(4, 2\)",
        ),
        (lambda: mtre(_R, _T, _R, _T, LANDMARKS[:0]), r"landmarks must hold at least one point \(N >= 1\)"),
        (lambda: mtre(_R, _T, _R, _T, LANDMARKS.long()), r"landmarks must be a floating-point tensor"),
        (lambda: mtre(_R, _NAN_T, _R, _T, LANDMARKS), r"translation_est must be finite"),
        (lambda: mtre(_R, _T, _R, _T, LANDMARKS * math.inf), r"landmarks must be finite"),
        (
            lambda: mtre(_R.expand(2, 3, 3), _T.expand(3, 3), _R, _T, LANDMARKS),
            r"batch sizes must be equal or 1 \(broadcastable\), got rotation_est: 2, translation_est: 3",
        ),
        (lambda: mtre(_R[:0], _T, _R, _T, LANDMARKS), r"rotation_est must hold at least one pose"),
        (lambda: mtre([[1.0]], _T, _R, _T, LANDMARKS), r"rotation_est must be a torch.Tensor, got list"),
        (lambda: rotation_error_deg(_R, _R.expand(2, 3, 3)[:, :2]), r"rotation_true must have shape \[B, 3, 3\]"),
        (lambda: translation_error_mm(_R, _T, _R, _T, torch.zeros(2, 3, dtype=F64)), r"center must have shape \[3\]"),
        (lambda: translation_error_mm(_R, _T, _R, _T, torch.full((3,), math.nan)), r"center must be finite"),
        (
            lambda: reprojection_error_px(K_SIMPLE[:2], _R, _T, _R, _T, LANDMARKS),
            r"intrinsics must have shape \[B, 3, 3\]",
        ),
        (
            lambda: reprojection_error_px(K_SIMPLE.expand(2, 3, 3), _R.expand(3, 3, 3), _T, _R, _T, LANDMARKS),
            r"batch sizes must be equal or 1.*intrinsics: 2, rotation_est: 3",
        ),
        (lambda: registration_errors(_R, _R, LANDMARKS), r"camera_est must be a torchdrr.geometry.Camera, got Tensor"),
        (lambda: volume_landmarks(SHAPE, AFFINE, count=0), r"count must be a whole number >= 1, got 0"),
        (lambda: volume_landmarks(SHAPE, AFFINE, count=2.5), r"count must be a whole number >= 1, got 2.5"),
        (lambda: volume_landmarks(SHAPE, AFFINE, margin=0.5), r"margin must be a fraction in \[0, 0.5\), got 0.5"),
        (lambda: volume_landmarks(SHAPE, AFFINE, margin=-0.1), r"margin must be a fraction in \[0, 0.5\), got -0.1"),
        (lambda: volume_landmarks((20, 10), AFFINE), r"shape must be three voxel counts \(I, J, K\)"),
        (lambda: volume_landmarks((20, 0, 5), AFFINE), r"shape must be three whole numbers >= 1"),
        (lambda: volume_landmarks(SHAPE, AFFINE[:3]), r"affine must have shape \[4, 4\] .*got \(3, 4\)"),
        (lambda: volume_landmarks(SHAPE, AFFINE * math.nan), r"affine must be finite"),
        (
            lambda: volume_landmarks(SHAPE, torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0]))),
            r"affine's 3x3 linear part is singular",
        ),
        (lambda: volume_landmarks(SHAPE, AFFINE, mask=torch.zeros(SHAPE, dtype=torch.bool)), r"mask is empty"),
        (
            lambda: volume_landmarks(SHAPE, AFFINE, mask=torch.ones(SHAPE)),
            r"mask must be a boolean tensor, got torch.float32",
        ),
        (
            lambda: volume_landmarks(SHAPE, AFFINE, mask=torch.ones(20, 10, 3, dtype=torch.bool)),
            r"mask must have the volume's shape \[20, 10, 30\], got \[20, 10, 3\]",
        ),
    ],
)
def test_bad_input_raises_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
