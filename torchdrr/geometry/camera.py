"""Pinhole X-ray camera: intrinsics and the rays through detector pixels.

Conventions (design.md §3): OpenCV pinhole at the X-ray source; camera x grows with the detector column, y with the
row, z points from the source toward the detector. ``K = [[fu, 0, cu], [0, fv, cv], [0, 0, 1]]`` with
``|fu| = SDD / column pitch`` and ``|fv| = SDD / row pitch``; pixel (row r, column c) has its centre at
``(u, v) = (c, r)``. Images are shown as seen from the detector looking toward the source, which mirrors the camera
image; the mirror is put in K as a negative ``fu`` so that ``P = K [R | t]`` projects a 3D point onto the pixel
where the DRR shows it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .._extension import call_op
from ..ops.pose_ray_parameters import pose_kernels_available
from .carm import carm_extrinsics
from .projection import decompose_projection, project_points, projection_matrix

__all__ = ["Camera", "bin_intrinsics", "camera_ray_parameters", "crop_intrinsics", "intrinsic_matrix", "pixel_rays"]


def intrinsic_matrix(
    sdd_mm: float,
    height: int,
    width: int,
    pixel_spacing_mm: tuple[float, float],
    mirror: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The ``[3, 3]`` intrinsic matrix of a centred flat detector.

    Args:
        sdd_mm: source-to-detector distance in mm (> 0).
        height: detector rows (> 0).
        width: detector columns (> 0).
        pixel_spacing_mm: (row pitch, column pitch) in mm (> 0).
        mirror: show the image as seen from the detector (a C-arm monitor's view): ``fu < 0``.
        dtype: floating dtype of the result.

    Returns:
        ``K`` with principal point at the detector centre, ``((width - 1) / 2, (height - 1) / 2)``.
    """
    if not (sdd_mm > 0) or not math.isfinite(sdd_mm):
        raise ValueError(f"sdd_mm must be > 0 mm (a source on the detector plane casts no rays), got {sdd_mm}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be >= 1 pixel, got {height} x {width}")
    row_pitch, col_pitch = pixel_spacing_mm
    if not (row_pitch > 0 and col_pitch > 0) or not (math.isfinite(row_pitch) and math.isfinite(col_pitch)):
        raise ValueError(f"pixel_spacing_mm must be two positive pitches in mm, got {pixel_spacing_mm}")
    fu = sdd_mm / col_pitch * (-1.0 if mirror else 1.0)
    fv = sdd_mm / row_pitch
    return torch.tensor([[fu, 0.0, (width - 1) / 2.0], [0.0, fv, (height - 1) / 2.0], [0.0, 0.0, 1.0]], dtype=dtype)


def _batched_extrinsics(rotation: Tensor, translation: Tensor, sdd_mm: float) -> tuple[Tensor, Tensor]:
    """``R`` ``[B, 3, 3]`` and ``t`` ``[B, 3]`` from batched or single extrinsics, with the SDD checked."""
    rotation = rotation if rotation.dim() == 3 else rotation.unsqueeze(0)
    translation = translation if translation.dim() == 2 else translation.unsqueeze(0)
    if rotation.shape[-2:] != (3, 3) or translation.shape[-1] != 3 or rotation.shape[0] != translation.shape[0]:
        raise ValueError(
            f"rotation must be [B, 3, 3] and translation [B, 3] with one B, got {tuple(rotation.shape)} and "
            f"{tuple(translation.shape)}"
        )
    if not (float(sdd_mm) > 0) or not math.isfinite(float(sdd_mm)):
        raise ValueError(
            f"sdd_mm must be a positive distance in mm (a source on the detector plane casts no rays), got {sdd_mm}"
        )
    return rotation, translation


