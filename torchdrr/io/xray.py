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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import XRayFormatError
from .writers import PNG_SUFFIXES, TIFF_SUFFIXES

__all__ = [
    "DICOM_SUFFIXES",
    "MAX_XRAY_PIXELS",
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


#: The largest image :func:`read_xray` accepts, in pixels (8192 x 8192: 512 MB as float64, larger than any flat-panel
#: detector). A header claiming more is refused before any pixel memory is allocated.
MAX_XRAY_PIXELS = 8192 * 8192


def read_xray(path: str | Path, *, frame: int | None = None) -> XRayImage:
    """Reads one grayscale X-ray image from a PNG, TIFF, DICOM or ``.npy`` file.

    Args:
        path: ``.png`` (8- or 16-bit gray; RGB / RGBA / palette images are accepted when their colour channels are
            equal, the alpha channel is ignored), ``.tif`` / ``.tiff`` (8-, 16- or 32-bit integer or float32 gray, e.g.
            what ``torchdrr.io.writers.save_tiff`` writes), ``.dcm`` / ``.dicom`` or no suffix (DICOM, read with
            pydicom), ``.npy`` (a 2D array of real numbers; never unpickled).
        frame: for a multi-frame DICOM or a multi-page TIFF, the 0-based frame (page) to read; required there.
            Elsewhere only None or 0 is accepted.

    Returns:
        The image: ``pixels`` ``[H, W]`` float64 and its metadata (see :class:`XRayImage`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``frame`` is neither None nor an int.
        torchdrr.errors.XRayFormatError: (a ``ValueError`` whose ``path`` is the file) anything wrong with the file:
            a folder, an unsupported suffix (the message names the supported ones), a file that cannot be decoded
            (truncated, corrupt, of another format than its suffix says, a header inconsistent with its data or
            claiming more than ``MAX_XRAY_PIXELS`` pixels), a multi-frame file without ``frame`` (the message gives
            the frame count) or a ``frame`` out of range, an unsupported pixel type, colour channels that differ,
            malformed pixel spacing or rescale values, non-finite values, an empty or a constant image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"X-ray file not found: {path}")
    if path.is_dir():
        raise XRayFormatError(f"X-ray path is a folder, not a file: {path}", path=path)
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
        raise XRayFormatError(
            f"unsupported X-ray file {path}: the suffix must be one of {', '.join(XRAY_SUFFIXES)} (or none, for a "
            f"DICOM file), got {path.suffix or 'no suffix'!r}",
            path=path,
        )
    _check_values(image.pixels, image.source, path)
    return image


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _check_values(pixels: torch.Tensor, source: str, path: Path) -> None:
    if pixels.ndim != 2:  # the readers return 2D; a guard so that a reader bug cannot pass as an image
        raise XRayFormatError(f"{source}: expected a 2D image, got shape {tuple(pixels.shape)}", path=path)
    if pixels.numel() == 0:
        raise XRayFormatError(f"{source}: the X-ray is empty, shape {tuple(pixels.shape)}", path=path)
    if not bool(torch.isfinite(pixels).all()):
        bad = int((~torch.isfinite(pixels)).sum())
        raise XRayFormatError(f"{source}: the X-ray holds {bad} non-finite values (NaN or Inf)", path=path)
    if bool((pixels == pixels.reshape(-1)[0]).all()):
        raise XRayFormatError(
            f"{source}: constant image: nothing to register to (every pixel is {float(pixels[0, 0]):g})", path=path
        )


def _check_frame_unused(frame: int | None, source: str, what: str, path: Path) -> None:
    if frame not in (None, 0):
        raise XRayFormatError(
            f"{source}: frame={frame} was given but {what} holds a single image (only frame 0)", path=path
        )


def _check_frame(frame: int | None, count: int, what: str, fmt: str, source: str, path: Path) -> int:
    """The frame index to read from a ``fmt`` file of ``count`` frames (``what``: "frames" or "pages"), refusing a
    missing or out-of-range one."""
    if frame is None:
        raise XRayFormatError(
            f"{source}: a multi-{what[:-1]} {fmt} with {count} {what}; pass frame= (0 to {count - 1}) to pick one",
            path=path,
        )
    if not 0 <= frame < count:
        raise XRayFormatError(
            f"{source}: frame={frame} is out of range for {count} {what} (0 to {count - 1})", path=path
        )
    return int(frame)


def _check_size(height: int, width: int, source: str, path: Path) -> None:
    """Refuses an empty image or one larger than ``MAX_XRAY_PIXELS``, from the header, before decoding."""
    if height <= 0 or width <= 0:
        raise XRayFormatError(
            f"{source}: the header claims an image of {height} x {width} pixels: empty (or negative)", path=path
        )
    if height * width > MAX_XRAY_PIXELS:
        raise XRayFormatError(
            f"{source}: the header claims {height} x {width} pixels (rows x columns), more than the "
            f"{MAX_XRAY_PIXELS} pixels an X-ray may have: a corrupt header (nothing was decoded)",
            path=path,
        )


def _gray_from_channels(array: np.ndarray, source: str, path: Path) -> np.ndarray:
    """``[H, W]`` from ``[H, W]`` or ``[H, W, C]`` (C = 2: gray + alpha; C >= 3: colour, alpha ignored), checking
    colour channels are equal."""
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise XRayFormatError(
            f"{source}: expected a 2D grayscale image, got an array of shape {tuple(array.shape)}", path=path
        )
    channels = array.shape[2]
    if channels <= 2:
        return array[..., 0]
    red, green, blue = array[..., 0], array[..., 1], array[..., 2]
    if not (np.array_equal(red, green) and np.array_equal(red, blue)):
        differ = int(np.count_nonzero((red != green) | (red != blue)))
        raise XRayFormatError(
            f"{source}: a colour image whose red, green and blue channels differ at {differ} pixels; an X-ray must be "
            "grayscale (save it as gray)",
            path=path,
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

#: Pillow mode -> samples per pixel, for the bytes a header claims.
_MODE_SAMPLES = {"LA": 2, "PA": 2, "RGB": 3, "RGBA": 4, "RGBX": 4}

#: The largest ratio of decoded to encoded bytes each compression can reach (a little above the theoretical bound):
#: a header claiming more pixels than its file could hold is corrupt, and is refused before Pillow allocates them.
#: PNG: deflate (at most ~1032:1). TIFF, by Compression tag: none, LZW (a 12-bit code stands for <= 4096 bytes),
#: deflate, PackBits (2 bytes for 128). Other TIFF compressions are only bounded by ``MAX_XRAY_PIXELS``.
_PNG_RATIO = 1100
_TIFF_RATIOS = {1: 1, 5: 4096, 8: 1100, 32946: 1100, 32773: 65}


def _read_pillow(path: Path, frame: int | None, fmt: str) -> XRayImage:
    source = str(path)
    file_bytes = path.stat().st_size
    # Pillow raises a zoo of types for a corrupt file (OSError, SyntaxError, struct.error, ValueError, KeyError,
    # IndexError, ZeroDivisionError, DecompressionBombError, ...): every failure inside Pillow is the file's fault.
    try:
        with warnings.catch_warnings():
            # The pixel count is checked below, against a tighter limit, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(path)
    except Image.DecompressionBombError as error:
        # Pillow refuses to open a file whose header claims over 2 * MAX_IMAGE_PIXELS, without saying the size.
        size = _pillow_claimed_size(path, fmt)
        if size is not None:
            _check_size(size[1], size[0], source, path)
        raise XRayFormatError(f"{source}: the header claims too many pixels: {_describe(error)}", path=path) from error
    except Exception as error:
        raise XRayFormatError(f"{source}: not a readable {fmt} file: {_describe(error)}", path=path) from error
    with picture:
        if picture.format != fmt:
            raise XRayFormatError(
                f"{source}: the suffix says {fmt} but the file holds {picture.format or 'unknown data'}", path=path
            )
        try:
            pages = int(getattr(picture, "n_frames", 1))
            if pages > 1:
                index = _check_frame(frame, pages, "pages", fmt, source, path)
                picture.seek(index)
                source = f"{source} [frame {index}]"
            else:
                _check_frame_unused(frame, source, f"this {fmt}", path)
            mode = picture.mode
            width, height = picture.size
            tags = dict(picture.tag_v2) if fmt == "TIFF" else {}
        except XRayFormatError:
            raise
        except Exception as error:
            raise XRayFormatError(f"{source}: a corrupt {fmt} structure: {_describe(error)}", path=path) from error
        if mode not in _MODE_BITS:
            raise XRayFormatError(
                f"{source}: unsupported {fmt} pixel mode {mode!r}; expected 8/16-bit gray or float32", path=path
            )
        _check_size(height, width, source, path)
        bits = _MODE_BITS[mode]
        if bits is None:  # mode "I": 32-bit integers; a PNG in this mode is 16-bit (the IHDR bit depth says so)
            bits = _png_bit_depth(path) if fmt == "PNG" else 32
        if fmt == "PNG":
            claimed = height * -(-width * bits * _MODE_SAMPLES.get(mode, 1) // 8)
            ratio: int | None = _PNG_RATIO
        else:
            claimed = height * -(-width * _tiff_bits_per_pixel(tags, bits) // 8)
            ratio = _TIFF_RATIOS.get(_tiff_int(tags, 259, 1))
        if ratio is not None and claimed > ratio * file_bytes:
            raise XRayFormatError(
                f"{source}: the header claims {height} x {width} pixels ({claimed} bytes of pixel data) but the file "
                f"holds only {file_bytes} bytes: truncated, or a corrupt header",
                path=path,
            )
        try:
            if mode in ("P", "PA"):
                picture = picture.convert("RGBA")
            array = np.asarray(picture)
        except Exception as error:  # the decoders' failures, as for Image.open above
            raise XRayFormatError(
                f"{source}: could not decode the {fmt} pixel data: {_describe(error)}", path=path
            ) from error
    if array.shape[:2] != (height, width):  # a decoder that disagrees with the header: never pass it on
        raise XRayFormatError(
            f"{source}: decoded {tuple(array.shape)} pixels but the header claims {height} x {width}", path=path
        )
    gray = _gray_from_channels(array, source, path)
    pixels = torch.from_numpy(np.array(gray, dtype=np.float64))
    return XRayImage(pixels=pixels, pixel_spacing_mm=None, kind_hint=None, source=source, bits=bits)


def _pillow_claimed_size(path: Path, fmt: str) -> tuple[int, int] | None:
    """(width, height) from a PNG's or TIFF's header, through Pillow's format plugin, which (unlike ``Image.open``)
    does not refuse huge sizes; None when that fails too."""
    from PIL import PngImagePlugin, TiffImagePlugin

    plugin = PngImagePlugin.PngImageFile if fmt == "PNG" else TiffImagePlugin.TiffImageFile
    try:
        with plugin(path) as picture:
            return picture.size
    except Exception:  # the caller reports Pillow's own error instead
        return None


def _describe(error: BaseException) -> str:
    """``"Type: message"``, so that an empty message (e.g. a bare ``KeyError``) still says something."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _tiff_int(tags: dict[int, Any], tag: int, default: int) -> int:
    """An integer TIFF tag (the first value of a multi-valued one); ``default`` when absent or malformed."""
    value = tags.get(tag, default)
    if isinstance(value, tuple):
        value = value[0] if value else default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _tiff_bits_per_pixel(tags: dict[int, Any], mode_bits: int) -> int:
    """BitsPerSample x SamplesPerPixel of a TIFF page, as the header claims them (at least 1)."""
    samples = max(1, _tiff_int(tags, 277, 1))
    bits = tags.get(258, mode_bits)
    if isinstance(bits, tuple):
        total = sum(int(b) for b in bits[:samples] if isinstance(b, int) and b > 0)
        return max(1, total)
    return max(1, _tiff_int(tags, 258, mode_bits) * samples)


def _png_bit_depth(path: Path) -> int:
    """The bit depth byte of a PNG's IHDR chunk (offset 24)."""
    with open(path, "rb") as handle:
        head = handle.read(25)
    return int(head[24]) if len(head) == 25 else 16


def _read_npy(path: Path, frame: int | None) -> XRayImage:
    """A ``.npy`` file, its header checked against the file's length before any data is read (a header may claim a
    huge shape), never unpickled."""
    source = str(path)
    _check_frame_unused(frame, source, "a .npy file", path)
    file_bytes = path.stat().st_size
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:  # 3.0 is only written for structured dtypes with non-latin-1 field names: never an image
                raise XRayFormatError(f"{source}: unsupported .npy format version {version}", path=path)
        except XRayFormatError:
            raise
        # numpy parses the header dict with ast.literal_eval: it raises ValueError for a malformed header, and
        # SyntaxError / RecursionError / MemoryError / TypeError can escape from the parser for odd ones.
        except Exception as error:
            raise XRayFormatError(f"{source}: not a readable .npy file: {_describe(error)}", path=path) from error
        offset = handle.tell()
        if dtype.hasobject:
            raise XRayFormatError(f"{source}: a .npy file of Python objects (pickles are never loaded)", path=path)
        if len(shape) != 2:
            raise XRayFormatError(f"{source}: a .npy X-ray must be a 2D array [H, W], got shape {shape}", path=path)
        if dtype.kind not in "iuf":
            raise XRayFormatError(
                f"{source}: a .npy X-ray must hold real numbers (int or float), got dtype {dtype}", path=path
            )
        height, width = (int(n) for n in shape)
        _check_size(height, width, source, path)
        expected = height * width * dtype.itemsize
        if file_bytes - offset != expected:
            raise XRayFormatError(
                f"{source}: the header claims shape {shape} of {dtype} ({expected} bytes of data) but the file holds "
                f"{file_bytes - offset} bytes after the header: truncated, or a corrupt header",
                path=path,
            )
        data = handle.read(expected)
    if len(data) != expected:  # the file changed under us
        raise XRayFormatError(f"{source}: could read only {len(data)} of {expected} bytes of data", path=path)
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    pixels = torch.from_numpy(np.array(array, dtype=np.float64))
    return XRayImage(pixels=pixels, pixel_spacing_mm=None, kind_hint=None, source=source, bits=None)


class _Dicom:
    """Reading attributes of a parsed DICOM dataset, turning every failure into an :class:`XRayFormatError`.

    pydicom converts an element's raw bytes only when it is first accessed, so a malformed value (a ``US`` of the
    wrong length, a ``DS`` that is no number, a broken sequence) raises then, with types ranging from ValueError to
    struct.error and TypeError.
    """

    def __init__(self, dataset: Any, source: str, path: Path) -> None:
        self.dataset, self.source, self.path = dataset, source, path

    def error(self, message: str, cause: BaseException | None = None) -> XRayFormatError:
        detail = f": {_describe(cause)}" if cause is not None else ""
        return XRayFormatError(f"{self.source}: {message}{detail}", path=self.path)

    def get(self, keyword: str, container: Any = None) -> Any:
        """The value of ``keyword`` in ``container`` (default: the dataset), None when absent or empty."""
        try:
            value = (self.dataset if container is None else container).get(keyword)
            return None if value is None or (isinstance(value, (str, bytes)) and value == "") else value
        except Exception as error:
            raise self.error(f"a malformed {keyword} element", error) from error

    def integer(self, keyword: str, default: int | None = None) -> int | None:
        """An integer attribute (``default`` when absent); a value that is no single integer is an error."""
        value = self.get(keyword)
        if value is None:
            return default
        try:
            if isinstance(value, (bytes, bytearray)):
                raise TypeError(f"raw bytes {bytes(value[:16])!r}")
            return int(value)
        except Exception as error:
            raise self.error(f"{keyword} must be an integer, got {value!r}", error) from error

    def item(self, sequence: str, keyword: str, frame: int) -> Any:
        """``keyword`` of the enhanced-DICOM functional group ``sequence`` for ``frame`` (per-frame first, then
        shared)."""
        for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
            container = self.get(groups)
            try:
                if container is None or len(container) <= index:
                    continue
                inner = self.get(sequence, container[index])
                if inner is None or len(inner) == 0:
                    continue
            except XRayFormatError:
                raise
            except Exception as error:
                raise self.error(f"a malformed {groups}", error) from error
            value = self.get(keyword, inner[0])
            if value is not None:
                return value
        return None

    def value(self, keyword: str, sequence: str, frame: int) -> Any:
        """A top-level attribute, else the same attribute in a functional group (enhanced multi-frame files)."""
        value = self.get(keyword)
        return self.item(sequence, keyword, frame) if value is None else value

    def text(self, keyword: str) -> str:
        """A string attribute, upper case and stripped ("" when absent)."""
        value = self.get(keyword)
        return "" if value is None else str(value).strip().upper()


def _dicom_spacing(dicom: _Dicom, frame: int) -> tuple[float, float] | None:
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = dicom.value(keyword, "PixelMeasuresSequence", frame)
        if value is None:
            continue
        try:
            if isinstance(value, (str, bytes)):  # a single value (pydicom returns a list for two)
                raise TypeError("a single value")
            numbers = [float(v) for v in value]
        except Exception as error:
            raise dicom.error(f"{keyword} must be two numbers (row, column mm), got {value!r}") from error
        if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
            raise dicom.error(f"{keyword} must be two positive numbers (row, column mm), got {value!r}")
        return numbers[0], numbers[1]
    return None


def _dicom_kind_hint(dicom: _Dicom, photometric: str | None) -> str | None:
    """The kind-hint rule of the module docstring."""
    relationship = dicom.text("PixelIntensityRelationship")
    if relationship in ("LIN", "LOG"):
        try:
            sign = int(dicom.get("PixelIntensityRelationshipSign") or 1)
        except (TypeError, ValueError):
            sign = 1
        if sign < 0:
            return "line_integral"
        return "intensity" if relationship == "LIN" else "display"
    if dicom.text("PresentationIntentType") == "FOR PROCESSING":
        return "intensity"
    modality = dicom.text("Modality")
    if modality in _FILM_LIKE_MODALITIES:
        film_like = True
    elif modality in _FLUOROSCOPY_MODALITIES:
        film_like = False
    else:
        return None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    return "line_integral" if film_like != (photometric == "MONOCHROME1") else "display"


def _check_native_pixel_data(dicom: _Dicom, frames: int) -> None:
    """For uncompressed pixel data: the header's image size against the PixelData length, in both directions (a
    shorter one is truncated, a longer one means Rows / Columns / BitsAllocated / NumberOfFrames do not describe
    it: pixels read with them would be garbage)."""
    rows, columns = dicom.integer("Rows"), dicom.integer("Columns")
    if rows is None or columns is None:
        raise dicom.error("Rows and Columns are required with PixelData")
    _check_size(rows, columns, dicom.source, dicom.path)
    samples = dicom.integer("SamplesPerPixel", 1)
    allocated = dicom.integer("BitsAllocated")
    if samples not in (1, 3) or allocated not in (1, 8, 16, 32, 64):
        raise dicom.error(f"unsupported SamplesPerPixel {samples} / BitsAllocated {allocated}")
    data = dicom.get("PixelData")
    if not isinstance(data, (bytes, bytearray)):
        raise dicom.error(f"PixelData is not a byte string ({type(data).__name__})")
    expected = -(-rows * columns * samples * frames * allocated // 8)
    # A YBR_FULL_422 image stores 2 of 3 samples; the DICOM standard pads odd lengths to even.
    if dicom.text("PhotometricInterpretation") == "YBR_FULL_422":
        expected = expected * 2 // 3
    if not expected <= len(data) <= expected + 1:
        raise dicom.error(
            f"Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated = {rows} x {columns} x {samples} x "
            f"{frames} x {allocated} bits is {expected} bytes but PixelData holds {len(data)} bytes: the header does "
            "not describe the pixel data"
        )


def _read_dicom(path: Path, frame: int | None) -> XRayImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, pixel_array

    source = str(path)
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:  # pydicom's parser raises many types for truncated or malformed files
        raise XRayFormatError(f"{source}: not a readable DICOM file: {_describe(error)}", path=path) from error
    dicom = _Dicom(dataset, source, path)
    try:
        has_pixels = "PixelData" in dataset
        syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
        encapsulated = bool(syntax.is_encapsulated) if syntax is not None else False
    except Exception as error:
        raise dicom.error("a malformed file meta header / transfer syntax", error) from error
    if not has_pixels:
        raise dicom.error("a DICOM file without pixel data (no PixelData element)")
    frames = dicom.integer("NumberOfFrames", 1) or 1
    if frames < 0:
        raise dicom.error(f"NumberOfFrames must be positive, got {frames}")
    if not encapsulated:
        _check_native_pixel_data(dicom, frames)
    else:
        rows, columns = dicom.integer("Rows", 0), dicom.integer("Columns", 0)
        _check_size(rows or 0, columns or 0, source, path)
    if frames > 1:
        index: int | None = _check_frame(frame, frames, "frames", "DICOM", source, path)
        source = f"{source} [frame {index}]"
        dicom.source = source
    else:
        _check_frame_unused(frame, source, "this DICOM file", path)
        index = None
    try:
        stored = np.asarray(pixel_array(dataset, index=index))
    except Exception as error:  # pydicom raises many types for missing decoders and truncated or malformed data
        raise dicom.error("could not decode the DICOM pixel data", error) from error
    samples = dicom.integer("SamplesPerPixel", 1)
    if index is not None and stored.ndim >= 3 and stored.shape[0] == 1 and samples == 1:
        stored = stored[0]
    gray = _gray_from_channels(stored, source, path)
    expected_shape = (dicom.integer("Rows"), dicom.integer("Columns"))
    if gray.shape != expected_shape:  # a decoder that disagrees with the header: never pass it on
        raise dicom.error(f"decoded {tuple(gray.shape)} pixels but Rows x Columns is {expected_shape}")
    if dicom.get("ModalityLUTSequence") is not None:
        try:
            values = np.asarray(apply_modality_lut(gray, dataset), dtype=np.float64)
        except Exception as error:
            raise dicom.error("a malformed ModalityLUTSequence", error) from error
    else:
        slope = dicom.value("RescaleSlope", "PixelValueTransformationSequence", index or 0)
        intercept = dicom.value("RescaleIntercept", "PixelValueTransformationSequence", index or 0)
        try:
            slope_value = 1.0 if slope is None else float(slope)
            intercept_value = 0.0 if intercept is None else float(intercept)
        except Exception as error:
            raise dicom.error(
                f"RescaleSlope / RescaleIntercept must be numbers, got {slope!r} / {intercept!r}"
            ) from error
        if not (math.isfinite(slope_value) and math.isfinite(intercept_value)) or slope_value == 0:
            raise dicom.error(
                "RescaleSlope must be finite and non-zero and RescaleIntercept finite, got "
                f"{slope_value:g} / {intercept_value:g}"
            )
        # float64 arithmetic: uint16 data plus a negative intercept cannot wrap.
        values = gray.astype(np.float64) * slope_value + intercept_value
    photometric = dicom.text("PhotometricInterpretation") or None
    bits = dicom.integer("BitsStored", dicom.integer("BitsAllocated"))
    return XRayImage(
        pixels=torch.from_numpy(np.array(values, dtype=np.float64)),
        pixel_spacing_mm=_dicom_spacing(dicom, index or 0),
        kind_hint=_dicom_kind_hint(dicom, photometric),
        source=source,
        bits=bits,
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
