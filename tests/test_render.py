"""Camera conventions (design.md §3), the minimal renderer and the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from torchdrr.cli import main
from torchdrr.geometry import NAMED_VIEWS, carm_extrinsics, detector_direction, intrinsic_matrix, pixel_rays
from torchdrr.io import bundled_ct_path, load_nifti, volume_center
from torchdrr.render import hu_to_mu, render_carm, save_png, to_display

from .conftest import cuda_ready

SHAPE = (41, 41, 41)
AFFINE = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
AFFINE[:3, 3] = -40.0  # centre of the volume at the world origin


def bright_point_volume(world_point: tuple[float, float, float]) -> torch.Tensor:
    volume = torch.zeros(SHAPE, dtype=torch.float64)
    index = torch.linalg.solve(AFFINE, torch.tensor([*world_point, 1.0], dtype=torch.float64))[:3]
    volume[tuple(int(round(float(i))) for i in index)] = 1.0
    return volume


def brightest_pixel(image: torch.Tensor) -> tuple[int, int]:
    flat = int(image.reshape(-1).argmax())
    return divmod(flat, image.shape[-1])


@pytest.mark.parametrize(("primary", "secondary"), [(0.0, 0.0), (35.0, -20.0), (-120.0, 10.0)])
def test_projection_matrix_lands_where_the_drr_shows_the_point(primary, secondary) -> None:
    """P = K [R | t] projects a 3D point onto the pixel where the rendered DRR shows it (mirror included)."""
    point = (12.0, -8.0, 20.0)
    volume = bright_point_volume(point)
    height, width, spacing = 61, 81, (1.5, 1.5)
    image = render_carm(volume, AFFINE, primary, secondary, height, width, spacing, sdd_mm=1000.0, sod_mm=700.0)[0, 0]
    rotation, translation = carm_extrinsics(primary, secondary, 700.0, torch.zeros(3, dtype=torch.float64))
    projection = intrinsic_matrix(1000.0, height, width, spacing) @ torch.cat([rotation[0], translation.T], dim=1)
    u, v, w = projection @ torch.tensor([*point, 1.0], dtype=torch.float64)
    row, col = brightest_pixel(image)
    assert abs(col - float(u / w)) <= 1.0 and abs(row - float(v / w)) <= 1.0


def test_pa_view_shows_the_patient_as_a_c_arm_monitor_does() -> None:
    """PA: the patient's right (+x in RAS) on the image's left, the head (+z) at the top."""
    right = render_carm(bright_point_volume((30.0, 0.0, 0.0)), AFFINE, 0.0, 0.0, 41, 41, (2.0, 2.0))[0, 0]
    head = render_carm(bright_point_volume((0.0, 0.0, 30.0)), AFFINE, 0.0, 0.0, 41, 41, (2.0, 2.0))[0, 0]
    assert brightest_pixel(right)[1] < 15  # left columns
    assert brightest_pixel(head)[0] < 15  # top rows


def test_carm_geometry_follows_the_angle_convention() -> None:
    isocenter = torch.tensor([10.0, -5.0, 3.0], dtype=torch.float64)
    sod, sdd = 800.0, 1100.0
    for primary, secondary in [(0.0, 0.0), (30.0, 15.0), (-75.0, -40.0)]:
        a, b = math.radians(primary), math.radians(secondary)
        d = torch.tensor([-math.sin(a) * math.cos(b), math.cos(a) * math.cos(b), math.sin(b)], dtype=torch.float64)
        torch.testing.assert_close(detector_direction(torch.tensor(primary), torch.tensor(secondary)).double(), d)
        rotation, translation = carm_extrinsics(primary, secondary, sod, isocenter)
        torch.testing.assert_close(rotation[0] @ rotation[0].T, torch.eye(3, dtype=torch.float64))
        assert torch.linalg.det(rotation[0]) == pytest.approx(1.0)
        sources, targets = pixel_rays(intrinsic_matrix(sdd, 5, 7, (1.0, 1.0)), rotation, translation, 5, 7, sdd)
        torch.testing.assert_close(sources[0, 0], isocenter - sod * d)
        torch.testing.assert_close(targets[0, 2 * 7 + 3], isocenter - sod * d + sdd * d)  # centre pixel
    assert NAMED_VIEWS["left lateral"] == (90.0, 0.0)
    torch.testing.assert_close(
        detector_direction(torch.tensor(90.0), torch.tensor(0.0)), torch.tensor([-1.0, 0.0, 0.0]), atol=1e-7, rtol=0
    )


def test_bundled_ct_renders_a_plausible_radiograph() -> None:
    hu, affine = load_nifti(bundled_ct_path())
    assert hu.shape == (170, 170, 133) and float(hu.min()) == -2048.0
    mu = hu_to_mu(hu)
    assert float(mu.min()) == 0.0  # padding is air
    image = render_carm(mu, affine, 0.0, 0.0, 64, 64, (6.0, 6.0))
    assert image.shape == (1, 1, 64, 64)
    # Water-equivalent thickness of a chest along the beam: a few hundred mm at 0.02/mm.
    assert 3.0 < float(image.max()) < 15.0
    lungs = image[0, 0, 20:35, 14:24].mean()  # the right lung field (image left)
    spine = image[0, 0, 20:35, 30:34].mean()
    assert spine > lungs * 1.2


def test_render_batched_angles_match_single() -> None:
    volume = torch.rand(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = render_carm(volume, AFFINE, torch.tensor([0.0, 40.0]), torch.tensor([0.0, 10.0]), 9, 11, (8.0, 8.0))
    single = render_carm(volume, AFFINE, 40.0, 10.0, 9, 11, (8.0, 8.0))
    torch.testing.assert_close(batch[1:], single)


def test_display_and_png(tmp_path) -> None:
    image = torch.linspace(0, 5, 64 * 48, dtype=torch.float64).reshape(1, 64, 48)
    picture = to_display(image)
    assert picture.dtype == np.uint8 and picture.max() == 255 and picture.min() == 0
    path = save_png(picture, tmp_path / "x.png")
    assert Image.open(path).size == (48, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="must end in .png"):
        save_png(picture, tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        save_png(picture, tmp_path / "missing" / "x.png")


# The command line's tests (torchdrr render) are in test_cli.py.


def test_volume_center() -> None:
    torch.testing.assert_close(volume_center(AFFINE, SHAPE), torch.zeros(3, dtype=torch.float64))


def test_sketch_draws_the_scene_and_the_cli_writes_it(tmp_path) -> None:
    from torchdrr.geometry.sketch import sketch_carm_scene

    picture = np.asarray(sketch_carm_scene((20, 20, 10), AFFINE, 30.0, 10.0, size_px=320))
    assert picture.shape[1] == 320 and picture.shape[2] == 3
    assert (picture.sum(-1) < 100).sum() > 50  # the source marker and outlines are drawn in black
    assert (picture[..., 0] > 150).any() and (picture[..., 2] > 150).any()  # coloured axes
    out = tmp_path / "scene.png"
    assert main(["sketch", "--view", "left-lateral", "--out", str(out)]) == 0
    assert Image.open(out).size[0] == 640
    assert main(["sketch", "--ct", str(tmp_path / "missing.nii.gz"), "--out", str(out)]) == 2


def _pose(primary=25.0, secondary=-10.0):
    return carm_extrinsics(primary, secondary, 800.0, torch.tensor([3.0, -4.0, 5.0], dtype=torch.float64))


def test_supersampled_rays_average_to_the_pixel_ray() -> None:
    from torchdrr.geometry import pixel_rays

    K = intrinsic_matrix(1000.0, 6, 8, (1.2, 1.5))
    R, t = _pose()
    _, plain = pixel_rays(K, R, t, 6, 8, 1000.0)
    _, fine = pixel_rays(K, R, t, 6, 8, 1000.0, supersample=3)
    assert fine.shape == (1, 6 * 8 * 9, 3)
    grouped = fine.reshape(1, 6, 8, 9, 3)
    torch.testing.assert_close(grouped.mean(3).reshape(1, -1, 3), plain)
    spread = (grouped - grouped.mean(3, keepdim=True)).norm(dim=-1).amax()
    assert 0.5 < float(spread) < 1.5  # sub-rays really span the pixel (pitch 1.2 x 1.5 mm, corners at 1/3 pixel)
    with pytest.raises(ValueError, match="supersample must be"):
        pixel_rays(K, R, t, 6, 8, 1000.0, supersample=0)


def test_cropped_and_binned_intrinsics_give_the_matching_rays() -> None:
    from torchdrr.geometry import pixel_rays
    from torchdrr.geometry.camera import bin_intrinsics, crop_intrinsics

    K = intrinsic_matrix(1000.0, 12, 16, (1.0, 1.0))
    R, t = _pose()
    _, full = pixel_rays(K, R, t, 12, 16, 1000.0)
    full = full.reshape(12, 16, 3)
    _, crop = pixel_rays(crop_intrinsics(K, top=3, left=5), R, t, 4, 6, 1000.0)
    torch.testing.assert_close(crop.reshape(4, 6, 3), full[3:7, 5:11])
    _, binned = pixel_rays(bin_intrinsics(K, 4), R, t, 3, 4, 1000.0)
    block_centres = full.reshape(3, 4, 4, 4, 3).mean(dim=(1, 3))  # mean over each 4 x 4 block of pixel centres
    torch.testing.assert_close(binned.reshape(3, 4, 3), block_centres)


def test_bright_voxel_centroid_matches_the_projection_at_random_poses() -> None:
    """One bright voxel, 20 random C-arm poses: the DRR's intensity centroid is within 0.1 px of P x (design.md §3).
    A magnified view (0.25 mm pixels: the 4 mm voxel spans about 19 pixels) and 4 x 4 sub-rays per pixel keep the
    sampling error of the centroid small."""
    import torchdrr
    from torchdrr.geometry import pixel_rays

    affine = torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-40.0, -44.0, -36.0])
    volume = torch.zeros(21, 23, 19, dtype=torch.float64)
    voxel = (13, 8, 11)
    volume[voxel] = 1.0
    centre = (affine @ torch.tensor([*voxel, 1.0], dtype=torch.float64))[:3]
    generator = torch.Generator().manual_seed(4)
    height = width = 64
    K = intrinsic_matrix(1020.0, height, width, (0.25, 0.25))
    errors = []
    for _ in range(20):
        primary, secondary = (torch.rand(2, generator=generator, dtype=torch.float64) * 2 - 1) * torch.tensor([180, 60])
        R, t = carm_extrinsics(
            primary, secondary, 850.0, centre + torch.randn(3, generator=generator, dtype=torch.float64)
        )
        sources, targets = pixel_rays(K, R, t, height, width, 1020.0, supersample=4)
        image = torchdrr.raycast(volume, affine, sources, targets).reshape(height, width, 16).mean(-1)
        border = torch.cat([image[0], image[-1], image[:, 0], image[:, -1]])
        assert image.sum() > 0 and border.abs().max() == 0, "the whole blob must be in view"
        rows, cols = torch.meshgrid(
            torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
        )
        measured = torch.stack([(image * cols).sum(), (image * rows).sum()]) / image.sum()
        projected = K @ (R[0] @ centre + t[0])
        errors.append(float((measured - projected[:2] / projected[2]).norm()))
    assert max(errors) < 0.1, f"centroid errors (px): {sorted(errors)[-3:]}"


def test_inplane_rotation_turns_the_displayed_image_counter_clockwise() -> None:
    """A point shown right of the centre (east) moves to above it (north) for +90 degrees, and the source and the
    detector direction do not move."""
    isocenter = torch.zeros(3, dtype=torch.float64)
    point = torch.tensor([-20.0, 0.0, 0.0], dtype=torch.float64)  # patient's left: image right at PA
    K = intrinsic_matrix(1000.0, 41, 41, (1.0, 1.0))
    shown = []
    for inplane in (0.0, 90.0):
        R, t = carm_extrinsics(0.0, 0.0, 700.0, isocenter, inplane_deg=inplane)
        u, v, w = K @ (R[0] @ point + t[0])
        shown.append((float(u / w) - 20.0, float(v / w) - 20.0))  # offset from the image centre, v down
        torch.testing.assert_close(-(R[0].T @ t[0]), torch.tensor([0.0, -700.0, 0.0], dtype=torch.float64))
        torch.testing.assert_close(R[0][2], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    (du0, dv0), (du1, dv1) = shown
    assert du0 > 20 and abs(dv0) < 1e-9  # east before
    assert abs(du1) < 1e-9 and dv1 < -20  # north after


def test_carm_angles_round_trip() -> None:
    """C-arm angles -> pose -> angles, to 1e-6 degrees, over the whole range (batched)."""
    from torchdrr.geometry import carm_angles

    generator = torch.Generator().manual_seed(3)
    primary = torch.rand(64, generator=generator, dtype=torch.float64) * 359.0 - 179.0
    secondary = torch.rand(64, generator=generator, dtype=torch.float64) * 178.0 - 89.0
    inplane = torch.rand(64, generator=generator, dtype=torch.float64) * 359.0 - 179.0
    isocenter = torch.tensor([12.0, -30.0, 7.0], dtype=torch.float64)
    R, t = carm_extrinsics(primary, secondary, 760.0, isocenter, inplane_deg=inplane)
    got = carm_angles(R, t, isocenter)
    for value, expected in zip(got, (primary, secondary, inplane, torch.full_like(primary, 760.0)), strict=True):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: intrinsic_matrix(1000.0, 8, 8, (0.0, 1.0)), "pixel_spacing_mm must be two positive pitches"),
        (lambda: intrinsic_matrix(1000.0, 8, 8, (1.0, -0.5)), "pixel_spacing_mm must be two positive pitches"),
        (lambda: intrinsic_matrix(0.0, 8, 8, (1.0, 1.0)), "source on the detector plane"),
        (lambda: intrinsic_matrix(1000.0, 0, 8, (1.0, 1.0)), "height and width must be >= 1"),
        (
            lambda: pixel_rays(intrinsic_matrix(1000.0, 2, 2, (1.0, 1.0)), *_pose(), 2, 2, 0.0),
            "source on the detector plane",
        ),
        (lambda: carm_extrinsics(0.0, 0.0, 0.0, torch.zeros(3)), "sod_mm must be a positive distance"),
        (lambda: pixel_rays(torch.eye(3), torch.eye(2), torch.zeros(3), 2, 2, 10.0), "rotation must be"),
    ],
    ids=["zero pitch", "negative pitch", "zero SDD", "no rows", "rays with zero SDD", "zero SOD", "bad rotation"],
)
def test_camera_bad_input_names_the_argument(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_camera_from_its_projection_matrix_casts_the_same_rays() -> None:
    from torchdrr.geometry import Camera

    isocenter = torch.tensor([5.0, -3.0, 2.0], dtype=torch.float64)
    camera = Camera.from_carm(
        torch.tensor([15.0, -70.0]), torch.tensor([5.0, 30.0]), isocenter, height=6, width=7, inplane_deg=12.0
    )
    again = Camera.from_projection_matrix(camera.projection_matrix() * -3.0, 6, 7, 1020.0, reference_point=isocenter)
    for a, b in zip(camera.rays(), again.rays(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(again.intrinsics, camera.intrinsics)
    # Projecting each pixel's target lands on that pixel.
    _, targets = camera.rays()
    uv = camera.project(targets)
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    expected = torch.stack([cols.reshape(-1), rows.reshape(-1)], -1).to(torch.float64).expand(2, -1, -1)
    torch.testing.assert_close(uv, expected)


def test_camera_crop_binning_and_volume_rendering() -> None:
    from torchdrr.geometry import Camera
    from torchdrr.io import Volume
    from torchdrr.render import render_line_integrals

    volume = torch.rand(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    camera = Camera.from_carm(30.0, 10.0, torch.zeros(3, dtype=torch.float64), height=12, width=16,
                              pixel_spacing_mm=(8.0, 8.0))  # fmt: skip
    full = render_line_integrals(volume, camera, AFFINE)
    assert full.shape == (1, 1, 12, 16) and float(full.min()) > 0
    torch.testing.assert_close(render_line_integrals(volume, camera.crop(2, 3, 5, 6), AFFINE), full[..., 2:7, 3:9])
    assert render_line_integrals(volume, camera.binned(4), AFFINE).shape == (1, 1, 3, 4)
    torch.testing.assert_close(
        render_line_integrals(Volume(volume.float(), AFFINE), camera), full.float(), rtol=1e-4, atol=1e-4
    )
    fine = render_line_integrals(volume, camera, AFFINE, supersample=3)
    assert 0 < float((fine - full).abs().max()) < 0.2 * float(full.max())  # close to, but not, the centre ray
    with pytest.raises(ValueError, match="lies outside"):
        camera.crop(10, 0, 5, 5)
    with pytest.raises(ValueError, match="affine is required"):
        render_line_integrals(volume, camera)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
def test_volume_and_camera_render_on_cuda_as_on_cpu() -> None:
    from torchdrr.geometry import Camera
    from torchdrr.io import Volume
    from torchdrr.render import render_line_integrals

    volume = Volume.load(bundled_ct_path(), fix_padding=True)
    mu = Volume(hu_to_mu(volume.data), volume.affine)
    camera = Camera.from_carm(torch.tensor([0.0, 35.0]), torch.tensor([0.0, -10.0]), volume.center, height=64,
                              width=80, pixel_spacing_mm=(5.0, 5.0), inplane_deg=15.0)  # fmt: skip
    on_cpu = render_line_integrals(mu, camera)
    on_gpu = render_line_integrals(mu.to("cuda"), camera.to("cuda"))
    assert on_gpu.is_cuda and float(on_cpu.max()) > 3
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
    # Points project to the same pixels on either device.
    points = volume.center + torch.randn(5, 3, dtype=torch.float64) * 30
    torch.testing.assert_close(camera.to("cuda").project(points.cuda()).cpu(), camera.project(points))
