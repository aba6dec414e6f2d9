"""The material U-Net, its sliding-window inference and the NetworkSegmentation module (CPU, untrained weights)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from torchdrr.drr import DRR
from torchdrr.geometry import Camera, intrinsic_matrix
from torchdrr.learned.network import (
    DEFAULT_HU_WINDOWS,
    HUWindows,
    MaterialUNet,
    NetworkSegmentation,
    gaussian_importance,
    sliding_window_logits,
)
from torchdrr.physics import MaterialChannels

MATERIALS = ("air", "lung", "soft tissue", "cortical bone", "iodinated contrast", "titanium")


def small_net(**kwargs) -> MaterialUNet:
    torch.manual_seed(0)
    return MaterialUNet(width=4, **kwargs).eval()


def ct(shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    """Air around a water cylinder with a bone rod: a plausible HU range with structure."""
    g = torch.Generator().manual_seed(seed)
    j, k = (torch.arange(s, dtype=torch.float32) for s in shape[1:])
    r2 = (j.view(1, -1, 1) - shape[1] / 2) ** 2 + (k.view(1, 1, -1) - shape[2] / 2) ** 2
    hu = torch.where(r2 < (0.4 * min(shape[1:])) ** 2, 0.0, -1000.0).expand(shape).clone()
    hu[r2.expand(shape) < (0.1 * min(shape[1:])) ** 2] = 1200.0
    return hu + 20.0 * torch.randn(shape, generator=g)


class Fixed(nn.Module):
    """A 'network' whose logits are a pointwise function of the HU: every patch agrees where patches overlap."""

    size_divisor = 1

    def forward(self, hu: Tensor) -> Tensor:
        x = hu / 500.0
        return torch.cat([x, -x, 0.5 * x.square()], dim=1)


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 8, 8), (16, 24, 8), (32, 16, 40)])
def test_output_shapes(shape: tuple[int, int, int]) -> None:
    net = small_net()
    with torch.no_grad():
        out = net(torch.zeros(2, 1, *shape))
    assert out.shape == (2, 6, *shape)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kwargs", [{"upsample": "trilinear"}, {"residual": True}, {"norm": "instance"}])
def test_variants_run(kwargs: dict) -> None:
    with torch.no_grad():
        assert small_net(num_classes=3, **kwargs)(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_default_size_and_repr() -> None:
    net = MaterialUNet()
    config = net.network_config()
    assert config["parameters"] == sum(p.numel() for p in net.parameters())
    assert config["parameters"] < 2_000_000
    assert config["fp16_bytes"] < 4 * 2**20
    assert f"parameters={config['parameters']:,}" in repr(net)
    assert net.size_divisor == 8
    assert MaterialUNet(**net.config).network_config() == config


def test_hu_windows() -> None:
    windows = HUWindows()
    hu = torch.tensor([-1000.0, 3000.0, -2000.0]).view(3, 1, 1, 1, 1)
    out = windows(hu).view(3, len(DEFAULT_HU_WINDOWS))
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([1.0, 1.0, 1.0, 2.0 / 3.0]))
    torch.testing.assert_close(out[2], out[0])  # below every window: clamped like air
    mid = windows(torch.full((1, 1, 1, 1, 1), 50.0)).flatten()
    torch.testing.assert_close(mid, torch.tensor([1.0, 0.5, 0.025, 0.0]))


def test_network_rejects_bad_input() -> None:
    net = small_net()
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        net(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="norm"):
        MaterialUNet(norm="batch")
    with pytest.raises(ValueError, match="hu_windows"):
        MaterialUNet(hu_windows=[(0.0, -1.0)])


# --------------------------------------------------------------------------------------------------------------------
# Sliding window
# --------------------------------------------------------------------------------------------------------------------
def test_single_patch_equals_a_direct_pass() -> None:
    net = small_net()
    hu = ct((24, 16, 32))
    got = sliding_window_logits(net, hu, patch=(24, 16, 32))
    with torch.no_grad():
        expected = torch.softmax(net(hu[None, None]), dim=1)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_odd_sizes_give_the_right_shape_and_normalised_probabilities() -> None:
    net = small_net()
    hu = ct((21, 13, 30))  # smaller than the patch on one axis (padded), larger on the others
    got = sliding_window_logits(net, hu, patch=16, overlap=0.5, batch_size=3)
    assert got.shape == (6, 21, 13, 30)
    assert bool(((got >= 0) & (got <= 1)).all())
    torch.testing.assert_close(got.sum(0), torch.ones(21, 13, 30), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_blending_normalises_the_weights(overlap: float) -> None:
    """Where every patch predicts the same thing the blend must reproduce it: the weights are normalised."""
    hu = ct((37, 22, 29), seed=1)
    got = sliding_window_logits(Fixed(), hu, patch=(16, 12, 10), overlap=overlap, batch_size=4)
    expected = torch.softmax(Fixed()(hu[None, None]), dim=1)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_gaussian_importance() -> None:
    w = gaussian_importance((16, 8, 12))
    assert w.shape == (16, 8, 12)
    assert float(w.max()) == pytest.approx(1.0)
    assert float(w.min()) > 0
    # sigma = patch / 8: one sigma from the centre along the first axis the weight is exp(-1/2) of the peak.
    x = torch.arange(16.0) - 7.5
    expected = torch.exp(-0.5 * (x / 2.0) ** 2)
    torch.testing.assert_close(w[:, 4, 6] / w[:, 4, 6].max(), expected / expected.max())


def test_accumulator_stays_on_the_volume_device(monkeypatch) -> None:
    """Volume-sized accumulators are allocated on the volume's device; the network only ever sees patch batches."""
    allocated: list[tuple[tuple[int, ...], torch.device]] = []
    original = torch.zeros

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        allocated.append((tuple(out.shape), out.device))
        return out

    seen: list[tuple[int, ...]] = []

    class Recording(Fixed):
        def forward(self, hu: Tensor) -> Tensor:
            seen.append(tuple(hu.shape))
            return super().forward(hu)

    monkeypatch.setattr(torch, "zeros", spy)
    hu = ct((30, 20, 18))
    out = sliding_window_logits(Recording(), hu, patch=(16, 16, 16), overlap=0.5, batch_size=2)
    assert out.device == hu.device
    assert ((3, 30, 20, 18), hu.device) in allocated and ((30, 20, 18), hu.device) in allocated
    assert seen and all(s[0] <= 2 and s[1:] == (1, 16, 16, 16) for s in seen)
    assert sum(s[0] for s in seen) == 3 * 2 * 2  # patch origins: i 0/8/14, j 0/4, k 0/2