def pixel_rays(
    intrinsics: Tensor,
    rotation: Tensor,
    translation: Tensor,
    height: int,
    width: int,
    sdd_mm: float,
    supersample: int = 1,
) -> tuple[Tensor, Tensor]:
    """Source points and per-pixel detector points, in world mm, for a batch of poses.

    Args:
        intrinsics: ``[3, 3]`` or ``[B, 3, 3]`` K (see module docstring).
        rotation: ``[B, 3, 3]`` or ``[3, 3]`` world -> camera rotation R.
        translation: ``[B, 3]`` or ``[3]`` world -> camera translation t (mm).
        height: detector rows.
        width: detector columns.
        sdd_mm: source-to-detector distance (mm): the depth of the detector plane in the camera frame.
        supersample: ``s`` >= 1 rays per pixel along each axis, through the centres of an ``s x s`` grid of
            sub-pixels (offsets ``(k + 1/2) / s - 1/2`` pixel); 1 is one ray through each pixel centre.

    Returns:
        ``sources`` ``[B, 1, 3]`` (the X-ray source, ``-R^T t``) and ``targets`` ``[B, height * width * s * s, 3]``
        on the detector, ordered row, column, sub-row, sub-column (so ``reshape(B, H, W, s * s, 3)`` groups the
        sub-rays of each pixel), in the dtype and device of ``rotation``. Differentiable with respect to all tensor
        inputs.
    """
    rotation, translation = _batched_extrinsics(rotation, translation, sdd_mm)
    if isinstance(supersample, bool) or int(supersample) != supersample or supersample < 1:
        raise ValueError(f"supersample must be a whole number >= 1, got {supersample!r}")
    dtype, device = rotation.dtype, rotation.device
    offsets = (torch.arange(supersample, dtype=dtype, device=device) + 0.5) / supersample - 0.5
    rows = (torch.arange(height, dtype=dtype, device=device)[:, None] + offsets).reshape(-1)  # [H * s]
    cols = (torch.arange(width, dtype=dtype, device=device)[:, None] + offsets).reshape(-1)  # [W * s]
    v, u = torch.meshgrid(rows, cols, indexing="ij")  # [H * s, W * s]
    # Order row, column, sub-row, sub-column: [H, s, W, s] -> [H, W, s, s].
    u = u.reshape(height, supersample, width, supersample).permute(0, 2, 1, 3).reshape(-1)
    v = v.reshape(height, supersample, width, supersample).permute(0, 2, 1, 3).reshape(-1)
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H*W*s*s, 3] homogeneous (u, v, 1)
    # inv_ex: no error check, which would make the host wait for the device (K is checked where it is built).
    k_inv = torch.linalg.inv_ex(intrinsics.to(dtype=dtype, device=device))[0]
    # Points on the detector plane z = SDD in camera coordinates: SDD * K^-1 (u, v, 1).
    camera_points = sdd_mm * (pixels @ k_inv.transpose(-1, -2))
    if camera_points.dim() == 2:
        camera_points = camera_points.unsqueeze(0)
    # world = R^T (p_cam - t), as row vectors: (p_cam - t) R.
    targets = (camera_points - translation.unsqueeze(1)) @ rotation
    sources = (-translation.unsqueeze(1)) @ rotation
    return sources, targets


