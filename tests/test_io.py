"""CT reading: DICOM series and enhanced CT, NRRD and NIfTI agree at world points; bad files fail clearly; HU checks;
resample/crop keep world positions."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from torchdrr.io import (
    Volume,
    VolumeFormatError,
    bundled_ct_path,
    check_hu,
    crop,
    load_nifti,
    resample,
)

from .io_fixtures import write_ct_series, write_enhanced_ct, write_rtstruct

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# An oblique, anisotropic acquisition: 6 columns x 5 rows x 7 slices.
COLUMNS, ROWS, SLICES = 6, 5, 7
COLUMN_SPACING, ROW_SPACING, SLICE_STEP = 0.7, 0.9, 2.0  # mm; DICOM PixelSpacing = (ROW_SPACING, COLUMN_SPACING)


def _rotation() -> np.ndarray:
    """A proper rotation far from the axes (columns: row direction, column direction, slice normal; LPS)."""
    a, b = np.deg2rad(25.0), np.deg2rad(-40.0)
    around_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    around_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return around_z @ around_x


ROTATION = _rotation()
ORIENTATION = np.concatenate([ROTATION[:, 0], ROTATION[:, 1]])
ORIGIN_LPS = np.array([-31.5, 12.25, -80.0])


def _oblique_affine_ras() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = ROTATION @ np.diag([COLUMN_SPACING, ROW_SPACING, SLICE_STEP])
    affine[:3, 3] = ORIGIN_LPS
    return LPS_TO_RAS @ affine


def _oblique_hu(seed: int = 1) -> np.ndarray:
    """``[I, J, K]`` integer HU (so uint16 storage with intercept -1024 is exact)."""
    return np.random.default_rng(seed).integers(-1024, 2000, size=(COLUMNS, ROWS, SLICES)).astype(np.float32)


def _write_oblique_series(
    folder: Path, hu: np.ndarray, series_uid: str, description: str = "oblique", seed: int = 0
) -> None:
    positions = [ORIGIN_LPS + k * SLICE_STEP * ROTATION[:, 2] for k in range(SLICES)]
    slices = [hu[:, :, k].T for k in range(SLICES)]  # DICOM pixels are [row, column]
    write_ct_series(
        folder, slices, positions, ORIENTATION, (ROW_SPACING, COLUMN_SPACING), series_uid, description, seed=seed
    )


def assert_same_world_values(volume: Volume, reference: Volume, atol: float = 1e-3) -> None:
    """Every voxel centre of ``volume`` is a voxel centre of ``reference`` with the same HU."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in volume.shape], indexing="ij"), dim=-1).reshape(-1, 3)
    reference_index = reference.world_to_voxel(volume.voxel_to_world(grid))
    rounded = reference_index.round()
    torch.testing.assert_close(reference_index, rounded, atol=1e-4, rtol=0)
    rounded = rounded.long()
    assert torch.all(rounded >= 0) and torch.all(rounded < torch.tensor(reference.shape)), "grids cover other boxes"
    expected = reference.data[rounded[:, 0], rounded[:, 1], rounded[:, 2]]
    torch.testing.assert_close(volume.data.reshape(-1), expected, atol=atol, rtol=0)


@pytest.fixture
def oblique_nifti(tmp_path: Path) -> tuple[np.ndarray, Volume]:
    hu = _oblique_hu()
    path = tmp_path / "reference.nii.gz"
    nib.save(nib.Nifti1Image(hu, _oblique_affine_ras()), str(path))
    return hu, Volume.load(path, check=False)


def test_dicom_series_matches_nifti_at_world_points(tmp_path: Path, oblique_nifti: tuple[np.ndarray, Volume]) -> None:
    hu, reference = oblique_nifti
    folder = tmp_path / "series"
    _write_oblique_series(folder, hu, generate_uid())
    (folder / "README.txt").write_text("not a DICOM file; the reader must skip it")
    volume = Volume.load(folder, check=False)
    assert volume.shape == (COLUMNS, ROWS, SLICES)
    torch.testing.assert_close(volume.spacing, torch.tensor([COLUMN_SPACING, ROW_SPACING, SLICE_STEP]).double())
    assert_same_world_values(volume, reference)
    assert volume.data.min() < -1000 and volume.data.max() > 1900  # intercept applied to unsigned storage