def test_sliding_window_is_differentiable_on_request() -> None:
    net = small_net()
    hu = ct((16, 16, 24)).requires_grad_(True)
    with torch.no_grad():
        out = sliding_window_logits(net, hu, patch=16)
    assert not out.requires_grad
    out = sliding_window_logits(net, hu, patch=16, requires_grad=True)
    assert out.requires_grad
    out[1].sum().backward()
    assert hu.grad is not None and bool(torch.isfinite(hu.grad).all()) and float(hu.grad.abs().sum()) > 0


def test_sliding_window_progress_bar(capsys) -> None:
    sliding_window_logits(Fixed(), ct((20, 20, 20)), patch=16, progress=True)
    assert "material segmentation" in capsys.readouterr().err


def test_sliding_window_rejects_bad_input() -> None:
    net = small_net()
    with pytest.raises(ValueError, match="hu must have shape"):
        sliding_window_logits(net, torch.zeros(1, 16, 16, 16), patch=16)
    with pytest.raises(TypeError, match="hu must be a floating-point"):
        sliding_window_logits(net, torch.zeros(16, 16, 16, dtype=torch.int16), patch=16)
    bad = torch.zeros(16, 16, 16)
    bad[3, 4, 5] = math.nan
    with pytest.raises(ValueError, match="hu must be finite"):
        sliding_window_logits(net, bad, patch=16)
    with pytest.raises(ValueError, match="multiples of the network's size_divisor"):
        sliding_window_logits(net, torch.zeros(16, 16, 16), patch=12)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_logits(net, torch.zeros(16, 16, 16), patch=16, overlap=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_logits(net, torch.zeros(16, 16, 16), patch=16, batch_size=0)
    with pytest.raises(TypeError, match="patch"):
        sliding_window_logits(net, torch.zeros(16, 16, 16), patch=(16, 16))


# --------------------------------------------------------------------------------------------------------------------
# NetworkSegmentation
# --------------------------------------------------------------------------------------------------------------------
def segmentation(**kwargs) -> NetworkSegmentation:
    return NetworkSegmentation(small_net(), MATERIALS, patch=16, **kwargs)


def test_network_segmentation_gives_material_channels() -> None:
    seg = segmentation()
    hu = ct((20, 16, 24), seed=2).double()
    out = seg(hu)
    assert isinstance(out, MaterialChannels)
    assert out.materials == MATERIALS == seg.materials
    assert out.densities.shape == (6, 20, 16, 24)
    assert out.densities.dtype == torch.float64
    assert bool((out.densities >= 0).all())
    from torchdrr.physics.density import hu_to_density

    torch.testing.assert_close(out.densities.sum(0), hu_to_density(hu), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in seg.network.parameters())  # frozen: the DRR may cache


def test_network_segmentation_renders_a_drr() -> None:
    hu = ct((32, 32, 32), seed=3)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = -31.0
    drr = DRR(hu, affine, segmentation=segmentation(), spectrum=60.0)
    assert drr.materials == MATERIALS
    rotation = torch.eye(3, dtype=torch.float64)[None]
    translation = torch.tensor([[0.0, 0.0, 500.0]], dtype=torch.float64)
    camera = Camera(intrinsic_matrix(1000.0, 16, 16, (4.0, 4.0)), rotation, translation, 16, 16, 1000.0)
    image = drr(camera, output="line_integral")
    assert image.shape == (1, 1, 16, 16)
    assert bool(torch.isfinite(image).all()) and float(image.max()) > 0


def test_checkpoint_round_trip(tmp_path) -> None:
    seg = segmentation(overlap=0.25, batch_size=3)
    hu = ct((20, 16, 24), seed=4)
    path = seg.save_checkpoint(tmp_path / "net.pt")
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    loaded = NetworkSegmentation.from_checkpoint(path)
    assert loaded.materials == seg.materials
    assert (loaded.patch, loaded.overlap, loaded.batch_size) == (seg.patch, seg.overlap, seg.batch_size)
    assert loaded.network.config == seg.network.config
    torch.testing.assert_close(loaded.memberships(hu), seg.memberships(hu), atol=0, rtol=0)
    half = seg.save_checkpoint(tmp_path / "half.pt", half=True)
    assert half.stat().st_size < path.stat().st_size
    assert NetworkSegmentation.from_checkpoint(half).memberships(hu).shape == (6, 20, 16, 24)


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        NetworkSegmentation.from_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a torchdrr material-network checkpoint"):
        NetworkSegmentation.from_checkpoint(tmp_path / "other.pt")


def test_network_segmentation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="materials: the network has 6 outputs"):
        NetworkSegmentation(small_net(), MATERIALS[:3], patch=16)
    with pytest.raises(ValueError):
        NetworkSegmentation(small_net(), (*MATERIALS[:5], "unobtainium"), patch=16)
    with pytest.raises(TypeError, match="materials"):
        NetworkSegmentation(small_net(), "air", patch=16)
    seg = segmentation()
    with pytest.raises(ValueError, match="hu must have shape"):
        seg(torch.zeros(16, 16))
    bad = torch.zeros(16, 16, 16)
    bad[0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="hu must be finite"):
        seg(bad)
    with pytest.raises(TypeError, match="hu must be a torch.Tensor"):
        seg.memberships([[0.0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_network_with_a_cpu_volume() -> None:
    """The network on the GPU, the volume and the accumulators on the CPU: same result as all on the CPU."""
    net = small_net()
    hu = ct((24, 20, 28), seed=5)
    cpu = sliding_window_logits(net, hu, patch=16)
    # cuDNN convolutions use TF32 by default on Ampere and later (probabilities then differ by ~1e-3): compare in
    # full float32 precision.
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = sliding_window_logits(net.cuda(), hu, patch=16)
        assert gpu.device.type == "cpu"
        torch.testing.assert_close(gpu, cpu, atol=1e-5, rtol=0)
        on_gpu = sliding_window_logits(net, hu.cuda(), patch=16)
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), cpu, atol=1e-5, rtol=0)
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
