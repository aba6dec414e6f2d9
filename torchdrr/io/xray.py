"""Reading one X-ray image (the fixed image of a 2D/3D registration): PNG, TIFF, DICOM or ``.npy``.

:func:`read_xray` returns an :class:`XRayImage`: the pixel values ``[H, W]`` as float64 (row 0 at the top, as stored),
the detector pixel pitch when the file states it, and a *kind hint* saying how the values relate to attenuation, in
the terms of ``torchdrr.registration.XRAY_KINDS``:

* ``"line_integral"``: the values grow with attenuation (bright where the body attenuates), like ``-log(I / I0)``
  or a film-like display image (bone white);
* ``"intensity"``: the values are proportional to the detected signal (dark where the body attenuates, > 0), so
  ``-log(I / max I)`` is the line integral up to an offset;
* ``"display"``: the values fall with attenuation but are not proportional to the signal (e.g. log-encoded or
  windowed), so ``max - value`` is used.

The kind hint comes from metadata only (DICOM attributes); it is ``None`` when the file does not say.
:func:`xray_kind_auto` turns it into a guess that is never ``None``, looking at the pixels when it has to.

Kind-hint rule (DICOM; the first rule that applies wins)
--------------------------------------------------------
1. ``PixelIntensityRelationship`` (0028,1040) ``LIN`` or ``LOG`` with ``PixelIntensityRelationshipSign``
   (0028,1041, default +1): sign -1 (values fall as the X-ray intensity rises) -> ``"line_integral"``; sign +1 and
   ``LIN`` -> ``"intensity"``; sign +1 and ``LOG`` -> ``"display"`` (``max - value`` is then exactly the line
   integral up to an offset and a scale).
2. ``PresentationIntentType`` ``FOR PROCESSING`` (raw detector data) -> ``"intensity"``.
3. Otherwise the image is meant for display, and what matters is how the modality shows the body. Projection
   radiographs (``Modality`` CR, DX, MG, IO, PX, RG) are shown film-like, with the body bright; fluoroscopy and
   angiography (XA, RF) are shown with the body dark. ``PhotometricInterpretation`` MONOCHROME2 stores bright as high
   values, MONOCHROME1 stores bright as *low* values. So the stored values grow with attenuation exactly when
   (film-like modality) XOR (MONOCHROME1): then ``"line_integral"``, else ``"display"``. Another or no modality:
   ``None``.

So a MONOCHROME1 chest radiograph (body displayed white, stored low) is ``"display"`` as stored, and would be
``"line_integral"`` once inverted. :func:`read_xray` never inverts: the pixels are the stored values after the
modality transform (rescale slope and intercept), because for raw data (rule 1 and 2) that is the physical
quantity and inverting it would break the proportionality to the signal. The photometric interpretation is kept in
``XRayImage.photometric``.

PNG, TIFF and ``.npy`` files carry no such metadata: their hint is ``None``. (A PNG may be a film-like radiograph,
as ``torchdrr render`` writes them, or a fluoroscopy frame, body dark; a float32 TIFF written by ``torchdrr render``
holds whichever ``--output`` was asked for, by default line integrals.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .writers import PNG_SUFFIXES, TIFF_SUFFIXES

__all__ = [
    "DICOM_SUFFIXES",
    "XRAY_SUFFIXES",
    "XRayImage",
    "check_pixel_spacing",
    "check_xray_against_camera",
    "read_xray",
    "xray_kind_auto",
]

DICOM_SUFFIXES = (".dcm", ".dicom")
NPY_SUFFIXES = (".npy",)
#: Every suffix :func:`read_xray` reads (case-insensitive); a file with no suffix is read as DICOM when it is one.
XRAY_SUFFIXES = PNG_SUFFIXES + TIFF_SUFFIXES + DICOM_SUFFIXES + NPY_SUFFIXES

#: Modalities displayed film-like (body bright) and as fluoroscopy (body dark), for kind-hint rule 3.
_FILM_LIKE_MODALITIES = ("CR", "DX", "MG", "IO", "PX", "RG")
_FLUOROSCOPY_MODALITIES = ("XA", "RF")


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors elementwise has no single truth value
class XRayImage:
    """One X-ray image as read from a file.

    Attributes:
        pixels: ``[H, W]`` float64 values, row 0 at the top of the image as stored (for DICOM: after the modality
            transform, i.e. RescaleSlope / RescaleIntercept; never inverted). Finite and not constant.
        pixel_spacing_mm: detector pixel pitch ``(row, column)`` in mm, or None when the file does not state it
            (DICOM ImagerPixelSpacing, else PixelSpacing; PNG, TIFF and ``.npy`` never state it).
        kind_hint: ``"line_integral"``, ``"intensity"``, ``"display"`` or None when the metadata does not say (see
            the module docstring for the rule).
        source: the file path (with ``[frame k]`` appended when a frame of a multi-frame file was picked).
        bits: bits per stored sample (8 or 16 for PNG, 8, 16 or 32 for TIFF, BitsStored for DICOM), None for
            ``.npy``.
        photometric: the DICOM PhotometricInterpretation (``"MONOCHROME1"``: low values are displayed bright), None
            for other formats.
    """

    pixels: torch.Tensor
    pixel_spacing_mm: tuple[float, float] | None
    kind_hint: str | None
    source: str
    bits: int | None
    photometric: str | None = None

    @property
    def height(self) -> int:
        """Rows, pixels."""
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        """Columns, pixels."""
        return int(self.pixels.shape[1])


def read_xray(path: str | Path, *, frame: int | None = None) -> XRayImage:
    """Reads one grayscale X-ray image from a PNG, TIFF, DICOM or ``.npy`` file.

    Args:
        path: ``.png`` (8- or 16-bit gray; RGB / RGBA / palette images are accepted when their colour channels are
            equal, the alpha channel is ignored), ``.tif`` / ``.tiff`` (8-, 16- or 32-bit integer or float32 gray, e.g.
            what ``torchdrr.io.writers.save_tiff`` writes), ``.dcm`` / ``.dicom`` or no suffix (DICOM, read with
            pydicom), ``.npy`` (a 2D array of real numbers).
        frame: for a multi-frame DICOM or a multi-page TIFF, the 0-based frame (page) to read; required there.
            Elsewhere only None or 0 is accepted.

    Returns:
        The image: ``pixels`` ``[H, W]`` float64 and its metadata (see :class:`XRayImage`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unsupported suffix (the message names the supported ones), a file that cannot be decoded, a
            multi-frame file without ``frame`` (the message gives the frame count) or a ``frame`` out of range, colour
            channels that differ, malformed pixel spacing, non-finite values, or a constant image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"X-ray file not found: {path}")
    if path.is_dir():
        raise ValueError(f"X-ray path is a folder, not a file: {path}")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise ValueError(f"frame must be an int or None, got {frame!r}")
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        image = _read_pillow(path, frame, "PNG")
    elif suffix in TIFF_SUFFIXES:
        image = _read_pillow(path, frame, "TIFF")
    elif suffix in DICOM_SUFFIXES or (suffix == "" and _looks_like_dicom(path)):
        image = _read_dicom(path, frame)
    elif suffix in NPY_SUFFIXES:
        image = _read_npy(path, frame)
    else:
        raise ValueError(
            f"unsupported X-ray file {path}: the suffix must be one of {', '.join(XRAY_SUFFIXES)} (or none, for a "
            f"DICOM file), got {path.suffix or 'no suffix'!r}"
        )
    _check_values(image.pixels, image.source)
    return image


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _check_values(pixels: torch.Tensor, source: str) -> None:
    if not bool(torch.isfinite(pixels).all()):
        bad = int((~torch.isfinite(pixels)).sum())
        raise ValueError(f"{source}: the X-ray holds {bad} non-finite values (NaN or Inf)")
    if pixels.numel() == 0:
        raise ValueError(f"{source}: the X-ray is empty, shape {tuple(pixels.shape)}")
    if bool((pixels == pixels.reshape(-1)[0]).all()):
        raise ValueError(f"{source}: constant image: nothing to register to (every pixel is {float(pixels[0, 0]):g})")


