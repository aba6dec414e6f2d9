"""CT volumes: HU data plus a voxel -> world affine (RAS+ mm), read from NIfTI, NRRD or DICOM, with HU sanity checks.

World frame (design.md section 3): RAS+ millimetres, +x to the patient's right, +y anterior, +z superior (nibabel's
frame). Voxel ``(i, j, k)``'s centre is at ``affine @ (i, j, k, 1)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from .errors import VolumeFormatError

__all__ = [
    "MAX_DEFLATE_RATIO",
    "MAX_STORED_BYTES",
    "HUReport",
    "Volume",
    "VolumeFormatError",
    "bundled_ct_path",
    "check_claimed_size",
    "check_hu",
    "crop",
    "load_nifti",
    "require_finite",
    "resample",
    "volume_center",
]

PADDING_THRESHOLD_HU = -1500.0  # no tissue or air is below about -1024 HU; scanners pad with -2048 or -3024
PADDING_MIN_FRACTION = 0.005
OFFSET_HU = 1024.0  # common storage offset: raw = HU + 1024 with a missing RescaleIntercept
AIR_HU = -1000.0


def bundled_ct_path() -> Path:
    """Path of the bundled demo CT: LIDC-IDRI-0001 downsampled to 170 x 170 x 133 (see assets/ATTRIBUTION.md)."""
    return Path(str(resources.files("torchdrr.assets").joinpath("chest_ct_small.nii.gz")))


# A deflate stream expands at most about 1032-fold, so a gzip file of n bytes cannot hold more than this many times n
# bytes of voxels: a header claiming more is lying, and is refused before any allocation.
MAX_DEFLATE_RATIO = 1032
# Ceiling for data whose size cannot be bounded by the file's (bzip2 streams): 2^36 bytes (64 GiB) of stored voxels
# is beyond any CT a workstation can render.
MAX_STORED_BYTES = 1 << 36


def _validated_affine(affine: np.ndarray, source: str, path: str | Path | None = None) -> np.ndarray:
    """Checks an affine is ``[4, 4]``, finite, invertible, with a ``[0, 0, 0, 1]`` last row; returns it as float64.

    ``source`` names the data in messages; ``path`` (the file, if any) goes into the error's ``path``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise VolumeFormatError(f"{source}: affine must be 4 x 4, got shape {affine.shape}", path)
    if not np.all(np.isfinite(affine)):
        raise VolumeFormatError(f"{source}: affine has non-finite entries:\n{affine}", path)
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise VolumeFormatError(f"{source}: affine's last row must be [0, 0, 0, 1], got {affine[3]}", path)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is judged below, not warned about
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        determinant = np.linalg.det(affine[:3, :3])
        scale = np.prod(spacing)
    if not (np.all(np.isfinite(spacing)) and np.isfinite(determinant) and np.isfinite(scale)):
        raise VolumeFormatError(f"{source}: affine's voxel spacing overflows (absurdly large entries):\n{affine}", path)
    # Relative test: a volume with 1e-3 mm voxels is fine, one whose axes are (nearly) parallel is not.
    if np.any(spacing <= 0) or abs(determinant) <= 1e-9 * scale:
        raise VolumeFormatError(f"{source}: affine is singular (zero spacing or parallel axes):\n{affine}", path)
    return affine


def require_finite(data: np.ndarray, path: str | Path) -> np.ndarray:
    """Refuses voxel values that are NaN or infinite (after the file's scaling): a CT holds none, and the renderer
    would refuse them later with less context. Returns ``data`` unchanged.

    Raises:
        VolumeFormatError: giving the count and the way to load such data deliberately.
    """
    finite = np.isfinite(data)
    if not finite.all():
        count = int(finite.size - np.count_nonzero(finite))
        raise VolumeFormatError(
            f"{count} of {data.size} voxels are not finite (NaN or +-Inf after the file's scaling); a CT holds no "
            "such values. If they only mark missing data, read the array yourself and wrap it with "
            "Volume.from_array(torch.nan_to_num(data, nan=-1000.0), affine=...)",
            path,
        )
    return data


