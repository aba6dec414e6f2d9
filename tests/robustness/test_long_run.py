"""Long runs: 10,000 small renders in a loop leave no memory behind (process RSS, Python objects, CUDA allocated).

Each iteration is what a training loop or a registration does: a random pose, a render, and every other iteration a
loss and its gradient with respect to the pose; every tenth a noisy render. The CT is the bundled chest CT resampled
to 4 mm voxels and the spectrum binned at 5 keV (real anatomy, cheap rays) so that the 10,000 renders fit the CI time
budget.

``TORCHDRR_LONG_RUN_RENDERS`` overrides the number of renders (e.g. 100000 for a longer soak).
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from pathlib import Path

import torch

from torchdrr import DRR
from torchdrr.geometry import Camera
from torchdrr.io import Volume, bundled_ct_path, resample

RENDERS = int(os.environ.get("TORCHDRR_LONG_RUN_RENDERS", "10000"))
WARM_UP = 300
F64 = torch.float64


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc; 0 elsewhere)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_ten_thousand_renders_leave_no_memory_behind(device: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volume = resample(Volume.load(bundled_ct_path(), fix_padding=True), 4.0)
    # 5 keV spectrum bins: a fifth of the per-ray spectral work of the default 1 keV, the same code paths.
    drr = DRR(volume, noise="radiography", energy_bin_keV=5).to(device)
    centre = drr.volume_center.to(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    noise_generator = torch.Generator(device=device).manual_seed(1)
    cuda = device == "cuda"

    def one(step: int) -> None:
        angles = (torch.rand(2, generator=generator, dtype=F64) - 0.5) * 60.0
        offset = ((torch.rand(3, generator=generator, dtype=F64) - 0.5) * 20.0).to(device)
        with_grad = step % 2 == 1
        offset.requires_grad_(with_grad)
        camera = Camera.from_carm(angles[0].to(device), angles[1].to(device), centre + offset, height=64, width=64,
                                  pixel_spacing_mm=(6.0, 6.0))  # fmt: skip
        if step % 10 == 0:
            image = drr(camera, generator=noise_generator)
        else:
            image = drr(camera, noisy=False)
        if with_grad:
            image.square().mean().backward()
            assert torch.isfinite(offset.grad).all()

    for step in range(WARM_UP):
        one(step)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
    rss_start, objects_start = resident_bytes(), len(gc.get_objects())
    cuda_start = torch.cuda.memory_allocated() if cuda else 0
    checkpoints = []
    start = time.perf_counter()
    for step in range(RENDERS):
        one(WARM_UP + step)
        if (step + 1) % (RENDERS // 5) == 0:
            checkpoints.append(resident_bytes() - rss_start)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gc.collect()
    rss_growth = resident_bytes() - rss_start
    object_growth = len(gc.get_objects()) - objects_start
    cuda_growth = (torch.cuda.memory_allocated() - cuda_start) if cuda else 0
    print(
        f"\n{RENDERS} renders on {device} in {seconds:.1f} s ({1e3 * seconds / RENDERS:.2f} ms each): RSS growth "
        f"{rss_growth / 2**20:+.2f} MiB (at each fifth: {[round(c / 2**20, 2) for c in checkpoints]} MiB), "
        f"Python objects {object_growth:+d}, CUDA allocated {cuda_growth:+d} B"
    )
    # A leak of one 64 x 64 image per render would be 160 MiB here. One-time growth (the CUDA runtime's host-side
    # caches settle in the first thousand renders on a GPU: +2.4 MiB on an H100) is allowed; growth after it is not.
    assert rss_growth < 8 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB over {RENDERS} renders: {checkpoints}"
    assert checkpoints[-1] - checkpoints[0] < 2 * 2**20, f"RSS kept growing: {checkpoints} bytes at each fifth"
    assert object_growth < 200, f"{object_growth} Python objects more after {RENDERS} renders"
    assert cuda_growth == 0, f"CUDA allocated memory grew by {cuda_growth} bytes"


def test_repeated_chunked_renders_leave_no_memory_behind(device: str) -> None:
    """The chunked path (row bands with exposure control, two passes) in a loop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volume = resample(Volume.load(bundled_ct_path(), fix_padding=True), 4.0)
    drr = DRR(volume, photons_behind_patient=2000.0, output="intensity").to(device)
    camera = Camera.from_carm(
        torch.tensor([0.0, 30.0], dtype=F64), torch.zeros(2, dtype=F64), drr.volume_center, height=64, width=64
    ).to(device)
    transient, kept, fixed = drr._memory_per_ray(camera, "intensity", False)
    budget = int(fixed + kept * 2 * 64 * 64 + transient * 64 * 16) + 1  # row bands of 16 rows
    assert drr.memory_plan(camera, memory_budget_bytes=budget).rows_per_chunk == 16
    for _ in range(50):
        drr(camera, memory_budget_bytes=budget)
    gc.collect()
    rss_start, objects_start = resident_bytes(), len(gc.get_objects())
    cuda_start = torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(100):
        drr(camera, memory_budget_bytes=budget)
    gc.collect()
    rss_settled = resident_bytes()  # one-time host-side caches of the CUDA runtime settle in the first renders
    for _ in range(400):
        drr(camera, memory_budget_bytes=budget)
    gc.collect()
    assert resident_bytes() - rss_start < 8 * 2**20
    assert resident_bytes() - rss_settled < 2 * 2**20
    assert len(gc.get_objects()) - objects_start < 100
    if device == "cuda":
        assert torch.cuda.memory_allocated() == cuda_start
