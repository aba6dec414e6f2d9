"""Memory budgets for rendering: how much a device can spare, and how to split a render to fit.

A render's memory grows with its number of rays (images x pixels x sub-rays). Part of it lives only while a group
of rays is processed (ray endpoints, per-material line integrals, per-energy-group terms): that part shrinks when the
rays are processed in chunks. The rest stays for the whole call (the output and, when gradients are needed, what
autograd saves for the backward pass): no split reduces it. ``plan_chunks`` picks the largest chunks whose memory
fits the budget, splitting first over images (each image whole: exposure control, scatter and display windowing look
at a whole image) and then over detector rows, or refuses with the numbers before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MemoryBudgetError

__all__ = ["AUTO_BUDGET_FRACTION", "RenderPlan", "available_bytes", "format_bytes", "plan_chunks"]

#: The automatic budget is this fraction of the memory the device can spare now (headroom for the allocator's
#: fragmentation, other processes and the caller's own tensors).
AUTO_BUDGET_FRACTION = 0.8


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: a byte count in binary units, three significant digits."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024.0 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024.0
    return f"{value:.3g} TiB"  # pragma: no cover - the loop returns


def available_bytes(device: torch.device | str) -> tuple[int, str]:
    """Memory the device can give a new allocation now, and where the number comes from.

    Args:
        device: a CUDA device (free memory from the driver plus what PyTorch's allocator holds unused) or the CPU
            (``MemAvailable`` of ``/proc/meminfo``; on systems without it, no limit is known).

    Returns:
        ``(bytes, description)``; ``bytes`` is ``sys.maxsize`` when nothing is known.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), f"free memory of {device} ({format_bytes(free)} + {format_bytes(cached)} cached)"
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                return available, f"available host memory ({format_bytes(available)})"
    import sys

    return sys.maxsize, f"unknown free memory of {device}"


@dataclass(frozen=True)
class RenderPlan:
    """How a render of ``images`` x ``height`` x ``width`` pixels is split.

    Attributes:
        images_per_chunk: images rendered together (all of them when the render is not split over images).
        rows_per_chunk: detector rows rendered together (``height`` unless single images are split into row bands).
        chunks: the number of pieces.
        estimated_bytes: estimated peak memory of the render as split (bytes).
        budget_bytes: the budget it was planned for (``sys.maxsize`` for none).
        budget_source: where the budget came from (for messages).
    """

    images: int
    height: int
    images_per_chunk: int
    rows_per_chunk: int
    chunks: int
    estimated_bytes: int
    budget_bytes: int
    budget_source: str

    @property
    def whole(self) -> bool:
        """The render runs as one piece."""
        return self.chunks == 1


def plan_chunks(
    images: int,
    height: int,
    rays_per_row: int,
    transient_bytes_per_ray: float,
    kept_bytes_per_ray: float,
    fixed_bytes: float,
    budget_bytes: int,
    budget_source: str,
    rows_allowed: str | None = None,
) -> RenderPlan:
    """The largest chunks of a render that fit ``budget_bytes``.

    Args:
        images: images in the render (B).
        height: detector rows (H).
        rays_per_row: rays per detector row (W x s^2).
        transient_bytes_per_ray: memory per ray that is freed when its chunk is done.
        kept_bytes_per_ray: memory per ray that stays until the call returns (output, saved tensors).
        fixed_bytes: memory the call allocates whatever the split (e.g. a material volume not yet cached).
        budget_bytes: the most the render may allocate.
        budget_source: where the budget came from, for the error message.
        rows_allowed: None if images may be split into row bands, else the reason they may not (for the message).

    Returns:
        The plan.

    Raises:
        MemoryBudgetError: even one image (or one detector row, where rows may be split) does not fit; the message
            gives the estimate, the budget and what to change.
    """
    rays_per_image = height * rays_per_row
    kept = kept_bytes_per_ray * images * rays_per_image + fixed_bytes

    def peak(rays_per_chunk: int) -> int:
        return int(math.ceil(kept + transient_bytes_per_ray * rays_per_chunk))

    whole = peak(images * rays_per_image)
    if whole <= budget_bytes:
        return RenderPlan(images, height, images, height, 1, whole, budget_bytes, budget_source)
    spare = budget_bytes - kept
    per_chunk = int(spare // transient_bytes_per_ray) if spare > 0 else 0
    if per_chunk >= rays_per_image:
        n = min(images, per_chunk // rays_per_image)
        return RenderPlan(
            images, height, n, height, math.ceil(images / n), peak(n * rays_per_image), budget_bytes, budget_source
        )
    if rows_allowed is None and per_chunk >= rays_per_row:
        rows = per_chunk // rays_per_row
        chunks = images * math.ceil(height / rows)
        return RenderPlan(images, height, 1, rows, chunks, peak(rows * rays_per_row), budget_bytes, budget_source)
    smallest = rays_per_image if rows_allowed is not None else rays_per_row
    what = "one image" if rows_allowed is not None else "one detector row"
    why = f" (an image cannot be split into row bands: {rows_allowed})" if rows_allowed is not None else ""
    raise MemoryBudgetError(
        f"this render of {images} image(s) of {height} rows x {rays_per_row} rays per row needs about "
        f"{format_bytes(peak(smallest))} even split into chunks of {what}{why}: {format_bytes(kept)} stay for the "
        f"whole call (output, tensors saved for gradients, volume) plus {format_bytes(transient_bytes_per_ray)} per "
        f"ray of the chunk. The memory budget is {format_bytes(budget_bytes)}, from {budget_source}. Render fewer "
        "images per call, a smaller detector or fewer sub-rays, render without gradients (torch.no_grad), or raise "
        "memory_budget_bytes.",
        needed_bytes=peak(smallest),
        budget_bytes=budget_bytes,
    )
