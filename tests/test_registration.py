"""``torchdrr.registration.register`` on a small CPU case: a perturbed pose is recovered."""

from __future__ import annotations

import torch

from torchdrr import DRR
from torchdrr.geometry import Camera
from torchdrr.io import Volume, bundled_ct_path
from torchdrr.registration import offset_camera, register, registration_errors, volume_landmarks


def test_register_recovers_a_perturbed_pose_on_the_cpu() -> None:
    volume = Volume.load(bundled_ct_path(), fix_padding=True)
    drr = DRR(volume)
    center = drr.volume_center
    camera = Camera.from_carm(torch.tensor([0.0], dtype=torch.float64), 0.0, center, height=48, width=48,
                              pixel_spacing_mm=(7.7, 7.7))  # fmt: skip
    truth = torch.tensor([[4.0, -3.0, 2.0, 8.0, -6.0, 5.0]], dtype=torch.float64)  # degrees, mm
    true_camera = offset_camera(camera, truth, center)
    xray = drr(true_camera, output="line_integral", noisy=False)[0, 0]
    landmarks = volume_landmarks(drr.volume_shape, drr.affine, count=50, seed=3)
    before = registration_errors(camera, true_camera, landmarks)
    result = register(drr, xray, camera, loss="ncc", levels=(2, 1), iterations=(120, 80))
    after = registration_errors(result.camera, true_camera, landmarks)
    assert float(before.mtre_mm[0]) > 10
    assert float(after.mtre_mm[0]) < 1.0, after
    assert result.renders >= result.iterations > 0 and result.losses[-1] <= result.losses[0]