def check_claimed_size(
    claimed_bytes: int,
    available_bytes: int,
    encoding: str,
    path: str | Path,
    what: str,
    where: str = "follow the header",
) -> None:
    """Refuses a header whose data could not fit in the file, before anything is allocated or decompressed.

    Args:
        claimed_bytes: bytes of stored voxels the header announces.
        available_bytes: bytes of the file (or data file) that can hold them.
        encoding: ``"raw"`` (needs ``available >= claimed``), ``"gzip"`` (deflate expands at most
            ``MAX_DEFLATE_RATIO``-fold) or anything else compressed (only the ``MAX_STORED_BYTES`` ceiling applies).
        path: the file, for the error.
        what: how the header describes the data (sizes and type), for the message.
        where: where the available bytes are, for the message (e.g. ``"are in data file volume.raw"``).

    Raises:
        VolumeFormatError: the claim is impossible for this file.
    """
    if claimed_bytes > MAX_STORED_BYTES:
        raise VolumeFormatError(
            f"header claims {what} = {claimed_bytes} bytes of voxel data, more than the {MAX_STORED_BYTES} bytes "
            "any CT plausibly holds (damaged header?)",
            path,
        )
    if encoding == "raw" and claimed_bytes > available_bytes:
        raise VolumeFormatError(
            f"header claims {what} = {claimed_bytes} bytes of voxel data, but only {available_bytes} bytes "
            f"{where} (truncated file or wrong header?)",
            path,
        )
    if encoding == "gzip" and claimed_bytes > MAX_DEFLATE_RATIO * available_bytes + 1024:
        raise VolumeFormatError(
            f"header claims {what} = {claimed_bytes} bytes of voxel data, but {available_bytes} gzip-compressed "
            f"bytes can hold at most {MAX_DEFLATE_RATIO * available_bytes} (damaged header?)",
            path,
        )