def camera_ray_parameters(
    intrinsics: Tensor, rotation: Tensor, translation: Tensor, sdd_mm: float, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """The source positions and pixel-to-ray matrices that ``torchdrr.ops.camera_raycast`` takes.

    The ray of the pixel centre at image coordinates ``(u, v)`` runs from ``sources[b]`` to
    ``sources[b] + ray_matrices[b] @ (u, v, 1)``, its point on the detector plane: the same rays as
    :func:`pixel_rays`, without making them.

    Args:
        intrinsics: ``[3, 3]`` or ``[B, 3, 3]`` K, upper triangular as every pinhole K is (only its upper
            triangle is read).
        rotation: ``[B, 3, 3]`` or ``[3, 3]`` world -> camera rotation R.
        translation: ``[B, 3]`` or ``[3]`` world -> camera translation t (mm).
        sdd_mm: source-to-detector distance (mm).
        dtype: float32 or float64 dtype of the outputs (default: ``rotation``'s); the computation runs in
            ``rotation``'s dtype either way, so float64 poses give float32 rays without a separate cast.

    Returns:
        ``sources`` ``[B, 3]`` (``-R^T t``, mm) and ``ray_matrices`` ``[B, 3, 3]`` (``SDD * R^T K^-1``, mm per
        pixel), in ``dtype`` on the device of ``rotation``; differentiable with respect to all tensor inputs. For
        float32/float64 poses on the CPU or a GPU this is one ``torch.ops.torchdrr.pose_ray_parameters`` launch
        forward and one backward; when ``intrinsics`` or a tensor ``sdd_mm`` requires a gradient (which the op does
        not give) the composite tensor-op path runs instead.
    """
    rotation, translation = _batched_extrinsics(rotation, translation, sdd_mm)
    out_dtype = rotation.dtype if dtype is None else dtype
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if translation.dtype != rotation.dtype:
        raise TypeError(f"translation must have the rotation's dtype {rotation.dtype}, got {translation.dtype}")
    intrinsics = intrinsics.to(dtype=rotation.dtype, device=rotation.device)
    batch = rotation.shape[0]
    if intrinsics.dim() == 3 and intrinsics.shape[0] == 1 and batch != 1:
        intrinsics = intrinsics.reshape(3, 3)  # one K shared by the batch, as broadcasting would
    if (
        intrinsics.shape[-2:] != (3, 3)
        or intrinsics.dim() not in (2, 3)
        or (intrinsics.dim() == 3 and intrinsics.shape[0] != batch)
    ):
        raise ValueError(
            f"intrinsics must be [3, 3] or [B, 3, 3] with the rotation's B = {batch}, got {tuple(intrinsics.shape)}"
        )
    sdd_needs_grad = isinstance(sdd_mm, Tensor) and sdd_mm.requires_grad
    if (
        rotation.dtype in (torch.float32, torch.float64)
        and not intrinsics.requires_grad
        and not sdd_needs_grad
        and pose_kernels_available(rotation.device)
    ):
        return call_op(torch.ops.torchdrr.pose_ray_parameters, intrinsics, rotation, translation, float(sdd_mm),
                       out_dtype)  # fmt: skip
    # The composite path: K (or a tensor SDD) gets a gradient here, and it runs on devices and dtypes the op has no
    # kernel for. K is upper triangular (a pinhole: design.md §3), so K^-1 is one triangular solve.
    eye = torch.eye(3, dtype=rotation.dtype, device=rotation.device)
    k_inv = torch.linalg.solve_triangular(intrinsics, eye.expand_as(intrinsics), upper=True)
    rotation_t = rotation.transpose(-1, -2)
    sources = -(rotation_t @ translation.unsqueeze(-1)).squeeze(-1)
    return sources.to(out_dtype), (sdd_mm * (rotation_t @ k_inv)).to(out_dtype)


def crop_intrinsics(intrinsics: Tensor, top: int, left: int) -> Tensor:
    """K of a detector crop whose pixel (0, 0) is pixel (top, left) of the full detector.

    With the cropped K, ``pixel_rays(K_crop, R, t, h, w, sdd)`` gives exactly the rays of rows ``top .. top + h - 1``
    and columns ``left .. left + w - 1`` of the full detector. ``intrinsics``: ``[..., 3, 3]``.
    """
    cropped = intrinsics.clone()
    cropped[..., 0, 2] = intrinsics[..., 0, 2] - left
    cropped[..., 1, 2] = intrinsics[..., 1, 2] - top
    return cropped


def bin_intrinsics(intrinsics: Tensor, factor: int) -> Tensor:
    """K of the same detector read out in ``factor x factor`` bins (coarse-to-fine registration).

    Binned pixel (r, c) covers full pixels ``factor * r .. factor * r + factor - 1`` (same for columns), so its centre
    is the centre of that block: ``u_full = factor * u + (factor - 1) / 2``. The binned detector has
    ``height // factor`` rows and ``width // factor`` columns (a remainder at the far edges is dropped).
    ``intrinsics``: ``[..., 3, 3]``.
    """
    if isinstance(factor, bool) or int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a whole number >= 1, got {factor!r}")
    binned = intrinsics.clone()
    binned[..., :2, :] = intrinsics[..., :2, :] / factor
    binned[..., :2, 2] = (intrinsics[..., :2, 2] - (factor - 1) / 2.0) / factor
    return binned


#: Host copies of K's focal lengths, so that reading a GPU camera's pixel pitch (every scatter-CNN render does) copies
#: K to the host, and waits for the GPU, once per intrinsics tensor rather than on every call. An entry is valid while
#: its tensor is alive (weak reference) and unchanged in place (version counter).
_HOST_FOCAL_LENGTHS: dict[int, tuple[weakref.ref, int, tuple[float, float]]] = {}


def _host_focal_lengths(intrinsics: Tensor) -> tuple[float, float]:
    """``(|fv|, |fu|)`` of ``intrinsics`` ``[3, 3]`` (pixels), from the host cache or read once from the device."""
    k = intrinsics.detach()
    if k.is_inference():  # no version counter to tell an in-place change: read it every time
        k = k.to("cpu", torch.float64)
        return (abs(float(k[1, 1])), abs(float(k[0, 0])))
    key = id(intrinsics)
    hit = _HOST_FOCAL_LENGTHS.get(key)
    if hit is not None and hit[0]() is intrinsics and hit[1] == intrinsics._version:
        return hit[2]
    k = k.to("cpu", torch.float64)
    focal = (abs(float(k[1, 1])), abs(float(k[0, 0])))
    if len(_HOST_FOCAL_LENGTHS) > 64:  # drop the entries whose tensors are gone
        for stale in [k for k, v in _HOST_FOCAL_LENGTHS.items() if v[0]() is None]:
            del _HOST_FOCAL_LENGTHS[stale]
    _HOST_FOCAL_LENGTHS[key] = (weakref.ref(intrinsics), intrinsics._version, focal)
    return focal


@dataclass(frozen=True)
class Camera:
    """A batch of X-ray cameras that share one flat detector (design.md §3).

    Attributes:
        intrinsics: ``[3, 3]`` K (float64).
        rotation: ``[B, 3, 3]`` world -> camera rotations R.
        translation: ``[B, 3]`` world -> camera translations t (mm).
        height: detector rows.
        width: detector columns.
        sdd_mm: source-to-detector distance (mm); the rays end on the detector plane at this depth.

    The tensors are differentiable: build R and t from any pose parameterisation (``pose_to_extrinsics``) or from
    C-arm angles, and gradients of a DRR reach them.
    """

    intrinsics: Tensor
    rotation: Tensor
    translation: Tensor
    height: int
    width: int
    sdd_mm: float

    def __post_init__(self) -> None:
        if self.rotation.dim() == 2:
            object.__setattr__(self, "rotation", self.rotation.unsqueeze(0))
        if self.translation.dim() == 1:
            object.__setattr__(self, "translation", self.translation.unsqueeze(0))
        if tuple(self.intrinsics.shape) != (3, 3):
            raise ValueError(f"intrinsics must be [3, 3], got {tuple(self.intrinsics.shape)}")
        if self.rotation.shape[-2:] != (3, 3) or self.translation.shape[-1:] != (3,):
            raise ValueError(
                f"rotation must be [B, 3, 3] and translation [B, 3], got {tuple(self.rotation.shape)} and "
                f"{tuple(self.translation.shape)}"
            )
        if self.rotation.shape[0] != self.translation.shape[0]:
            raise ValueError(f"rotation and translation must have one batch size, got {self.rotation.shape[0]} and "
                             f"{self.translation.shape[0]}")  # fmt: skip
        if int(self.height) < 1 or int(self.width) < 1:
            raise ValueError(f"height and width must be >= 1 pixel, got {self.height} x {self.width}")
        if not (float(self.sdd_mm) > 0) or not math.isfinite(float(self.sdd_mm)):
            raise ValueError(f"sdd_mm must be a positive distance in mm, got {self.sdd_mm}")

    @classmethod
    def from_carm(
        cls,
        primary_deg: Tensor | float,
        secondary_deg: Tensor | float,
        isocenter: Tensor,
        *,
        sod_mm: float = 850.0,
        sdd_mm: float = 1020.0,
        height: int = 960,
        width: int = 1240,
        pixel_spacing_mm: tuple[float, float] = (0.301, 0.301),
        inplane_deg: Tensor | float = 0.0,
    ) -> Camera:
        """Cameras of a C-arm at ``[B]`` (or scalar) angles in degrees about ``isocenter`` ``[3]`` (mm); the
        defaults are the DeepDRR/peers.md geometry (1240 x 960 detector of 0.301 mm pixels, SDD 1020, SOD 850)."""
        rotation, translation = carm_extrinsics(primary_deg, secondary_deg, sod_mm, isocenter, inplane_deg)
        intrinsics = intrinsic_matrix(sdd_mm, height, width, pixel_spacing_mm).to(isocenter.device)
        return cls(intrinsics, rotation, translation, height, width, sdd_mm)

    @classmethod
    def from_projection_matrix(
        cls, projection: Tensor, height: int, width: int, sdd_mm: float, reference_point: Tensor | None = None
    ) -> Camera:
        """Cameras from ``[3, 4]`` or ``[B, 3, 4]`` projection matrices P (any scale), decomposed with
        ``decompose_projection`` (``reference_point``: a world point in front of the cameras, e.g. the isocenter,
        which fixes the sign of P's scale). The batch must share one K."""
        projection = projection if projection.dim() == 3 else projection.unsqueeze(0)
        intrinsics, rotation, translation = decompose_projection(projection, reference_point)
        if not torch.allclose(intrinsics, intrinsics[:1].expand_as(intrinsics), rtol=1e-9, atol=1e-9):
            raise ValueError("projection matrices in one Camera must share their intrinsics")
        return cls(intrinsics[0], rotation, translation, height, width, sdd_mm)

    @property
    def batch_size(self) -> int:
        return self.rotation.shape[0]

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """The detector's pixel pitch ``(row, column)`` in mm, from K and the SDD (``fv = SDD / row pitch``,
        ``|fu| = SDD / column pitch``). K is read from its device once per tensor (and again after an in-place
        change), so a GPU camera does not wait for the GPU on every call."""
        fv, fu = _host_focal_lengths(self.intrinsics)
        return (float(self.sdd_mm) / fv, float(self.sdd_mm) / fu)

    def projection_matrix(self) -> Tensor:
        """``[B, 3, 4]`` P = K [R | t]."""
        return projection_matrix(self.intrinsics.to(self.rotation), self.rotation, self.translation)

    def rays(self, supersample: int = 1) -> tuple[Tensor, Tensor]:
        """``sources`` ``[B, 1, 3]`` and ``targets`` ``[B, H * W * s * s, 3]`` (world mm); see :func:`pixel_rays`."""
        return pixel_rays(
            self.intrinsics, self.rotation, self.translation, self.height, self.width, self.sdd_mm, supersample
        )

    def ray_parameters(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``sources`` ``[B, 3]`` and ``ray_matrices`` ``[B, 3, 3]`` for ``torchdrr.ops.camera_raycast``, in ``dtype``
        (default: the rotation's); see :func:`camera_ray_parameters`."""
        return camera_ray_parameters(self.intrinsics, self.rotation, self.translation, self.sdd_mm, dtype=dtype)

    def project(self, points: Tensor) -> Tensor:
        """Pixel coordinates ``(u, v)`` = (column, row) ``[B, N, 2]`` of world points ``[N, 3]`` or ``[B, N, 3]``
        (mm), where the DRR shows them."""
        return project_points(self.projection_matrix(), points.to(self.rotation))

    def __getitem__(self, index: int | slice) -> Camera:
        """The cameras ``index`` of the batch (an int keeps a batch of one): ``camera[2:4]`` is a batch of two."""
        if isinstance(index, bool) or not isinstance(index, (int, slice)):
            raise TypeError(f"a Camera is indexed by an int or a slice of its batch, got {index!r}")
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"camera {index} out of range for a batch of {self.batch_size}")
            index = slice(index, index + 1 if index != -1 else None)
        rotation, translation = self.rotation[index], self.translation[index]
        if rotation.shape[0] == 0:
            raise IndexError(f"{index} selects no camera of a batch of {self.batch_size}")
        return replace(self, rotation=rotation, translation=translation)

    def crop(self, top: int, left: int, height: int, width: int) -> Camera:
        """The cameras of the detector region rows ``top .. top + height - 1``, columns ``left .. left + width - 1``."""
        if top < 0 or left < 0 or top + height > self.height or left + width > self.width:
            raise ValueError(f"crop ({top}, {left}, {height}, {width}) lies outside the {self.height} x {self.width} "
                             "detector")  # fmt: skip
        return replace(self, intrinsics=crop_intrinsics(self.intrinsics, top, left), height=height, width=width)

    def binned(self, factor: int) -> Camera:
        """The same cameras read out in ``factor x factor`` bins (``height // factor`` x ``width // factor``)."""
        return replace(
            self,
            intrinsics=bin_intrinsics(self.intrinsics, factor),
            height=self.height // factor,
            width=self.width // factor,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Camera:
        """The cameras with R and t (and K) moved to ``device`` and/or cast to ``dtype``."""
        return replace(
            self,
            intrinsics=self.intrinsics.to(device=device),
            rotation=self.rotation.to(device=device, dtype=dtype),
            translation=self.translation.to(device=device, dtype=dtype),
        )