def _check_frame_unused(frame: int | None, source: str, what: str) -> None:
    if frame not in (None, 0):
        raise ValueError(f"{source}: frame={frame} was given but {what} holds a single image (only frame 0)")


def _gray_from_channels(array: np.ndarray, source: str) -> np.ndarray:
    """``[H, W]`` from ``[H, W]`` or ``[H, W, C]`` (C = 2: gray + alpha; C >= 3: colour, alpha ignored), checking
    colour channels are equal."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(f"{source}: expected a 2D grayscale image, got an array of shape {tuple(array.shape)}")
    channels = array.shape[2]
    if channels <= 2:
        return array[..., 0]
    red, green, blue = array[..., 0], array[..., 1], array[..., 2]
    if not (np.array_equal(red, green) and np.array_equal(red, blue)):
        differ = int(np.count_nonzero((red != green) | (red != blue)))
        raise ValueError(
            f"{source}: a colour image whose red, green and blue channels differ at {differ} pixels; an X-ray must be "
            "grayscale (save it as gray)"
        )
    return red


#: Pillow mode -> bits per sample (None: from the file, see ``_read_pillow``).
_MODE_BITS: dict[str, int | None] = {
    "1": 1,
    "L": 8,
    "LA": 8,
    "P": 8,
    "PA": 8,
    "RGB": 8,
    "RGBA": 8,
    "RGBX": 8,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "I;16N": 16,
    "I": None,
    "F": 32,
}


def _read_pillow(path: Path, frame: int | None, fmt: str) -> XRayImage:
    source = str(path)
    try:
        picture = Image.open(path)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{source}: not a readable {fmt} file: {error}") from error
    with picture:
        if picture.format != fmt:
            raise ValueError(f"{source}: the suffix says {fmt} but the file holds {picture.format or 'unknown data'}")
        pages = int(getattr(picture, "n_frames", 1))
        if pages > 1:
            if frame is None:
                raise ValueError(
                    f"{source}: a multi-page {fmt} with {pages} pages; pass frame= (0 to {pages - 1}) to pick one"
                )
            if not 0 <= frame < pages:
                raise ValueError(f"{source}: frame={frame} is out of range for {pages} pages (0 to {pages - 1})")
            picture.seek(int(frame))
            source = f"{source} [frame {int(frame)}]"
        else:
            _check_frame_unused(frame, source, f"this {fmt}")
        mode = picture.mode
        if mode not in _MODE_BITS:
            raise ValueError(f"{source}: unsupported {fmt} pixel mode {mode!r}; expected 8/16-bit gray or float32")
        try:
            if mode in ("P", "PA"):
                picture = picture.convert("RGBA")
            array = np.asarray(picture)
        except (OSError, ValueError) as error:
            raise ValueError(f"{source}: could not decode the {fmt} pixel data: {error}") from error
    bits = _MODE_BITS[mode]
    if bits is None:  # mode "I": 32-bit integers; a PNG in this mode is 16-bit (the IHDR bit depth says so)
        bits = _png_bit_depth(path) if fmt == "PNG" else 32
    gray = _gray_from_channels(array, source)
    pixels = torch.from_numpy(np.array(gray, dtype=np.float64))
    return XRayImage(pixels=pixels, pixel_spacing_mm=None, kind_hint=None, source=source, bits=bits)


def _png_bit_depth(path: Path) -> int:
    """The bit depth byte of a PNG's IHDR chunk (offset 24)."""
    with open(path, "rb") as handle:
        head = handle.read(25)
    return int(head[24]) if len(head) == 25 else 16


