"""Tuning timings of the camera op on one GPU (benchmarks/NOTES.md, issue 12); the official table is speed.py.

    python benchmarks/camera_tuning.py                 # the kernel alone vs the full render, and the per-ray path
    TORCHDRR_WARP_TILE_WIDTH=1 python benchmarks/camera_tuning.py --tiles-only

"kernel-only" times ``camera_raycast`` with the ray parameters computed once; "full" adds them from the C-arm angles
(what speed.py times); "per-ray path" is ``torchdrr.raycast`` along ``pixel_rays``. Chest CT, geometry of speed.py,
CUDA events, median of 30 after 5 warm-ups. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

import torchdrr
from torchdrr.geometry import camera_ray_parameters, carm_extrinsics, intrinsic_matrix, pixel_rays
from torchdrr.io import load_nifti, volume_center
from torchdrr.ops import camera_raycast
from torchdrr.render import hu_to_mu

FULL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"


def median_ms(fn, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles-only", action="store_true", help="only the cases that depend on the warp tiles")
    args = parser.parse_args()
    hu, affine = load_nifti(FULL_CT)
    mu = hu_to_mu(hu).cuda().float()
    isocenter = volume_center(affine, mu.shape).cuda()

    def pose(batch: int, height: int, width: int):
        primary = 180 + (torch.zeros(1) if batch == 1 else torch.linspace(-15, 15, batch))
        primary = primary.double().cuda()
        intrinsics = intrinsic_matrix(1020.0, height, width, (289.0 / height, 373.0 / width)).cuda()
        return primary, intrinsics

    def kernel_only(batch: int, height: int, width: int):
        primary, intrinsics = pose(batch, height, width)
        rotation, translation = carm_extrinsics(primary, torch.zeros_like(primary), 850.0, isocenter)
        sources, matrices = (x.float() for x in camera_ray_parameters(intrinsics, rotation, translation, 1020.0))
        return lambda: camera_raycast(mu, affine, sources, matrices, height, width)

    def full(batch: int, height: int, width: int, grad: str | None = None):
        primary, intrinsics = pose(batch, height, width)

        def once():
            angles, centre = (
                primary.clone().requires_grad_(grad == "pose"),
                isocenter.clone().requires_grad_(grad == "pose"),
            )
            rotation, translation = carm_extrinsics(angles, torch.zeros_like(angles), 850.0, centre)
            sources, matrices = camera_ray_parameters(intrinsics, rotation, translation, 1020.0)
            image = camera_raycast(mu, affine, sources.float(), matrices.float(), height, width)
            if grad == "pose":
                torch.autograd.grad(image.sum(), (angles, centre))

        return once

    def per_ray(height: int, width: int):
        primary, intrinsics = pose(1, height, width)
        rotation, translation = carm_extrinsics(primary, torch.zeros_like(primary), 850.0, isocenter)

        def once():
            sources, targets = pixel_rays(intrinsics, rotation, translation, height, width, 1020.0)
            return torchdrr.raycast(mu, affine, sources.float(), targets.float())

        return once

    rows = {"warp tile width": os.environ.get("TORCHDRR_WARP_TILE_WIDTH", "default")}
    rows["b1 1240x960 fwd kernel-only ms"] = median_ms(kernel_only(1, 960, 1240))
    rows["b1 1240x960 fwd full ms"] = median_ms(full(1, 960, 1240))
    rows["b64 200x200 kernel-only DRR/s"] = 64e3 / median_ms(kernel_only(64, 200, 200))
    rows["b8 1240x960 fwd kernel-only ms"] = median_ms(kernel_only(8, 960, 1240))
    if not args.tiles_only:
        rows["b1 1240x960 per-ray path ms"] = median_ms(per_ray(960, 1240))
        rows["b1 1240x960 fwd+bwd pose full ms"] = median_ms(full(1, 960, 1240, grad="pose"))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows.items()}))


if __name__ == "__main__":
    main()
