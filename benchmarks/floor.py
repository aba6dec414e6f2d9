"""The floor of the GPU-speed issue: voxel segments of the benchmark's Siddon renders (benchmarks/NOTES.md).

    python benchmarks/floor.py              # the chest CT (../shared), else the bundled CT

Counts, for the geometry of benchmarks/speed.py, the voxel segments every ray crosses (one more than the planes it
crosses inside the volume, from the exact clip of each ray), and the instruction floor at an assumed 12 instructions
a segment on one H100 (132 SMs x 4 schedulers x 1.98 GHz, one warp instruction per scheduler and cycle).
"""

from __future__ import annotations

from pathlib import Path

import torch

from torchdrr.geometry import camera_ray_parameters, carm_extrinsics, intrinsic_matrix
from torchdrr.io import bundled_ct_path, load_nifti, volume_center
from torchdrr.ops import camera_pixel_grid

FULL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"
INSTRUCTIONS_PER_SEGMENT = 12
WARP_INSTRUCTIONS_PER_S = 132 * 4 * 1.98e9


def segments(affine: torch.Tensor, shape: torch.Size, batch: int, height: int, width: int) -> tuple[int, float]:
    """Rays and voxel segments of a batch of AP poses spread over +-15 degrees (float64, on the CPU)."""
    primary = torch.tensor([180.0]) if batch == 1 else 180 + torch.linspace(-15, 15, batch)
    primary = primary.double()
    rotation, translation = carm_extrinsics(primary, torch.zeros_like(primary), 850.0, volume_center(affine, shape))
    intrinsics = intrinsic_matrix(1020.0, height, width, (289.0 / height, 373.0 / width))
    sources, matrices = camera_ray_parameters(intrinsics, rotation, translation, 1020.0)
    pixels = camera_pixel_grid(height, width)
    world_to_index = torch.linalg.inv(affine.double())
    size = torch.tensor(shape, dtype=torch.float64)
    total = 0.0
    for b in range(batch):
        s = world_to_index[:3, :3] @ sources[b] + world_to_index[:3, 3]
        t = (sources[b] + pixels @ matrices[b].T) @ world_to_index[:3, :3].T + world_to_index[:3, 3]
        d = t - s
        a_lo, a_hi = (-0.5 - s) / d, (size - 0.5 - s) / d
        a_min = torch.minimum(a_lo, a_hi).amax(-1).clamp(min=0)
        a_max = torch.maximum(a_lo, a_hi).amin(-1).clamp(max=1)
        entry, exit_ = s + a_min[:, None] * d, s + a_max[:, None] * d
        crossings = ((exit_ + 0.5).floor() - (entry + 0.5).floor()).abs().sum(-1)
        total += float(torch.where(a_min < a_max, crossings + 1, torch.zeros_like(crossings)).sum())
    return batch * pixels.shape[0], total


def main() -> None:
    hu, affine = load_nifti(FULL_CT if FULL_CT.exists() else bundled_ct_path())
    print(f"CT {tuple(hu.shape)}; floor at {INSTRUCTIONS_PER_SEGMENT} instructions a segment on one H100")
    for batch, height, width in ((1, 960, 1240), (8, 960, 1240), (64, 200, 200)):
        rays, total = segments(affine, hu.shape, batch, height, width)
        floor_ms = total * INSTRUCTIONS_PER_SEGMENT / 32 / WARP_INSTRUCTIONS_PER_S * 1e3
        print(f"  {height}x{width} b{batch}: {rays:,} rays, {total / 1e6:,.1f} M segments "
              f"({total / rays:.0f} a ray), floor {floor_ms:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
