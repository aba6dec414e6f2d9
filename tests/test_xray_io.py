"""``torchdrr.io.xray``: reading an X-ray from PNG, TIFF, DICOM and .npy files, the kind hint and its guess, and the
check against a camera."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from torchdrr.io.writers import save_tiff
from torchdrr.io.xray import XRayImage, check_xray_against_camera, read_xray, xray_kind_auto

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _levels(shape: tuple[int, int], top: int, seed: int = 0) -> np.ndarray:
    """Random integer levels in [0, top] with both ends present."""
    levels = np.random.default_rng(seed).integers(0, top + 1, shape)
    levels[0, 0], levels[-1, -1] = 0, top
    return levels


def _write_dicom(path: Path, stored: np.ndarray, **attributes: object) -> Path:
    """A minimal valid DX DICOM file (explicit VR little endian) of uint16 ``stored`` values ``[H, W]`` or
    ``[F, H, W]``; ``attributes`` are set on the dataset (None deletes one)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientName = "Phantom^Test"
    dataset.PatientID = "0001"
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        dataset.NumberOfFrames = stored.shape[0]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 12
    dataset.HighBit = 11
    dataset.PixelRepresentation = 0
    dataset.ImagerPixelSpacing = [0.2, 0.25]
    dataset.PixelSpacing = [0.3, 0.3]
    dataset.RescaleSlope = 2
    dataset.RescaleIntercept = -100
    for key, value in attributes.items():
        if value is None:
            delattr(dataset, key)
        else:
            setattr(dataset, key, value)
    dataset.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# PNG


@pytest.mark.parametrize("bits", [8, 16])
def test_png_levels_read_back_exactly(tmp_path: Path, bits: int) -> None:
    levels = _levels((23, 31), 2**bits - 1, seed=bits).astype(np.uint8 if bits == 8 else np.uint16)
    path = tmp_path / "xray.png"
    Image.fromarray(levels).save(path)
    image = read_xray(path)
    assert image.pixels.dtype == torch.float64 and tuple(image.pixels.shape) == (23, 31)
    assert torch.equal(image.pixels, torch.from_numpy(levels.astype(np.float64)))
    assert image.bits == bits and image.pixel_spacing_mm is None and image.kind_hint is None
    assert image.source == str(path) and image.photometric is None
    assert (image.height, image.width) == (23, 31)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_with_equal_colour_channels_is_gray(tmp_path: Path, mode: str) -> None:
    gray = _levels((12, 9), 255, seed=1).astype(np.uint8)
    channels = [gray, gray, gray] + ([np.full_like(gray, 200)] if mode == "RGBA" else [])
    path = tmp_path / "rgb.png"
    Image.fromarray(np.stack(channels, axis=2)).save(path)
    image = read_xray(path)
    assert torch.equal(image.pixels, torch.from_numpy(gray.astype(np.float64))) and image.bits == 8


def test_png_with_different_colour_channels_is_refused(tmp_path: Path) -> None:
    gray = _levels((12, 9), 250, seed=2).astype(np.uint8)
    colour = np.stack([gray, gray, gray], axis=2)
    colour[3, 4, 1] += 5
    colour[5, 6, 2] += 1
    path = tmp_path / "colour.png"
    Image.fromarray(colour).save(path)
    with pytest.raises(ValueError, match="channels differ at 2 pixels"):
        read_xray(path)


# ---------------------------------------------------------------------------------------------------------------------
# TIFF


def test_float_tiff_from_save_tiff_reads_back_exactly(tmp_path: Path) -> None:
    values = np.random.default_rng(3).normal(2.0, 1.5, (17, 13)).astype(np.float32)
    path = save_tiff(values, tmp_path / "li.tif")
    image = read_xray(path)
    assert torch.equal(image.pixels, torch.from_numpy(values.astype(np.float64)))
    assert image.bits == 32 and image.kind_hint is None and image.pixel_spacing_mm is None


def test_16_bit_tiff_reads_back_exactly(tmp_path: Path) -> None:
    levels = _levels((9, 14), 65535, seed=4).astype(np.uint16)
    path = tmp_path / "raw.tiff"
    Image.fromarray(levels).save(path)
    image = read_xray(path)
    assert torch.equal(image.pixels, torch.from_numpy(levels.astype(np.float64))) and image.bits == 16


def test_multi_page_tiff_needs_a_frame(tmp_path: Path) -> None:
    pages = np.random.default_rng(5).random((2, 8, 10)).astype(np.float32)
    path = save_tiff(pages, tmp_path / "bins.tif")
    with pytest.raises(ValueError, match=r"multi-page TIFF with 2 pages; pass frame= \(0 to 1\)"):
        read_xray(path)
    image = read_xray(path, frame=1)
    assert torch.equal(image.pixels, torch.from_numpy(pages[1].astype(np.float64)))
    assert image.source.endswith("[frame 1]")
    with pytest.raises(ValueError, match=r"frame=2 is out of range for 2 pages"):
        read_xray(path, frame=2)


