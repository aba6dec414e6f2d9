"""Gradients of a DRR loss with respect to every pose parameterisation match finite differences (float64, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import torchdrr
from torchdrr.geometry import carm_extrinsics, extrinsics_to_pose, intrinsic_matrix, pixel_rays, pose_to_extrinsics

HEIGHT, WIDTH, SDD = 5, 6, 600.0
CASES = [
    ("matrix", None),
    ("rotvec", None),
    ("quaternion", None),
    ("euler", "ZXY"),
    ("euler", "xyz"),
    ("euler", "ZYZ"),
    ("6d", None),
    ("se3", None),
]


@pytest.fixture(scope="module")
def scene():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(8, 9, 7, generator=generator, dtype=torch.float64)
    affine = torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-14.0, -16.0, -12.0])  # centre at the world origin
    intrinsics = intrinsic_matrix(SDD, HEIGHT, WIDTH, (7.0, 7.0))  # the field covers the volume
    weights = torch.rand(HEIGHT * WIDTH, generator=generator, dtype=torch.float64)
    return volume, affine, intrinsics, weights


@pytest.mark.parametrize(("parameterization", "convention"), CASES, ids=[f"{p}-{c}" for p, c in CASES])
@pytest.mark.parametrize("mode", ["siddon", "trilinear"])
def test_drr_loss_gradient_matches_finite_differences(scene, parameterization, convention, mode) -> None:
    volume, affine, intrinsics, weights = scene
    rotation, translation = carm_extrinsics(25.0, -12.0, 400.0, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    params = extrinsics_to_pose(rotation, translation, parameterization, convention).detach().requires_grad_()

    def loss(p: torch.Tensor) -> torch.Tensor:
        R, t = pose_to_extrinsics(p, parameterization, convention)
        sources, targets = pixel_rays(intrinsics, R, t, HEIGHT, WIDTH, SDD)
        image = torchdrr.raycast(volume, affine, sources, targets, mode=mode)
        assert float(image.detach().min()) > 0  # every pixel sees the volume, so the loss depends on the whole pose
        return (image.reshape(-1) * weights).sum()

    assert gradcheck(loss, (params,), eps=1e-6, atol=1e-6, rtol=1e-5)