def _read_npy(path: Path, frame: int | None) -> XRayImage:
    source = str(path)
    _check_frame_unused(frame, source, "a .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{source}: not a readable .npy file: {error}") from error
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = tuple(array.shape) if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{source}: a .npy X-ray must be a 2D array [H, W], got shape {shape}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{source}: a .npy X-ray must hold real numbers (int or float), got dtype {array.dtype}")
    pixels = torch.from_numpy(np.array(array, dtype=np.float64))
    return XRayImage(pixels=pixels, pixel_spacing_mm=None, kind_hint=None, source=source, bits=None)


def _dicom_item(dataset: Any, sequence: str, item: str, frame: int) -> Any:
    """``item`` of the enhanced-DICOM functional group ``sequence`` for ``frame`` (per-frame first, then shared)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        container = dataset.get(groups)
        if container is None or len(container) <= index:
            continue
        inner = container[index].get(sequence)
        if inner is not None and len(inner) > 0 and item in inner[0]:
            return inner[0].get(item)
    return None


def _dicom_value(dataset: Any, keyword: str, sequence: str, frame: int) -> Any:
    """A top-level attribute, else the same attribute in a functional group (enhanced multi-frame files)."""
    value = dataset.get(keyword)
    if value is None or value == "":
        value = _dicom_item(dataset, sequence, keyword, frame)
    return value


def _dicom_spacing(dataset: Any, frame: int, source: str) -> tuple[float, float] | None:
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = _dicom_value(dataset, keyword, "PixelMeasuresSequence", frame)
        if value is None or value == "":
            continue
        try:
            numbers = [float(v) for v in value]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {keyword} must be two numbers (row, column mm), got {value!r}") from error
        if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
            raise ValueError(f"{source}: {keyword} must be two positive numbers (row, column mm), got {value!r}")
        return numbers[0], numbers[1]
    return None


def _dicom_kind_hint(dataset: Any, photometric: str | None) -> str | None:
    """The kind-hint rule of the module docstring."""
    relationship = str(dataset.get("PixelIntensityRelationship", "") or "").strip().upper()
    if relationship in ("LIN", "LOG"):
        try:
            sign = int(dataset.get("PixelIntensityRelationshipSign", 1) or 1)
        except (TypeError, ValueError):
            sign = 1
        if sign < 0:
            return "line_integral"
        return "intensity" if relationship == "LIN" else "display"
    intent = str(dataset.get("PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING":
        return "intensity"
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    if modality in _FILM_LIKE_MODALITIES:
        film_like = True
    elif modality in _FLUOROSCOPY_MODALITIES:
        film_like = False
    else:
        return None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    return "line_integral" if film_like != (photometric == "MONOCHROME1") else "display"


def _read_dicom(path: Path, frame: int | None) -> XRayImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, pixel_array

    source = str(path)
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise ValueError(f"{source}: not a readable DICOM file: {error}") from error
    if "PixelData" not in dataset:
        raise ValueError(f"{source}: a DICOM file without pixel data (no PixelData element)")
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        if frame is None:
            raise ValueError(
                f"{source}: a multi-frame DICOM with {frames} frames; pass frame= (0 to {frames - 1}) to pick one"
            )
        if not 0 <= frame < frames:
            raise ValueError(f"{source}: frame={frame} is out of range for {frames} frames (0 to {frames - 1})")
        index: int | None = int(frame)
        source = f"{source} [frame {index}]"
    else:
        _check_frame_unused(frame, source, "this DICOM file")
        index = None
    try:
        stored = pixel_array(dataset, index=index)
    except Exception as error:  # pydicom raises many types for missing decoders and truncated or malformed data
        raise ValueError(f"{source}: could not decode the DICOM pixel data: {error}") from error
    if index is not None and stored.ndim >= 3 and stored.shape[0] == 1 and int(dataset.get("SamplesPerPixel", 1)) == 1:
        stored = stored[0]
    gray = _gray_from_channels(np.asarray(stored), source)
    if "ModalityLUTSequence" in dataset:
        values = np.asarray(apply_modality_lut(gray, dataset), dtype=np.float64)
    else:
        slope = _dicom_value(dataset, "RescaleSlope", "PixelValueTransformationSequence", index or 0)
        intercept = _dicom_value(dataset, "RescaleIntercept", "PixelValueTransformationSequence", index or 0)
        try:
            slope_value = 1.0 if slope is None or slope == "" else float(slope)
            intercept_value = 0.0 if intercept is None or intercept == "" else float(intercept)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{source}: RescaleSlope / RescaleIntercept must be numbers, got {slope!r} / {intercept!r}"
            ) from error
        if not (math.isfinite(slope_value) and math.isfinite(intercept_value)) or slope_value == 0:
            raise ValueError(
                f"{source}: RescaleSlope must be finite and non-zero and RescaleIntercept finite, got "
                f"{slope_value:g} / {intercept_value:g}"
            )
        # float64 arithmetic: uint16 data plus a negative intercept cannot wrap.
        values = gray.astype(np.float64) * slope_value + intercept_value
    photometric_value = dataset.get("PhotometricInterpretation")
    photometric = str(photometric_value).strip().upper() if photometric_value else None
    bits_value = dataset.get("BitsStored", dataset.get("BitsAllocated"))
    return XRayImage(
        pixels=torch.from_numpy(np.array(values, dtype=np.float64)),
        pixel_spacing_mm=_dicom_spacing(dataset, index or 0, source),
        kind_hint=_dicom_kind_hint(dataset, photometric),
        source=source,
        bits=int(bits_value) if bits_value is not None else None,
        photometric=photometric,
    )


def xray_kind_auto(image: XRayImage) -> str:
    """The best guess of how ``image``'s values relate to attenuation: one of ``registration.XRAY_KINDS``.

    Rule:

    1. The metadata's ``kind_hint`` when there is one, except that ``"intensity"`` becomes ``"display"`` when some
       pixel is <= 0 (the same sense, but the log that ``"intensity"`` takes needs positive values).
    2. Otherwise the pixels decide. The patient is usually centred in the field of view and air, or thinner
       anatomy, lies towards its edges, so the median of the central region (middle half of the rows and of the
       columns) is compared with the median of the border frame (the outer eighth on each side):

       * centre brighter than the border -> ``"line_integral"`` (the values grow with attenuation);
       * centre darker -> ``"intensity"`` when every pixel is > 0 and the values are not all whole numbers (a
         float quantity such as I or I/I0), else ``"display"`` (integer display levels);
       * equal -> ``"line_integral"`` (the registration's default).

    It is a guess: an image whose field of view lies wholly inside the body can fool rule 2. Pass the kind
    explicitly (``torchdrr register --xray-kind``) when it matters.
    """
    pixels = image.pixels.detach().to(torch.float64)
    positive = bool((pixels > 0).all())
    if image.kind_hint is not None:
        if image.kind_hint == "intensity" and not positive:
            return "display"
        return image.kind_hint
    height, width = pixels.shape
    centre = pixels[height // 4 : height - height // 4, width // 4 : width - width // 4]
    band_rows, band_cols = max(1, height // 8), max(1, width // 8)
    border_mask = torch.ones_like(pixels, dtype=torch.bool)
    border_mask[band_rows : height - band_rows, band_cols : width - band_cols] = False
    border = pixels[border_mask]
    if centre.numel() == 0 or border.numel() == 0:
        return "line_integral"
    centre_median, border_median = float(centre.median()), float(border.median())
    if centre_median >= border_median:
        return "line_integral"
    whole_numbers = bool((pixels == pixels.round()).all())
    return "intensity" if positive and not whole_numbers else "display"


def check_xray_against_camera(
    image: XRayImage,
    height: int,
    width: int,
    pixel_spacing_mm: tuple[float, float] | None,
    rtol: float = 0.02,
) -> None:
    """Checks that ``image`` fits a detector of ``height`` x ``width`` pixels with pitch ``pixel_spacing_mm``.

    Args:
        image: the X-ray as read.
        height, width: the camera's detector size, pixels.
        pixel_spacing_mm: the camera's pixel pitch ``(row, column)`` in mm, or None when unknown.
        rtol: the relative pitch difference tolerated (0.02: 2 %).

    Raises:
        ValueError: the sizes differ (always), or both pitches are known and one of them differs by more than
            ``rtol``; the message names the expected and actual values.
    """
    actual = (image.height, image.width)
    if actual != (int(height), int(width)):
        hint = ""
        if actual[0] % height == 0 and actual[1] % width == 0 and actual[0] // height == actual[1] // width:
            hint = f" (the X-ray is {actual[0] // height}x the detector: bin it, or render at its size)"
        raise ValueError(
            f"X-ray {image.source} is {actual[0]} x {actual[1]} pixels (rows x columns) but the camera's detector is "
            f"{int(height)} x {int(width)}{hint}"
        )
    check_pixel_spacing(image.pixel_spacing_mm, pixel_spacing_mm, rtol, f"X-ray {image.source}")


def check_pixel_spacing(
    actual: Sequence[float] | None, expected: Sequence[float] | None, rtol: float = 0.02, what: str = "the X-ray"
) -> None:
    """Checks an X-ray's pixel pitch ``actual`` against a camera's ``expected``, both ``(row, column)`` in mm.

    Nothing is checked when either is None (unknown). Raises ValueError naming both when ``actual`` is not two
    numbers or one of them differs by more than ``rtol`` (relative)."""
    if actual is None or expected is None:
        return
    got = tuple(float(a) for a in actual)
    want = (float(expected[0]), float(expected[1]))
    if len(got) != 2 or any(abs(g - e) > rtol * abs(e) for g, e in zip(got, want, strict=True)):
        shown = " x ".join(f"{g:g}" for g in got)
        raise ValueError(
            f"{what} has pixel spacing {shown} mm (row, column) but the camera's is {want[0]:.4g} x {want[1]:.4g} mm "
            f"(more than {100 * rtol:g} % apart; the camera's comes from K and the SDD)"
        )