def test_nrrd_lps_matches_nifti_at_world_points(tmp_path: Path, oblique_nifti: tuple[np.ndarray, Volume]) -> None:
    hu, reference = oblique_nifti
    affine_lps = LPS_TO_RAS @ _oblique_affine_ras()  # the flip is its own inverse
    # Store the first axis reversed, so only a reader that honours 'space directions' gets the world points right.
    flipped = np.ascontiguousarray(hu[::-1])
    directions = affine_lps[:3, :3].T.copy()
    directions[0] *= -1
    origin = affine_lps[:3, :3] @ np.array([COLUMNS - 1, 0, 0]) + affine_lps[:3, 3]
    header = {"space": "left-posterior-superior", "space directions": directions, "space origin": origin}
    path = tmp_path / "volume.nrrd"
    nrrd.write(str(path), flipped, header)
    volume = Volume.load(path, check=False)
    assert_same_world_values(volume, reference)
    assert volume.orientation[0] != reference.orientation[0]  # the file's first axis really runs the other way


def test_nrrd_unknown_space_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scanner.nrrd"
    header = {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(path), np.zeros((2, 3, 4), dtype=np.float32), header)
    with pytest.raises(VolumeFormatError, match=r"scanner\.nrrd.*scanner-xyz"):
        Volume.load(path)


def test_several_series_need_a_series_uid(tmp_path: Path, oblique_nifti: tuple[np.ndarray, Volume]) -> None:
    hu, reference = oblique_nifti
    first_uid, second_uid = generate_uid(), generate_uid()
    _write_oblique_series(tmp_path / "mixed", hu, first_uid, "soft tissue")
    _write_oblique_series(tmp_path / "mixed", hu + 7, second_uid, "bone", seed=1)
    with pytest.raises(VolumeFormatError) as raised:
        Volume.load(tmp_path / "mixed")
    message = str(raised.value)
    assert first_uid in message and second_uid in message and "soft tissue" in message and "bone" in message
    assert f"{SLICES} files" in message
    assert_same_world_values(Volume.load(tmp_path / "mixed", series_uid=first_uid, check=False), reference)
    second = Volume.load(tmp_path / "mixed", series_uid=second_uid, check=False)
    torch.testing.assert_close(second.data, reference.data + 7)
    with pytest.raises(VolumeFormatError, match="no series"):
        Volume.load(tmp_path / "mixed", series_uid="1.2.3")


def _linear_hu(points_lps: np.ndarray) -> np.ndarray:
    """HU linear in LPS mm: exactly reproduced by linear interpolation, integer at integer points."""
    return 10.0 * points_lps[..., 0] + 3.0 * points_lps[..., 1] + 20.0 * points_lps[..., 2]


def _write_axial_series(folder: Path, positions: list[np.ndarray], columns: int = 8, rows: int = 6) -> None:
    """Axial slices (identity orientation, 1 mm pixels) holding :func:`_linear_hu` of their pixel centres."""
    column_index, row_index = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")  # [rows, columns]
    slices = []
    for position in positions:
        points = position + np.stack([column_index, row_index, np.zeros_like(row_index)], axis=-1)
        slices.append(_linear_hu(points.astype(np.float64)))
    write_ct_series(folder, slices, positions, np.array([1.0, 0, 0, 0, 1, 0]), (1.0, 1.0), generate_uid())


