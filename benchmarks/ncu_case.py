"""The renders profiled for benchmarks/NOTES.md's kernel table: chest CT, 1240 x 960, AP, b1.

Each of two passes runs the plain forward, then the forward that saves the pose Jacobian and its backward (the
reduction), so that ncu can skip the first pass:

    ncu --clock-control none --kernel-name regex:camera_ --launch-skip 3 --launch-count 3 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        --section LaunchStats --section SchedulerStats --section InstructionStats \\
        python benchmarks/ncu_case.py siddon        # or: trilinear (step 0.7 mm; its backward walks again),
                                                    # trilinear-quads (the same from trilinear_quads)

An optional second argument picks the volume's memory layout: the index axis stored contiguously, k (default, as
loaded), j or i (the same values, other strides).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from torchdrr.geometry import camera_ray_parameters, carm_extrinsics, intrinsic_matrix
from torchdrr.io import load_nifti, volume_center
from torchdrr.ops import camera_raycast, trilinear_quads, with_contiguous_axis
from torchdrr.render import hu_to_mu

CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"


def main(mode: str, layout: str = "k") -> None:
    if mode not in ("siddon", "trilinear", "trilinear-quads"):
        raise SystemExit(f"mode must be siddon, trilinear or trilinear-quads, got {mode!r}")
    if layout not in ("i", "j", "k"):
        raise SystemExit(f"layout must be i, j or k (the contiguous index axis), got {layout!r}")
    hu, affine = load_nifti(CT)
    mu = hu_to_mu(hu).cuda().float()
    mu = with_contiguous_axis(mu, "ijk".index(layout))
    isocenter = volume_center(affine, mu.shape).cuda()
    angles = torch.tensor([180.0], dtype=torch.float64, device="cuda")
    rotation, translation = carm_extrinsics(angles, torch.zeros_like(angles), 850.0, isocenter)
    intrinsics = intrinsic_matrix(1020.0, 960, 1240, (289.0 / 960, 373.0 / 1240)).cuda()
    sources, matrices = camera_ray_parameters(intrinsics, rotation, translation, 1020.0, dtype=torch.float32)
    sources = sources.requires_grad_()
    quads = trilinear_quads(mu) if mode == "trilinear-quads" else None
    mode, step = ("siddon", None) if mode == "siddon" else ("trilinear", 0.7)
    for _ in range(2):
        with torch.no_grad():
            camera_raycast(mu, affine, sources, matrices, 960, 1240, mode=mode, step=step, quads=quads)
        image = camera_raycast(mu, affine, sources, matrices, 960, 1240, mode=mode, step=step, quads=quads)
        torch.autograd.grad(image.sum(), sources)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(*sys.argv[1:3]) if len(sys.argv) > 1 else main("siddon")