# ---------------------------------------------------------------------------------------------------------------------
# DICOM


def test_dicom_rescale_spacing_photometric_and_hint(tmp_path: Path) -> None:
    stored = _levels((16, 20), 4095, seed=6).astype(np.uint16)
    path = _write_dicom(tmp_path / "dx.dcm", stored)
    image = read_xray(path)
    assert torch.equal(image.pixels, torch.from_numpy(stored.astype(np.float64) * 2 - 100))  # slope 2, intercept -100
    assert image.pixel_spacing_mm == (0.2, 0.25)  # ImagerPixelSpacing wins over PixelSpacing
    assert image.photometric == "MONOCHROME1" and image.bits == 12
    assert image.kind_hint == "display"  # DX shows the body bright; MONOCHROME1 stores bright as low: dark as stored


def test_dicom_pixel_spacing_is_the_fallback_and_rescale_defaults(tmp_path: Path) -> None:
    stored = _levels((6, 7), 4095, seed=7).astype(np.uint16)
    path = _write_dicom(
        tmp_path / "ps.dcm",
        stored,
        ImagerPixelSpacing=None,
        RescaleSlope=None,
        RescaleIntercept=None,
        PixelSpacing=[0.5, 0.4],
    )
    image = read_xray(path)
    assert image.pixel_spacing_mm == (0.5, 0.4)
    assert torch.equal(image.pixels, torch.from_numpy(stored.astype(np.float64)))


def test_dicom_malformed_spacing_is_named(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "bad.dcm", _levels((6, 7), 100).astype(np.uint16), ImagerPixelSpacing=[0.2, 0])
    with pytest.raises(ValueError, match=r"ImagerPixelSpacing must be two positive numbers"):
        read_xray(path)


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"Modality": "DX", "PhotometricInterpretation": "MONOCHROME2"}, "line_integral"),  # film-like, bright high
        ({"Modality": "CR", "PhotometricInterpretation": "MONOCHROME1"}, "display"),
        ({"Modality": "XA", "PhotometricInterpretation": "MONOCHROME2"}, "display"),  # fluoroscopy: body dark
        ({"Modality": "RF", "PhotometricInterpretation": "MONOCHROME1"}, "line_integral"),
        ({"Modality": "OT", "PhotometricInterpretation": "MONOCHROME2"}, None),
        ({"PresentationIntentType": "FOR PROCESSING"}, "intensity"),
        ({"PixelIntensityRelationship": "LIN", "PixelIntensityRelationshipSign": 1}, "intensity"),
        ({"PixelIntensityRelationship": "LOG", "PixelIntensityRelationshipSign": 1}, "display"),
        ({"PixelIntensityRelationship": "LOG", "PixelIntensityRelationshipSign": -1}, "line_integral"),
        (  # the relationship outranks the presentation intent
            {"PixelIntensityRelationship": "LOG", "PresentationIntentType": "FOR PROCESSING"},
            "display",
        ),
    ],
)
def test_dicom_kind_hint_rule(tmp_path: Path, attributes: dict, expected: str | None) -> None:
    path = _write_dicom(tmp_path / "hint.dcm", _levels((5, 6), 4000, seed=8).astype(np.uint16), **attributes)
    assert read_xray(path).kind_hint == expected


def test_multi_frame_dicom_needs_a_frame(tmp_path: Path) -> None:
    stored = np.stack([_levels((8, 9), 4095, seed=s) for s in range(3)]).astype(np.uint16)
    path = _write_dicom(tmp_path / "cine.dcm", stored, Modality="XA", PhotometricInterpretation="MONOCHROME2")
    with pytest.raises(ValueError, match=r"multi-frame DICOM with 3 frames; pass frame= \(0 to 2\)"):
        read_xray(path)
    image = read_xray(path, frame=2)
    assert torch.equal(image.pixels, torch.from_numpy(stored[2].astype(np.float64) * 2 - 100))
    assert image.kind_hint == "display" and image.source.endswith("[frame 2]")
    with pytest.raises(ValueError, match=r"frame=3 is out of range for 3 frames \(0 to 2\)"):
        read_xray(path, frame=3)


def test_dicom_without_a_suffix_is_recognised(tmp_path: Path) -> None:
    stored = _levels((4, 5), 300, seed=9).astype(np.uint16)
    image = read_xray(_write_dicom(tmp_path / "IM0001", stored))
    assert torch.equal(image.pixels, torch.from_numpy(stored.astype(np.float64) * 2 - 100))