def _assert_linear_hu(volume: Volume, inside: torch.Tensor | None = None) -> None:
    """The volume holds :func:`_linear_hu` of its voxel centres (where ``inside``; -1000 HU elsewhere)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in volume.shape], indexing="ij"), dim=-1)
    points_lps = volume.voxel_to_world(grid).numpy() * np.array([-1.0, -1.0, 1.0])
    expected = torch.from_numpy(_linear_hu(points_lps)).float()
    if inside is not None:
        expected = torch.where(inside, expected, torch.full_like(expected, -1000.0))
    torch.testing.assert_close(volume.data, expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("case", ["unequal", "missing"])
def test_irregular_slices_are_refused_then_resampled(tmp_path: Path, case: str) -> None:
    distances = [0, 2, 4, 7, 9, 11] if case == "unequal" else [0, 2, 4, 8, 10, 12]
    _write_axial_series(tmp_path / case, [np.array([-3.0, 5.0, -40.0 + d]) for d in distances])
    with pytest.raises(VolumeFormatError, match="unequal slice spacing.*resample=True"):
        Volume.load(tmp_path / case)
    volume = Volume.load(tmp_path / case, resample=True, check=False)
    assert volume.shape[2] == {"unequal": 6, "missing": 7}[case]  # median step 2 mm from -40 to the last slice
    torch.testing.assert_close(volume.spacing, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    _assert_linear_hu(volume)


def test_gantry_tilt_is_refused_then_resampled(tmp_path: Path) -> None:
    drift_mm = 1.0  # per slice, along the rows, while the slices advance 2 mm along the normal
    positions = [np.array([-3.0 + drift_mm * k, 5.0, -40.0 + 2.0 * k]) for k in range(5)]
    _write_axial_series(tmp_path / "tilt", positions)
    with pytest.raises(VolumeFormatError, match="gantry tilt"):
        Volume.load(tmp_path / "tilt")
    volume = Volume.load(tmp_path / "tilt", resample=True, check=False)
    assert volume.shape == (8, 6, 5)
    column = torch.arange(8)[:, None, None].expand(volume.shape)
    slice_index = torch.arange(5)[None, None, :].expand(volume.shape)
    inside = (column - drift_mm * slice_index) >= 0  # target columns left of the drifted slice were not acquired
    _assert_linear_hu(volume, inside)
    assert int((~inside).sum()) > 0


@pytest.mark.parametrize("per_frame_rescale", [False, True])
def test_enhanced_ct_matches_single_frame_series(
    tmp_path: Path, oblique_nifti: tuple[np.ndarray, Volume], per_frame_rescale: bool
) -> None:
    hu, reference = oblique_nifti
    positions = [ORIGIN_LPS + k * SLICE_STEP * ROTATION[:, 2] for k in range(SLICES)]
    path = tmp_path / "enhanced.dcm"
    slices = [hu[:, :, k].T for k in range(SLICES)]
    spacing = (ROW_SPACING, COLUMN_SPACING)
    # Slope 0.5 and a fractional intercept, so a reader ignoring either gets other HU.
    write_enhanced_ct(path, slices, positions, ORIENTATION, spacing, 0.5, -1100.5, per_frame_rescale)
    enhanced = Volume.load(path, check=False)
    _write_oblique_series(tmp_path / "series", hu, generate_uid())
    assert_same_world_values(enhanced, Volume.load(tmp_path / "series", check=False))
    assert_same_world_values(enhanced, reference)


@pytest.mark.parametrize("name", ["noise.nii.gz", "noise.nii", "noise.nrrd", "noise.dcm"])
def test_random_bytes_are_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VolumeFormatError, match=name.replace(".", r"\.")):
        Volume.load(path)


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    nifti = tmp_path / "truncated.nii.gz"
    nifti.write_bytes(bundled_ct_path().read_bytes()[:20000])
    with pytest.raises(VolumeFormatError, match=r"truncated\.nii\.gz"):
        Volume.load(nifti)
    with pytest.raises(ValueError, match=r"truncated\.nii\.gz"):  # the old entry point fails the same way
        load_nifti(nifti)
    enhanced = tmp_path / "enhanced.dcm"
    slices = [np.zeros((4, 4), dtype=np.float32) for _ in range(3)]
    positions = [np.array([0.0, 0.0, float(k)]) for k in range(3)]
    write_enhanced_ct(enhanced, slices, positions, np.array([1.0, 0, 0, 0, 1, 0]), (1.0, 1.0))
    enhanced.write_bytes(enhanced.read_bytes()[:-40])  # cut into the pixel data
    with pytest.raises(VolumeFormatError, match=r"enhanced\.dcm"):
        Volume.load(enhanced)


def test_folders_without_images_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeFormatError, match="no DICOM images.*empty"):
        Volume.load(tmp_path / "empty")
    (tmp_path / "structures").mkdir()
    write_rtstruct(tmp_path / "structures" / "rtss.dcm")
    with pytest.raises(VolumeFormatError, match=r"no DICOM images.*rtss\.dcm \(RTSTRUCT\)"):
        Volume.load(tmp_path / "structures")
    with pytest.raises(VolumeFormatError, match=r"rtss\.dcm.*without image pixel data"):
        Volume.load(tmp_path / "structures" / "rtss.dcm")


def test_from_array_refuses_bad_geometry() -> None:
    data = np.zeros((2, 3, 4), dtype=np.float32)
    singular = np.eye(4)
    singular[:3, 1] = singular[:3, 0]  # two voxel axes along the same direction
    with pytest.raises(VolumeFormatError, match="affine is singular"):
        Volume.from_array(data, affine=singular)
    not_finite = np.eye(4)
    not_finite[0, 3] = np.nan
    with pytest.raises(VolumeFormatError, match="non-finite"):
        Volume.from_array(data, affine=not_finite)
    for spacing in (0.0, (1.0, -2.0, 1.0)):
        with pytest.raises(ValueError, match="spacing must be positive"):
            Volume.from_array(data, spacing=spacing)
    with pytest.raises(ValueError, match="either affine or spacing"):
        Volume.from_array(data, affine=np.eye(4), spacing=1.0)
    with pytest.raises(VolumeFormatError, match=r"\[I, J, K\]"):
        Volume.from_array(np.zeros((2, 3)))


def test_from_array_and_properties() -> None:
    volume = Volume.from_array(torch.arange(24.0).reshape(2, 3, 4), spacing=(0.5, 1.0, 2.0), origin=(10.0, -5.0, 3.0))
    assert volume.orientation == ("R", "A", "S")
    assert volume.shape == (2, 3, 4) and volume.data.dtype == torch.float32
    torch.testing.assert_close(volume.spacing, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(volume.origin, torch.tensor([10.0, -5.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(volume.center, torch.tensor([10.25, -4.0, 6.0], dtype=torch.float64))
    moved = volume.to("cpu")
    assert moved is not volume and moved.device == torch.device("cpu") and moved.affine.dtype == torch.float64
    torch.testing.assert_close(moved.data, volume.data)


@pytest.fixture(scope="module")
def bundled() -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Volume.load(bundled_ct_path())


def test_bundled_ct_padding_warns_and_is_fixed(bundled: Volume) -> None:
    with pytest.warns(UserWarning, match=r"chest_ct_small\.nii\.gz.*scanner padding.*-2048.*fix_padding=True"):
        Volume.load(bundled_ct_path())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fixed volume must not warn about anything
        fixed = Volume.load(bundled_ct_path(), fix_padding=True)
    assert float(fixed.data.min()) >= -1024.0
    was_padding = bundled.data <= -1500
    assert bool(torch.all(fixed.data[was_padding] == -1000.0))
    torch.testing.assert_close(fixed.data[~was_padding], bundled.data[~was_padding])
    assert orientation_is_las(fixed)


def orientation_is_las(volume: Volume) -> bool:
    return volume.orientation == ("L", "A", "S")


def test_offset_copy_is_detected_and_fixed(tmp_path: Path, bundled: Volume) -> None:
    hu = bundled.with_padding_fixed()
    report = check_hu(hu.data)
    assert not report.padding_suspected and not report.offset_suspected
    shifted = Volume(hu.data + 1024.0, hu.affine)
    assert check_hu(shifted.data).offset_suspected
    path = tmp_path / "offset.nii"
    nib.save(nib.Nifti1Image(shifted.data.numpy(), shifted.affine.numpy()), str(path))
    with pytest.warns(UserWarning, match=r"offset\.nii.*\+1024 offset.*fix_offset=True"):
        Volume.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = Volume.load(path, fix_offset=True)
    torch.testing.assert_close(fixed.data, hu.data, atol=1e-3, rtol=0)


def _bright_voxel_volume() -> Volume:
    data = torch.zeros(11, 12, 13)
    data[4, 7, 5] = 1000.0
    affine = _oblique_affine_ras()
    return Volume.from_array(data, affine=affine)


def _weighted_centroid(volume: Volume) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in volume.shape], indexing="ij"), dim=-1)
    weights = volume.data.double()
    return (volume.voxel_to_world(grid) * weights[..., None]).sum(dim=(0, 1, 2)) / weights.sum()


def test_resample_keeps_world_positions() -> None:
    volume = _bright_voxel_volume()
    finer = resample(volume, (0.35, 0.45, 1.0))  # exactly half of each spacing
    assert finer.shape == (22, 24, 26)
    torch.testing.assert_close(finer.spacing, torch.tensor([0.35, 0.45, 1.0], dtype=torch.float64))
    torch.testing.assert_close(finer.center, volume.center)
    torch.testing.assert_close(
        _weighted_centroid(finer), volume.voxel_to_world(torch.tensor([4, 7, 5])), atol=1e-4, rtol=0
    )
    # A field linear in world position is reproduced exactly by trilinear resampling, between the old outer centres.
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in volume.shape], indexing="ij"), dim=-1)
    gradient = torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64)
    field = Volume((volume.voxel_to_world(grid) @ gradient).float(), volume.affine)
    coarse = resample(field, 1.5)
    new_grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in coarse.shape], indexing="ij"), dim=-1)
    old_index = field.world_to_voxel(coarse.voxel_to_world(new_grid))
    interior = torch.all((old_index >= 0) & (old_index <= torch.tensor(field.shape) - 1), dim=-1)
    assert int(interior.sum()) > 20
    expected = (coarse.voxel_to_world(new_grid) @ gradient).float()
    torch.testing.assert_close(coarse.data[interior], expected[interior], atol=2e-3, rtol=0)


def test_crop_keeps_world_positions() -> None:
    volume = _bright_voxel_volume()
    cropped = crop(volume, ((2, 9), (5, 12), (1, 6)))
    assert cropped.shape == (7, 7, 5)
    bright = torch.nonzero(cropped.data == 1000.0)[0]
    torch.testing.assert_close(cropped.voxel_to_world(bright), volume.voxel_to_world(torch.tensor([4, 7, 5])))
    assert_same_world_values(cropped, volume, atol=0)
    with pytest.raises(ValueError, match="outside"):
        crop(volume, ((0, 12), (0, 12), (0, 13)))
