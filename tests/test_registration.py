"""``torchdrr.registration.register`` on a small CPU case: a perturbed pose is recovered."""

from __future__ import annotations

import warnings

import pytest
import torch

from torchdrr import DRR
from torchdrr.geometry import Camera
from torchdrr.io import Volume, bundled_ct_path
from torchdrr.registration import (
    offset_camera,
    register,
    registration_errors,
    volume_landmarks,
)
from torchdrr.registration.losses import normalized_cross_correlation

from .conftest import cuda_ready


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


def _small_scene(size: int = 32):
    volume = Volume.load(bundled_ct_path(), fix_padding=True)
    drr = DRR(volume)
    center = drr.volume_center
    camera = Camera.from_carm(torch.tensor([0.0], dtype=torch.float64), 0.0, center, height=size, width=size,
                              pixel_spacing_mm=(370 / size, 370 / size))  # fmt: skip
    return drr, camera, center


def test_bad_inputs_get_clear_errors() -> None:
    drr, camera, center = _small_scene()
    xray = drr(camera, output="line_integral", noisy=False)[0, 0]
    with pytest.raises(ValueError, match=r"xray is \(30, 32\) pixels but the camera's detector is \(32, 32\)"):
        register(drr, xray[:30], camera)
    with pytest.raises(
        ValueError, match=r"X-ray has pixel spacing 0\.5 x 0\.5 mm .* but the camera's is 11\.56 x 11\.56 mm"
    ):
        register(drr, xray, camera, xray_pixel_spacing_mm=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"X-ray is constant \(3 everywhere\)"):
        register(drr, torch.full_like(xray, 3.0), camera)
    flat_corner = xray.clone()
    flat_corner[:8, :8] = 5.0
    mask = torch.zeros_like(xray, dtype=torch.bool)
    mask[:8, :8] = True  # the image has structure, but not where the mask is valid
    with pytest.raises(ValueError, match=r"constant \(5 everywhere inside the mask\)"):
        register(drr, flat_corner, camera, mask=mask)
    inside = offset_camera(camera, torch.tensor([[0.0, 0.0, 0.0, 0.0, -830.0, 0.0]], dtype=torch.float64), center)
    source = -(inside.translation[0] @ inside.rotation[0])  # the CT moved 830 mm towards the source
    assert float((source - center).norm()) < 25  # so the source sits near the CT's centre
    with pytest.raises(ValueError, match="puts the X-ray source inside the CT"):
        register(drr, xray, inside)
    with pytest.raises(ValueError, match="xray holds NaN"):
        register(drr, torch.full_like(xray, float("nan")), camera)
    with pytest.raises(ValueError, match="an intensity X-ray must be > 0"):
        register(drr, xray - 1, camera, xray_kind="intensity")
    with pytest.raises(ValueError, match="scales must be six positive numbers"):
        register(drr, xray, camera, scales=(1, 1, 1, 1, 1, 0))


def test_a_loss_that_goes_nan_never_gives_a_nan_pose() -> None:
    drr, camera, _ = _small_scene()
    xray = drr(camera, output="line_integral", noisy=False)[0, 0]
    calls = []

    def flaky(fixed, moving, mask):  # NaN on every other call: the optimiser must keep the best finite pose
        calls.append(1)
        value = normalized_cross_correlation(fixed, moving, mask)
        return value * float("nan") if len(calls) % 2 == 0 else value

    result = register(drr, xray, camera, loss=flaky, levels=(1,), iterations=6)
    assert torch.isfinite(result.camera.rotation).all() and torch.isfinite(result.camera.translation).all()
    assert torch.isfinite(result.offset).all() and len(calls) >= 6


def test_fit_contrast_recovers_a_gamma_of_the_line_integrals() -> None:
    drr, camera, _ = _small_scene()
    xray = drr(camera, output="line_integral", noisy=False)[0, 0].clamp_min(0) ** 1.6
    plain = register(drr, xray, camera, loss="ncc", levels=(1,), iterations=1)
    fitted = register(
        drr,
        xray,
        camera,
        loss="ncc",
        levels=(1,),
        iterations=150,
        learning_rate=0.05,
        fit_contrast=True,
        patience=150,
        scales=(1e-6,) * 6,
    )  # fmt: skip  (pose frozen in effect)
    assert fitted.contrast_gamma is not None and abs(fitted.contrast_gamma - 1.6) < 0.1, fitted.contrast_gamma
    assert fitted.loss < 0.2 * plain.loss


def test_optimize_intrinsics_fits_a_wrong_principal_point() -> None:
    drr, camera, center = _small_scene()
    shifted = camera.intrinsics.clone()
    shifted[0, 2] += 1.5  # the true principal point is 1.5 pixels off the detector centre
    true_camera = Camera(shifted, camera.rotation, camera.translation, camera.height, camera.width, camera.sdd_mm)
    xray = drr(true_camera, output="line_integral", noisy=False)[0, 0]
    result = register(drr, xray, camera, loss="ncc", levels=(1,), iterations=150, learning_rate=0.05,
                      optimize_intrinsics=True, patience=150, scales=(1e-6,) * 6)  # fmt: skip
    assert result.intrinsics_offset is not None
    assert abs(float(result.intrinsics_offset[1]) - 1.5) < 0.3, result.intrinsics_offset
    assert abs(float(result.camera.intrinsics[0, 2] - shifted[0, 2])) < 0.3


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
def test_cuda_graph_steps_match_eager_steps_and_recover_the_pose() -> None:
    drr, camera, center = _small_scene(64)
    drr = drr.to("cuda")
    truth = torch.tensor([[3.0, -2.0, 4.0, 6.0, -8.0, 5.0]], dtype=torch.float64)
    true_camera = offset_camera(camera, truth, center)
    xray = drr(true_camera, output="line_integral", noisy=False)[0, 0]
    settings = {"loss": "gncc", "levels": (2, 1), "iterations": (60, 40), "starts": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture would warn and fall back
        graphed = register(drr, xray, camera, cuda_graph=True, **settings)
    eager = register(drr, xray, camera, cuda_graph=False, **settings)
    # Same arithmetic, replayed: the loss curves agree step for step (the graph has its warm-up renders on top).
    assert len(graphed.losses) == len(eager.losses)
    assert torch.allclose(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-6)
    assert graphed.renders == eager.renders + 2 * 2 + 2 * 1  # 2 warm-up renders x 2 starts, then x 1 start
    landmarks = volume_landmarks(drr.volume_shape, drr.affine, count=50, seed=5)
    assert float(registration_errors(graphed.camera.to("cpu"), true_camera, landmarks).mtre_mm[0]) < 1.0


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
def test_a_loss_that_cannot_be_captured_falls_back_to_eager_steps() -> None:
    drr, camera, _ = _small_scene(32)
    drr = drr.to("cuda")
    xray = drr(camera, output="line_integral", noisy=False)[0, 0]

    def syncing(fixed, moving, mask):  # .item() reads a value back: not allowed while a graph is captured
        value = normalized_cross_correlation(fixed, moving, mask)
        return value + 0.0 * float(value.sum().item())

    with pytest.warns(RuntimeWarning, match="could not be captured"):
        result = register(drr, xray, camera, loss=syncing, levels=(1,), iterations=5, cuda_graph=True)
    assert torch.isfinite(result.offset).all() and result.iterations == 5
    torch.rand(3, device="cuda")  # no capture was started, so the CUDA random generator still works