def _nifti_dims(header: object, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The data shape and on-disk dtype a NIfTI header announces, checked for sense (3D, positive sizes)."""
    try:
        shape = tuple(int(n) for n in header.get_data_shape())  # type: ignore[attr-defined]
        dtype = np.dtype(header.get_data_dtype())  # type: ignore[attr-defined]
    except Exception as error:  # nibabel raises HeaderDataError, KeyError, ... for nonsense dim/datatype fields
        raise VolumeFormatError(f"invalid NIfTI dim/datatype fields: {error}", path) from error
    # Trailing singleton axes (dim[0] = 4 with dim[4] = 1, as some tools write) still make a 3D volume.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeFormatError(f"must hold a 3D volume, but its header's dim field gives shape {shape}", path)
    if min(shape) < 1:
        raise VolumeFormatError(f"header's dim field gives shape {shape}; every size must be at least 1", path)
    return shape, dtype


def _read_nifti_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI -> (``[I, J, K]`` float32 data after the header's scaling, ``[4, 4]`` float64 RAS+ affine)."""
    gz = path.name.lower().endswith(".gz")
    try:
        image = nib.load(str(path))  # reads only the header; the data stays on disk until get_fdata
    except Exception as error:  # nibabel raises several types for unreadable, truncated or foreign files
        raise VolumeFormatError(f"could not read as NIfTI: {type(error).__name__}: {error}", path) from error
    shape, dtype = _nifti_dims(image.header, path)
    offset = image.header.get_data_offset()
    claimed = math.prod(shape) * dtype.itemsize  # Python ints: NIfTI-2 dims are int64, their product can overflow
    what = f"{' x '.join(map(str, shape))} voxels of {dtype}"
    if not np.isfinite(offset) or offset < 0:
        raise VolumeFormatError(f"header's vox_offset {offset} is not a valid byte offset", path)
    available = path.stat().st_size - (0 if gz else int(offset))
    check_claimed_size(claimed, available, "gzip" if gz else "raw", path, what)
    try:
        with warnings.catch_warnings():
            # int data times a huge scl_slope overflows to inf; require_finite reports that with a count
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
        affine = image.affine
    except Exception as error:  # truncated data, undecodable datatypes, corrupt gzip streams, ...
        raise VolumeFormatError(f"could not read the NIfTI data: {type(error).__name__}: {error}", path) from error
    if affine is None:
        raise VolumeFormatError("NIfTI header gives no affine (qform and sform unusable)", path)
    return np.ascontiguousarray(require_finite(data, path)), _validated_affine(affine, str(path), path)


def load_nifti(path: str | Path) -> tuple[Tensor, Tensor]:
    """Reads a NIfTI CT (no HU checks; see :meth:`Volume.load` for those).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``hu`` ``[I, J, K]`` float32 values as stored after the header's scaling (HU for CT), indexed like the file's
        data array, and ``affine`` ``[4, 4]`` float64, voxel index -> world mm (RAS+, NIfTI's frame).

    Raises:
        FileNotFoundError: no such file. VolumeFormatError (a ``ValueError``): unreadable, not 3D, header sizes the
            file cannot hold, non-finite voxel values, or bad affine.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CT file not found: {path}")
    data, affine = _read_nifti_arrays(path)
    return torch.from_numpy(data), torch.from_numpy(affine)


def volume_center(affine: Tensor, shape: tuple[int, int, int] | torch.Size) -> Tensor:
    """World position (mm) ``[3]`` of the centre of a volume of ``shape`` ``(I, J, K)`` voxels."""
    centre = torch.tensor([(n - 1) / 2.0 for n in shape] + [1.0], dtype=affine.dtype, device=affine.device)
    return (affine @ centre)[:3]


@dataclass(frozen=True)
class HUReport:
    """What :func:`check_hu` found.

    Attributes:
        padding_fraction: fraction of voxels at or below ``PADDING_THRESHOLD_HU`` (scanner padding, not anatomy).
        padding_value: the most common padding value (e.g. -2048 or -3024), or None without padding.
        offset_suspected: values look stored as HU + 1024 (no negative values, an air peak near 0 instead of -1000).
    """

    padding_fraction: float
    padding_value: float | None
    offset_suspected: bool

    @property
    def padding_suspected(self) -> bool:
        return self.padding_fraction > PADDING_MIN_FRACTION

    def messages(self, source: str) -> list[str]:
        """Human-readable findings, each naming ``source`` and the fix option."""
        found = []
        if self.padding_suspected:
            found.append(
                f"{source}: {100 * self.padding_fraction:.1f}% of voxels are scanner padding "
                f"(<= {PADDING_THRESHOLD_HU:g} HU, mostly {self.padding_value:g}); they would be rendered as negative "
                "attenuation. Load with fix_padding=True to set them to air (-1000 HU)."
            )
        if self.offset_suspected:
            found.append(
                f"{source}: values look stored with a +1024 offset (no negative values, air near 0 instead of "
                "-1000 HU). Load with fix_offset=True to subtract 1024."
            )
        return found


def check_hu(hu: Tensor) -> HUReport:
    """Looks for scanner padding and a +1024 storage offset in a CT.

    Args:
        hu: ``[I, J, K]`` values (HU if the file is right).

    Returns:
        An :class:`HUReport`. The offset test ignores padding voxels and flags data whose minimum is within 50 of 0
        and of which at least 1% is below 200: real HU data of a body always holds fat (about -100) or air (-1000).
    """
    values = hu.detach().reshape(-1).to(torch.float32)
    padding_mask = values <= PADDING_THRESHOLD_HU
    padding_count = int(padding_mask.sum())
    padding_value = float(torch.mode(values[padding_mask]).values) if padding_count else None
    rest = values[~padding_mask]
    offset_suspected = bool(
        rest.numel() > 0 and abs(float(rest.min())) <= 50.0 and float((rest < 200.0).to(torch.float32).mean()) >= 0.01
    )
    return HUReport(padding_count / max(values.numel(), 1), padding_value, offset_suspected)


def _as_vector3(value: float | Sequence[float] | np.ndarray | Tensor, name: str) -> np.ndarray:
    """A scalar or 3 numbers -> ``[3]`` float64, or a ValueError naming the argument."""
    array = np.asarray(value.cpu() if isinstance(value, Tensor) else value, dtype=np.float64).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, 3)
    if array.shape != (3,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be one or three finite numbers, got {value!r}")
    return array


class Volume:
    """A CT volume: ``data`` ``[I, J, K]`` float32 HU on any device, ``affine`` ``[4, 4]`` float64 voxel index ->
    world RAS+ mm.

    The affine always stays a CPU float64 tensor, whatever the data's device: it is 16 numbers used for geometry, where
    float64 matters and host access is free; move it with ``volume.affine.to(device)`` where a kernel needs it.
    """

    def __init__(self, data: Tensor, affine: Tensor | np.ndarray, source: str = "volume") -> None:
        """Wraps ``data`` ``[I, J, K]`` and ``affine`` ``[4, 4]`` after checking them (``source`` names them in errors).

        Raises:
            VolumeFormatError: data not 3D, or affine not a finite invertible ``[4, 4]`` with last row ``[0, 0, 0, 1]``.
        """
        if not isinstance(data, Tensor):
            raise TypeError(f"{source}: data must be a torch.Tensor, got {type(data).__name__}")
        if data.dim() != 3 or min(data.shape) < 1:
            raise VolumeFormatError(
                f"{source}: data must be a non-empty [I, J, K] volume, got shape {tuple(data.shape)}"
            )
        affine_array = affine.detach().cpu().numpy() if isinstance(affine, Tensor) else np.asarray(affine)
        self.data = data if data.dtype == torch.float32 else data.to(torch.float32)
        self.affine = torch.from_numpy(_validated_affine(affine_array, source).copy())
        self.source = source

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_array(
        cls,
        array: np.ndarray | Tensor,
        affine: np.ndarray | Tensor | None = None,
        spacing: float | Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
    ) -> Volume:
        """A volume from an ``[I, J, K]`` array and either an ``affine`` or ``spacing`` (mm) + ``origin`` (mm).

        ``spacing`` and ``origin`` give an axis-aligned RAS+ affine (voxel axes along +x, +y, +z, first voxel centre at
        ``origin``); they default to 1 mm and 0.

        Raises:
            ValueError: both an affine and spacing/origin given, or non-positive/non-finite spacing.
            VolumeFormatError: singular or non-finite affine, or data not 3D.
        """
        data = array if isinstance(array, Tensor) else torch.from_numpy(np.ascontiguousarray(array))
        if affine is not None:
            if spacing is not None or origin is not None:
                raise ValueError("from_array: give either affine or spacing/origin, not both")
            return cls(data.to(torch.float32), affine, source="from_array affine")
        spacing_mm = _as_vector3(1.0 if spacing is None else spacing, "spacing")
        if np.any(spacing_mm <= 0):
            raise ValueError(f"spacing must be positive (mm), got {spacing_mm.tolist()}")
        origin_mm = _as_vector3(0.0 if origin is None else origin, "origin")
        built = np.diag(list(spacing_mm) + [1.0])
        built[:3, 3] = origin_mm
        return cls(data.to(torch.float32), built, source="from_array")

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        series_uid: str | None = None,
        resample: bool = False,
        fix_padding: bool = False,
        fix_offset: bool = False,
        check: bool = True,
    ) -> Volume:
        """Reads a CT, picking the reader from the path, then checks (and optionally fixes) its HU values.

        Args:
            path: ``.nii``/``.nii.gz`` (NIfTI), ``.nrrd``/``.nhdr`` (NRRD), a folder (DICOM series), or another file
                (an enhanced multi-frame DICOM CT).
            series_uid: DICOM folder holding several series: which SeriesInstanceUID to read.
            resample: DICOM with irregular slices or gantry tilt: resample onto a regular grid instead of refusing.
            fix_padding: set scanner padding (<= -1500 HU) to air, -1000 HU.
            fix_offset: subtract 1024 from every value (data stored as HU + 1024); applied after ``fix_padding``.
            check: warn (``UserWarning``) about padding or offset problems that were not fixed.

        Raises:
            FileNotFoundError: no such path. VolumeFormatError: the file or folder cannot be read as a CT volume
                (damaged, inconsistent header, data the file cannot hold, or NaN/Inf voxel values); it names the file.
        """
        from .dicom import read_dicom_file, read_dicom_series
        from .nrrd import read_nrrd

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"CT file or folder not found: {path}")
        name = path.name.lower()
        if path.is_dir():
            data, affine = read_dicom_series(path, series_uid=series_uid, resample=resample)
        elif name.endswith((".nii", ".nii.gz")):
            data, affine = _read_nifti_arrays(path)
        elif name.endswith((".nrrd", ".nhdr")):
            data, affine = read_nrrd(path)
        else:
            data, affine = read_dicom_file(path, resample=resample)
        data = require_finite(np.ascontiguousarray(data, dtype=np.float32), path)
        volume = cls(torch.from_numpy(data), _validated_affine(affine, str(path), path), source=str(path))
        if fix_padding:
            volume = volume.with_padding_fixed()
        if fix_offset:
            volume = volume.with_offset_fixed()
        if check:
            for message in check_hu(volume.data).messages(str(path)):
                warnings.warn(message, UserWarning, stacklevel=2)
        return volume

    # ---- geometry -----------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(I, J, K)`` voxels."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """The data's device (the affine stays on the CPU)."""
        return self.data.device

    @property
    def spacing(self) -> Tensor:
        """``[3]`` float64 mm between voxel centres along i, j, k (norms of the affine's columns)."""
        return torch.linalg.vector_norm(self.affine[:3, :3], dim=0)

    @property
    def origin(self) -> Tensor:
        """``[3]`` float64 world mm of voxel (0, 0, 0)'s centre."""
        return self.affine[:3, 3].clone()

    @property
    def center(self) -> Tensor:
        """``[3]`` float64 world mm of the volume's centre."""
        return volume_center(self.affine, self.shape)

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Axis codes: the world direction each voxel axis points to, e.g. ``('L', 'A', 'S')`` (nibabel aff2axcodes)."""
        return tuple(nib.orientations.aff2axcodes(self.affine.numpy()))  # type: ignore[return-value]

    def voxel_to_world(self, indices: Tensor) -> Tensor:
        """``[..., 3]`` (fractional) voxel indices -> ``[..., 3]`` float64 world mm."""
        indices = indices.to(torch.float64).cpu()
        return indices @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, points: Tensor) -> Tensor:
        """``[..., 3]`` world mm -> ``[..., 3]`` float64 fractional voxel indices."""
        inverse = torch.linalg.inv(self.affine)
        return points.to(torch.float64).cpu() @ inverse[:3, :3].T + inverse[:3, 3]

    def to(self, device: torch.device | str) -> Volume:
        """A new Volume with the data on ``device`` (the affine stays a CPU float64 tensor)."""
        return Volume(self.data.to(device), self.affine, source=self.source)

    # ---- HU fixes -----------------------------------------------------------------------------------------------

    def with_padding_fixed(self) -> Volume:
        """A copy with scanner padding (<= -1500 HU) set to air (-1000 HU)."""
        data = torch.where(self.data <= PADDING_THRESHOLD_HU, torch.full_like(self.data, AIR_HU), self.data)
        return Volume(data, self.affine, source=self.source)

    def with_offset_fixed(self) -> Volume:
        """A copy with 1024 subtracted from every value (for data stored as HU + 1024)."""
        return Volume(self.data - OFFSET_HU, self.affine, source=self.source)

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing.tolist())
        codes = "".join(self.orientation)
        return f"Volume(shape={self.shape}, spacing=({spacing}) mm, orientation={codes}, device={self.device})"


def resample(volume: Volume, spacing_mm: float | Sequence[float]) -> Volume:
    """Trilinear resampling onto voxels of ``spacing_mm`` (one number or one per axis i, j, k) along the same axes.

    The new grid keeps the volume's centre and covers the same physical box (each axis' extent, ``count * spacing``
    from the outer voxel faces, is kept to the nearest whole new voxel); values between the old outermost voxel centres
    and the box edges repeat the border voxel.

    Returns:
        A new Volume with data ``[I', J', K']`` float32 on the same device and the matching affine.
    """
    new_spacing = _as_vector3(spacing_mm, "spacing_mm")
    if np.any(new_spacing <= 0):
        raise ValueError(f"spacing_mm must be positive, got {new_spacing.tolist()}")
    old_spacing = volume.spacing.numpy()
    old_counts = np.array(volume.shape, dtype=np.float64)
    new_counts = np.maximum(1, np.round(old_counts * old_spacing / new_spacing)).astype(int)
    scale = new_spacing / old_spacing  # old index units per new voxel
    # Old fractional index of new voxel q: centre_old + (q - centre_new) * scale, so both grids share their centre.
    offset = (old_counts - 1) / 2.0 - (new_counts - 1) / 2.0 * scale
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = offset
    new_affine = volume.affine.numpy() @ index_map

    device = volume.device
    axes = []
    for axis in range(3):
        old_index = torch.as_tensor(offset[axis], dtype=torch.float64) + torch.arange(
            int(new_counts[axis]), dtype=torch.float64
        ) * float(scale[axis])
        # grid_sample with align_corners=True: -1 and +1 are the first and last voxel centres.
        axes.append((2.0 * old_index / max(old_counts[axis] - 1, 1) - 1.0).to(torch.float32).to(device))
    grid_i, grid_j, grid_k = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([grid_k, grid_j, grid_i], dim=-1)[None]  # grid_sample wants (x, y, z) = (k, j, i)
    sampled = torch.nn.functional.grid_sample(
        volume.data[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True
    )
    return Volume(sampled[0, 0].contiguous(), new_affine, source=volume.source)


def crop(volume: Volume, box: Sequence[tuple[int, int]]) -> Volume:
    """The sub-volume ``data[i0:i1, j0:j1, k0:k1]`` for ``box = ((i0, i1), (j0, j1), (k0, k1))`` (half-open index
    ranges), with the affine's origin moved so every kept voxel keeps its world position.

    Raises:
        ValueError: a range that is empty or outside the volume.
    """
    if len(box) != 3:
        raise ValueError(f"box must hold three (start, stop) index ranges, got {box!r}")
    for axis, (start, stop) in enumerate(box):
        if not (0 <= start < stop <= volume.shape[axis]):
            raise ValueError(f"box range {(start, stop)} on axis {axis} is empty or outside 0..{volume.shape[axis]}")
    (i0, i1), (j0, j1), (k0, k1) = box
    new_affine = volume.affine.clone()
    new_affine[:3, 3] = volume.voxel_to_world(torch.tensor([i0, j0, k0]))
    return Volume(volume.data[i0:i1, j0:j1, k0:k1].contiguous(), new_affine, source=volume.source)