# ---------------------------------------------------------------------------------------------------------------------
# .npy and errors


def test_npy_reads_back_exactly(tmp_path: Path) -> None:
    values = np.random.default_rng(10).normal(size=(7, 11))
    np.save(tmp_path / "x.npy", values)
    image = read_xray(tmp_path / "x.npy")
    assert torch.equal(image.pixels, torch.from_numpy(values)) and image.bits is None and image.kind_hint is None


def test_npy_must_be_2d_real(tmp_path: Path) -> None:
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"2D array \[H, W\], got shape \(2, 3, 4\)"):
        read_xray(tmp_path / "cube.npy")
    np.save(tmp_path / "complex.npy", np.ones((3, 3), dtype=np.complex64))
    with pytest.raises(ValueError, match="real numbers .* got dtype complex64"):
        read_xray(tmp_path / "complex.npy")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_xray(missing)


def test_unsupported_suffix_names_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "xray.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ValueError, match=r"\.png, \.tif, \.tiff, \.dcm, \.dicom, \.npy.*got '\.jpg'"):
        read_xray(path)


def test_unreadable_file_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a readable PNG file"):
        read_xray(tmp_path / "junk.png")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.dcm"):
        read_xray(tmp_path / "junk.dcm")


def test_non_finite_values_are_refused(tmp_path: Path) -> None:
    values = np.ones((4, 4), dtype=np.float32)
    values[1, 2], values[3, 3] = np.nan, np.inf
    save_tiff(values, tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="2 non-finite values"):
        read_xray(tmp_path / "nan.tif")


def test_constant_image_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((5, 5), 7, dtype=np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(ValueError, match="constant image: nothing to register to .*7"):
        read_xray(tmp_path / "flat.png")


def test_frame_on_a_single_image_file_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(6.0).reshape(2, 3))
    assert read_xray(tmp_path / "x.npy", frame=0).height == 2
    with pytest.raises(ValueError, match=r"frame=1 was given but a \.npy file holds a single image"):
        read_xray(tmp_path / "x.npy", frame=1)


# ---------------------------------------------------------------------------------------------------------------------
# Kind guess and camera check


def _blob(size: int = 40) -> torch.Tensor:
    """A line-integral-like image: a centred bright disc (the body) on a dark background (air)."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
    radius = torch.sqrt((rows - size / 2) ** 2 + (cols - size / 2) ** 2)
    return 3.0 * (radius < size / 3).to(torch.float64) + 0.01 * rows / size


def _image(pixels: torch.Tensor, hint: str | None = None) -> XRayImage:
    return XRayImage(pixels=pixels, pixel_spacing_mm=None, kind_hint=hint, source="test", bits=None)


def test_kind_auto_uses_the_hint_and_guards_the_log() -> None:
    blob = _blob()
    assert xray_kind_auto(_image(blob, "display")) == "display"  # the hint wins over the pixels
    assert xray_kind_auto(_image(torch.exp(-blob), "intensity")) == "intensity"
    assert xray_kind_auto(_image(blob - 1.0, "intensity")) == "display"  # values <= 0: no log


def test_kind_auto_guesses_from_the_pixels() -> None:
    blob = _blob()
    assert xray_kind_auto(_image(blob)) == "line_integral"  # body bright in the centre
    assert xray_kind_auto(_image(torch.exp(-blob))) == "intensity"  # body dark, positive floats
    assert xray_kind_auto(_image(torch.round(255 * torch.exp(-blob)))) == "display"  # body dark, integer levels


def test_camera_check_size_and_pitch() -> None:
    image = XRayImage(torch.rand(100, 120, dtype=torch.float64), (0.4, 0.5), None, "a.dcm", 12)
    check_xray_against_camera(image, 100, 120, (0.404, 0.495))  # within 2 %
    check_xray_against_camera(image, 100, 120, None)  # pitch unknown: size alone
    with pytest.raises(ValueError, match=r"100 x 120 pixels .* detector is 50 x 60 \(the X-ray is 2x the detector"):
        check_xray_against_camera(image, 50, 60, (0.8, 1.0))
    with pytest.raises(ValueError, match=r"100 x 120 pixels .* detector is 100 x 121$"):
        check_xray_against_camera(image, 100, 121, None)
    with pytest.raises(ValueError, match=r"pixel spacing 0\.4 x 0\.5 mm .* camera's is 0\.4 x 0\.52 mm"):
        check_xray_against_camera(image, 100, 120, (0.4, 0.52))
    check_xray_against_camera(image, 100, 120, (0.4, 0.52), rtol=0.05)
    unknown = XRayImage(image.pixels, None, None, "a.png", 8)
    check_xray_against_camera(unknown, 100, 120, (9.0, 9.0))  # the X-ray's pitch unknown: size alone
