"""Memory budgets: a render over budget runs in chunks with the same result, or is refused before allocating.

The chunked and unsplit renders are compared bit for bit where the physics is per pixel (fixed exposure), and to
float rounding where exposure control sums over the image in a different order. The peak-memory test measures the
process's real peak resident memory (VmHWM, reset through /proc/self/clear_refs) in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchdrr.drr as drr_module
from torchdrr import DRR, MemoryBudgetError
from torchdrr.geometry import Camera
from torchdrr.io import Volume, bundled_ct_path
from torchdrr.memory import RenderPlan, available_bytes, format_bytes, plan_chunks
from torchdrr.physics.detector import PhotonCountingDetector

F64 = torch.float64


@pytest.fixture(scope="module")
def volume() -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Volume.load(bundled_ct_path(), fix_padding=True)


def cameras(drr: DRR, batch: int = 3, height: int = 40, width: int = 48, requires_grad: bool = False) -> Camera:
    angles = torch.linspace(-25.0, 25.0, batch, dtype=F64).requires_grad_(requires_grad)
    return Camera.from_carm(
        angles,
        torch.zeros(batch, dtype=F64),
        drr.volume_center,
        height=height,
        width=width,
        pixel_spacing_mm=(9.0, 9.0),
    )


def budget_for(drr: DRR, camera: Camera, images: int | None = None, rows: int | None = None, **kwargs) -> int:
    """A budget that fits ``images`` whole images (or ``rows`` detector rows of one image) per chunk, from the plan's
    own arithmetic: the smallest budget whose plan is that split."""
    whole = drr.memory_plan(camera, memory_budget_bytes=2**62, **kwargs)
    transient, kept, fixed = drr._memory_per_ray(camera, drr._check_output(kwargs.get("output") or drr.output),
                                                 kwargs.get("noisy", drr.noise is not None))  # fmt: skip
    s2 = drr.supersample**2
    rays = rows * camera.width * s2 if rows is not None else images * camera.height * camera.width * s2
    total_rays = camera.batch_size * camera.height * camera.width * s2
    assert whole.chunks == 1
    return int(kept * total_rays + fixed + transient * rays) + 1


CASES = {
    "line_integral": dict(output="line_integral"),
    "display": dict(output="display"),
    "intensity_exposure_control": dict(output="intensity", photons_behind_patient=3000.0),
    "flat_field_supersampled": dict(output="flat_field", supersample=2),
    "photon_counting": dict(output="photons", detector=PhotonCountingDetector((25.0, 50.0))),
    "float64": dict(output="line_integral", dtype=F64),
}


@pytest.mark.parametrize("split", ["images", "rows"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_render_equals_unsplit(volume: Volume, case: str, split: str) -> None:
    options = dict(CASES[case])
    output = options.pop("output")
    drr = DRR(volume, **options)
    camera = cameras(drr)
    full = drr(camera, output=output)
    budget = budget_for(drr, camera, images=2, output=output) if split == "images" else 0
    if split == "rows":
        budget = budget_for(drr, camera, rows=7, output=output)
    plan = drr.memory_plan(camera, output=output, memory_budget_bytes=budget)
    if split == "images":
        assert (plan.images_per_chunk, plan.rows_per_chunk, plan.chunks) == (2, 40, 2)
    else:
        assert (plan.images_per_chunk, plan.rows_per_chunk, plan.chunks) == (1, 7, 3 * 6)
    assert plan.estimated_bytes <= budget
    chunked = drr(camera, output=output, memory_budget_bytes=budget)
    assert chunked.shape == full.shape and chunked.dtype == full.dtype
    if split == "images":
        assert torch.equal(chunked, full)
    else:
        # A band's rays come from the cropped camera's K: the same rays to float64 rounding (1e-14 mm). Exposure
        # control sums the image's statistics band by band: the same numbers in another order.
        float32 = full.dtype == torch.float32
        rtol = 1e-5 if "exposure_control" in case else (1e-6 if float32 else 1e-12)
        torch.testing.assert_close(chunked, full, rtol=rtol, atol=0.0)


def test_chunked_gradients_equal_unsplit(volume: Volume) -> None:
    drr = DRR(volume)

    def gradients(budget: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        shift = torch.zeros(3, dtype=F64, requires_grad=True)
        camera = cameras(drr, batch=2, requires_grad=True)
        camera = Camera(
            camera.intrinsics, camera.rotation, camera.translation + shift, camera.height, camera.width, camera.sdd_mm
        )
        image = drr(camera, memory_budget_bytes=budget)
        (image.square() * torch.linspace(0, 1, image.shape[-1])).sum().backward()
        return shift.grad, image.detach()

    probe = cameras(drr, batch=2, requires_grad=True)
    with torch.enable_grad():
        budget = budget_for(drr, probe, rows=5)
        plan = drr.memory_plan(probe, memory_budget_bytes=budget)
    assert plan.rows_per_chunk == 5 and plan.chunks == 2 * 8
    grad_full, image_full = gradients(None)
    grad_chunked, image_chunked = gradients(budget)
    torch.testing.assert_close(image_chunked, image_full, rtol=1e-6, atol=0.0)
    assert grad_full.abs().max() > 1.0  # a real gradient, not zeros
    torch.testing.assert_close(grad_chunked, grad_full, rtol=1e-6, atol=0.0)


def test_chunked_noisy_render_draws_the_same_distribution(volume: Volume) -> None:
    drr = DRR(volume, noise="radiography", output="intensity")
    camera = cameras(drr, batch=4, height=48, width=48)
    expected = drr(camera, noisy=False)
    budget = budget_for(drr, camera, images=1)
    plan = drr.memory_plan(camera, memory_budget_bytes=budget)
    assert plan.images_per_chunk == 1 and plan.chunks == 4
    noisy = drr(camera, memory_budget_bytes=budget, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(noisy).all()
    assert not torch.equal(noisy, expected)
    # Radiography exposure: ~1e3-1e4 photons per pixel, so the mean of 9216 pixels per image is within 1 %.
    ratio = noisy.mean(dim=(1, 2, 3)) / expected.mean(dim=(1, 2, 3))
    assert torch.all((ratio - 1).abs() < 0.01), ratio


def test_row_bands_refused_where_the_image_must_stay_whole(volume: Volume) -> None:
    class ScatterHalf(nn.Module):
        def forward(self, primary, material_integrals, camera):
            return 0.5 * primary

    drr = DRR(volume, scatter=ScatterHalf())
    camera = cameras(drr, batch=2)
    one_image = budget_for(drr, camera, images=1)
    assert drr.memory_plan(camera, memory_budget_bytes=one_image).images_per_chunk == 1
    with pytest.raises(MemoryBudgetError, match="scatter module needs the whole image") as raised:
        drr.memory_plan(camera, memory_budget_bytes=one_image - 64)
    assert raised.value.needed_bytes > raised.value.budget_bytes == one_image - 64

    blurred = DRR(volume, noise="radiography")
    with pytest.raises(MemoryBudgetError, match="blur spreads across rows"):
        blurred(camera, memory_budget_bytes=budget_for(blurred, camera, images=1) - 64)


def test_refused_before_any_work_with_the_numbers(volume: Volume, monkeypatch) -> None:
    drr = DRR(volume)
    camera = cameras(drr, batch=2, height=64, width=64)

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendering started although the render does not fit")

    monkeypatch.setattr(drr, "material_line_integrals", no_rendering)
    with pytest.raises(MemoryBudgetError) as raised:
        drr(camera, memory_budget_bytes=10_000)
    message = str(raised.value)
    assert "2 image(s) of 64 rows" in message and "memory budget is 9.77 KiB, from memory_budget_bytes" in message
    assert format_bytes(raised.value.needed_bytes) in message
    assert isinstance(raised.value, ValueError)


def test_automatic_budget_follows_what_the_device_can_spare(volume: Volume, monkeypatch) -> None:
    drr = DRR(volume)
    camera = cameras(drr, batch=2, height=64, width=64)
    full = drr(camera)
    asked = []

    def spare(device):
        asked.append(torch.device(device))
        return 300_000, "a pretend device"

    monkeypatch.setattr(drr_module, "available_bytes", spare)
    monkeypatch.setattr(drr_module, "AUTO_BUDGET_CHECK_BYTES", 0)
    plan = drr.memory_plan(camera)
    assert (
        plan.budget_bytes == int(300_000 * drr_module.AUTO_BUDGET_FRACTION) and "pretend device" in plan.budget_source
    )
    assert plan.chunks > 1 and asked == [torch.device("cpu")]
    assert torch.equal(drr(camera), full)
    # Small renders never ask the device.
    monkeypatch.setattr(drr_module, "AUTO_BUDGET_CHECK_BYTES", 256 * 2**20)
    asked.clear()
    drr(camera)
    assert asked == []


def test_available_bytes_on_this_machine() -> None:
    spare, source = available_bytes("cpu")
    assert 0 < spare and source
    if Path("/proc/meminfo").is_file():
        assert spare < sys.maxsize and "available host memory" in source


def test_plan_arithmetic() -> None:
    # 2 images of 10 rows x 100 rays; 8 bytes kept and 40 transient per ray; 1000 fixed.
    args = dict(images=2, height=10, rays_per_row=100, transient_bytes_per_ray=40.0, kept_bytes_per_ray=8.0)
    whole = plan_chunks(**args, fixed_bytes=1000, budget_bytes=10**6, budget_source="test")
    assert whole == RenderPlan(2, 10, 2, 10, 1, 1000 + 2000 * 48, 10**6, "test")
    one_image = plan_chunks(**args, fixed_bytes=1000, budget_bytes=1000 + 16000 + 40000, budget_source="test")
    assert (one_image.images_per_chunk, one_image.rows_per_chunk, one_image.chunks) == (1, 10, 2)
    bands = plan_chunks(**args, fixed_bytes=1000, budget_bytes=1000 + 16000 + 12000 + 39, budget_source="test")
    assert (bands.images_per_chunk, bands.rows_per_chunk, bands.chunks) == (1, 3, 2 * 4)
    assert bands.estimated_bytes == 1000 + 16000 + 12000
    with pytest.raises(MemoryBudgetError, match="one detector row") as raised:
        plan_chunks(**args, fixed_bytes=1000, budget_bytes=1000 + 16000 + 3999, budget_source="test")
    assert raised.value.needed_bytes == 1000 + 16000 + 4000


def test_camera_batch_indexing(volume: Volume) -> None:
    drr = DRR(volume)
    camera = cameras(drr, batch=4)
    assert camera[1:3].batch_size == 2 and torch.equal(camera[1:3].rotation, camera.rotation[1:3])
    assert camera[-1].batch_size == 1 and torch.equal(camera[-1].translation, camera.translation[3:])
    with pytest.raises(IndexError, match="out of range"):
        camera[4]
    with pytest.raises(IndexError, match="selects no camera"):
        camera[5:]
    with pytest.raises(TypeError, match="int or a slice"):
        camera[True]


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from torchdrr import DRR
    from torchdrr.geometry import Camera
    from torchdrr.io import Volume, bundled_ct_path

    def status(key):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    budget = int(sys.argv[1]) or None
    warnings.simplefilter("ignore")
    drr = DRR(Volume.load(bundled_ct_path(), fix_padding=True))
    angles = torch.tensor([-20.0, 0.0, 20.0, 40.0], dtype=torch.float64)
    camera = Camera.from_carm(angles, torch.zeros(4, dtype=torch.float64), drr.volume_center, height=384, width=384,
                              pixel_spacing_mm=(0.9, 0.9))
    drr(camera[:1].crop(0, 0, 8, 8))  # builds and caches the material volume
    plan = drr.memory_plan(camera, memory_budget_bytes=budget)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets the peak resident memory (VmHWM) to the current one
    before = status("VmRSS:")
    image = drr(camera, memory_budget_bytes=budget)
    peak = status("VmHWM:") - before
    print(json.dumps({"peak": peak, "estimate": plan.estimated_bytes, "chunks": plan.chunks,
                      "image_bytes": image.numel() * image.element_size()}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_stays_within_the_budget(tmp_path: Path) -> None:
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    # Large blocks straight from mmap and back: freed memory leaves the process, so its peak is the render's own.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", OMP_NUM_THREADS="1")

    def measure(budget: int) -> dict:
        done = subprocess.run([sys.executable, str(script), str(budget)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    budget = 8 * 2**20
    whole, chunked = measure(0), measure(budget)
    assert whole["chunks"] == 1 and chunked["chunks"] > 4
    # The unsplit render needs several times the budget (so this test can fail), and the estimate bounds it.
    assert whole["peak"] > 3 * budget
    assert whole["peak"] <= whole["estimate"]
    assert chunked["estimate"] <= budget
    # The output (2.4 MB) is allocated on the first chunk; the allocator's page granularity adds a little.
    assert chunked["peak"] <= budget * 1.05, (format_bytes(chunked["peak"]), format_bytes(budget))
