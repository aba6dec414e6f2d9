"""A small CUDA forward + backward of both modes, multi-channel and with rays starting inside and missing the
volume, to run under `compute-sanitizer --tool memcheck` (out-of-bounds reads and writes, uninitialised memory).

Not collected by pytest; benchmarks/gpu_session.sh runs it on the lent GPU.
"""

import torch

import torchdrr

from .geometry_cases import AFFINES, random_rays


def main() -> None:
    affine = AFFINES["rotated"]
    for channels in (1, 3, 11):
        volume = torch.rand((channels, 9, 7, 5), device="cuda", requires_grad=True)
        sources, targets = random_rays(affine, (9, 7, 5), 1000, seed=channels)
        sources = sources.float().cuda().requires_grad_()
        targets = targets.float().cuda().requires_grad_()
        for mode in ("siddon", "trilinear"):
            out = torchdrr.raycast(volume, affine, sources, targets, mode=mode)
            out.square().sum().backward()
    torch.cuda.synchronize()
    print("sanitize case done:", float(volume.grad.abs().sum()), float(sources.grad.abs().sum()))


if __name__ == "__main__":
    main()
