"""A small CUDA forward + backward of both raycast modes, multi-channel and with rays starting inside and missing the
volume, and of log_weighted_transmission with its tables in shared memory and in global memory (ray counts that are
not a multiple of the block size), to run under `compute-sanitizer --tool memcheck` (out-of-bounds reads and writes,
uninitialised memory). The spectral part is also worth a `--tool racecheck` / `--tool synccheck` run (shared-memory
staging).

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
    for bins in (40, 4000):  # (M + Q) * E * 4 bytes: 1.6 KB in shared memory, 160 KB read from global memory
        thickness = (4 * torch.rand((1000, 8), device="cuda")).requires_grad_()
        attenuation = torch.rand((8, bins), device="cuda") / 10
        weights = torch.rand((2, bins), device="cuda").requires_grad_()
        starts = [0, bins // 4, bins // 4, bins - 3]
        out = torchdrr.ops.log_weighted_transmission(thickness, attenuation, weights, starts)
        torch.where(torch.isfinite(out), out, 0).sum().backward()
    torch.cuda.synchronize()
    print("sanitize case done:", float(volume.grad.abs().sum()), float(sources.grad.abs().sum()))
    print("spectral done:", float(thickness.grad.abs().sum()), float(weights.grad.abs().sum()))


if __name__ == "__main__":
    main()
