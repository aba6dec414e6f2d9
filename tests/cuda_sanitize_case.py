"""A small CUDA forward + backward of both raycast modes, multi-channel and with rays starting inside and missing the
volume; the packed channels-last forward (4 and 8 channels); log_weighted_transmission with its tables in shared
memory and in global memory (ray counts that are not a multiple of the block size), with one weight table or one per
image; a full-physics DRR with its backward; the camera op's pose Jacobian route and its trilinear walk (also from
voxel quads). Run under `compute-sanitizer --tool memcheck` (out-of-bounds reads and writes, uninitialised memory);
the spectral part is also worth `--tool racecheck` / `--tool synccheck` (shared-memory staging).

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
    # Packed channels-last volumes (4 and 8 channels) take the vector-load path of the forward.
    for channels in (4, 8):
        packed = torch.rand((9, 7, 5, channels), device="cuda").permute(3, 0, 1, 2)
        torchdrr.raycast(packed, affine, sources.detach(), targets.detach())
    hu = torch.empty((9, 7, 5), device="cuda").uniform_(-1000.0, 1500.0)
    drr = torchdrr.DRR(hu, affine, noise=torchdrr.physics.Noise("gaussian", 1.0), photons_per_pixel=100.0).to("cuda")
    angle = torch.tensor([20.0], device="cuda", dtype=torch.float64, requires_grad=True)
    camera = torchdrr.Camera.from_carm(angle, 0.0, torch.zeros(3, device="cuda", dtype=torch.float64), sod_mm=60.0,
                                       sdd_mm=120.0, height=7, width=9, pixel_spacing_mm=(4.0, 4.0))  # fmt: skip
    drr(camera, generator=torch.Generator("cuda").manual_seed(0)).sum().backward()
    # The camera op's pose Jacobian route (saved per-ray Jacobian, reduced without a second walk), with a channel
    # count that takes the chunk loop (11 = 4 + 4 + 3), sub-pixels, a camera whose outer rays miss the volume and one
    # whose source is inside it.
    centre = (affine @ torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))[:3].cuda()
    cameras = [
        torchdrr.Camera.from_carm(primary, 10.0, centre, sod_mm=sod, sdd_mm=2 * sod + 20, height=7, width=9,
                                  pixel_spacing_mm=(4.0, 4.0))
        for primary, sod in ((20.0, 40.0), (-65.0, 1.0))
    ]  # fmt: skip
    pose_sources, pose_matrices = (
        torch.cat(parts).float().requires_grad_() for parts in zip(*(c.ray_parameters() for c in cameras), strict=True)
    )
    pose_volume = torch.rand((11, 9, 7, 5), device="cuda", requires_grad=True)
    pose_out = torchdrr.ops.camera_raycast(pose_volume, affine, pose_sources, pose_matrices, 7, 9, supersample=2)
    pose_out.square().sum().backward()
    # The camera op's trilinear walk, whose samples inside the grid skip the clamps: 1 channel (the neighbour along k
    # is the next element), 3 channels-last (a general stride) and 4 channels-last (packed), with the cameras above
    # (rays that start inside the volume and rays that miss it).
    for channels in (1, 3, 4):
        trilinear_volume = torch.rand((16, 14, 12, channels), device="cuda").permute(3, 0, 1, 2)
        if channels == 1:
            trilinear_volume = trilinear_volume.contiguous()
        torchdrr.ops.camera_raycast(
            trilinear_volume, affine, pose_sources.detach(), pose_matrices.detach(), 7, 9, mode="trilinear",
            supersample=2,
        )  # fmt: skip
    # The trilinear walk reading voxel quads (two 16-byte loads a sample) in every layout, with the cameras above.
    for axis in range(3):
        quad_volume = torchdrr.ops.with_contiguous_axis(torch.rand((16, 14, 12), device="cuda"), axis)
        torchdrr.ops.camera_raycast(
            quad_volume, affine, pose_sources.detach(), pose_matrices.detach(), 7, 9, mode="trilinear",
            supersample=2, quads=torchdrr.ops.trilinear_quads(quad_volume),
        )  # fmt: skip
    # The camera op's no-grad Siddon forward (the visit-first walk, which ends at the first crossing that would leave
    # the grid instead of testing the offset every voxel), with each index axis stored contiguously: the cameras above
    # and a grazing one whose rays run along the volume's faces.
    grazing = torchdrr.Camera.from_carm(
        90.0, 0.0, centre, sod_mm=200.0, sdd_mm=400.0, height=16, width=16, pixel_spacing_mm=(1.0, 1.0)
    ).ray_parameters()
    for axis in range(3):
        walk_volume = torchdrr.ops.with_contiguous_axis(torch.rand((2, 9, 7, 5), device="cuda"), axis)
        with torch.no_grad():
            torchdrr.ops.camera_raycast(walk_volume, affine, pose_sources, pose_matrices, 7, 9, supersample=2)
            torchdrr.ops.camera_raycast(walk_volume[0], affine, *(t.float() for t in grazing), 16, 16)
    for bins in (40, 4000):  # (M + Q) * E * 4 bytes: 1.6 KB in shared memory, 160 KB read from global memory
        thickness = (4 * torch.rand((1000, 8), device="cuda")).requires_grad_()
        attenuation = torch.rand((8, bins), device="cuda") / 10
        weights = torch.rand((2, bins), device="cuda").requires_grad_()
        starts = [0, bins // 4, bins // 4, bins - 3]
        out = torchdrr.ops.log_weighted_transmission(thickness, attenuation, weights, starts)
        torch.where(torch.isfinite(out), out, 0).sum().backward()
    # One weight table per image: runs of 512 rays (whole blocks: each block stages its own table) and of 37 rays
    # (blocks straddle tables: read from global memory).
    for rays_per_set in (512, 37):
        thickness = (4 * torch.rand((3, rays_per_set, 3), device="cuda")).requires_grad_()
        attenuation = torch.rand((3, 120), device="cuda") / 10
        weights = torch.rand((3, 2, 120), device="cuda").requires_grad_()
        out = torchdrr.ops.log_weighted_transmission(thickness, attenuation, weights, [0, 50, 120])
        torch.where(torch.isfinite(out), out, 0).sum().backward()
    torch.cuda.synchronize()
    print("sanitize case done:", float(volume.grad.abs().sum()), float(sources.grad.abs().sum()), float(angle.grad))
    print("pose Jacobian route done:", float(pose_sources.grad.abs().sum()), float(pose_volume.grad.abs().sum()))
    print("spectral done:", float(thickness.grad.abs().sum()), float(weights.grad.abs().sum()))


if __name__ == "__main__":
    main()
