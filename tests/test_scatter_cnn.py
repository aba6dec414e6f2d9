"""The scatter CNN: the shipped weights against held-out Monte Carlo cases, gradients, the DRR hook, the data stream."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdrr.learned.scatter as scatter_module
from torchdrr import DRR
from torchdrr.geometry import Camera, carm_extrinsics, intrinsic_matrix
from torchdrr.learned.scatter import (
    GRID_MULTIPLE,
    ScatterCNN,
    ScatterUNet,
    bin_grid,
    check_training_range,
    network_inputs,
    object_detector_distance,
    predict_ratio,
    save_network,
    spectrum_numbers,
    spectrum_scalars,
)
from torchdrr.learned.scatter_data import HELDOUT_KVP, case_parameters, load_cases, simulate_cases
from torchdrr.learned.scatter_training import case_tensors, evaluate_cases, relative_rmse
from torchdrr.physics import MaterialChannels, PhotonCountingDetector, spectrum_preset
from torchdrr.physics.spectra import spectrum

HELDOUT = Path(__file__).parent / "data" / "scatter_heldout.npz"


@pytest.fixture(scope="module")
def shipped() -> ScatterCNN:
    return ScatterCNN()


def _camera(height: int, width: int, pitch: float, centre: torch.Tensor, primary: float = 0.0) -> Camera:
    rotation, translation = carm_extrinsics(primary, 0.0, 850.0, centre)
    k = intrinsic_matrix(1020.0, height, width, (pitch, pitch))
    return Camera(k, rotation.reshape(1, 3, 3), translation.reshape(1, 3), height, width, 1020.0)


def test_shipped_weights_on_heldout_cases(shipped):
    """The committed held-out cases (poses, phantoms and kVp never used in training; MC noise < 2 %): the shipped
    network reproduces the figures recorded when it was trained, and is far better than a constant scatter field."""
    cases = load_cases(HELDOUT)
    summary = evaluate_cases(shipped.network, cases)
    assert summary["cases"] == 48
    assert summary["mc_noise"]["max"] < 0.02  # the targets' own noise, per case
    recorded = shipped.metadata["heldout"]
    for name in ("relative_rmse", "mean_spr_error"):
        assert summary[name]["median"] == pytest.approx(recorded[name]["median"], abs=2e-3), name
        assert summary[name]["mean"] == pytest.approx(recorded[name]["mean"], abs=2e-3), name
    # A baseline that knows each case's mean scatter but not its shape: the network must beat it clearly.
    _, targets, mask = case_tensors(cases)
    mean = (targets * mask).sum((-2, -1), keepdim=True) / mask.sum((-2, -1), keepdim=True)
    baseline = relative_rmse(mean.expand_as(targets), targets, mask)
    assert summary["relative_rmse"]["median"] < 0.6 * float(baseline.median())
    assert summary["relative_rmse"]["median"] < 0.2
    assert set(summary["kvp"]) <= {k for k in HELDOUT_KVP}


def test_heldout_and_training_streams_are_disjoint():
    train = [case_parameters("train", i) for i in range(400)]
    heldout = [case_parameters("heldout", i) for i in range(48)]
    assert all(min(abs(c.kvp - k) for k in HELDOUT_KVP) >= 3.0 for c in train)
    assert {c.kvp for c in heldout} == set(HELDOUT_KVP)
    phantoms = {c.phantom_seed for c in train if c.source == "phantom"}
    assert phantoms and phantoms.isdisjoint({c.phantom_seed for c in heldout if c.source == "phantom"})
    assert case_parameters("train", 7) == case_parameters("train", 7)  # a pure function of (split, index)
    with pytest.raises(ValueError, match="split"):
        case_parameters("test", 0)


def test_simulated_cases_round_trip(tmp_path):
    """Two tiny CPU cases: whole shards on disk, the MC primary agrees with the DRR's transmission, finite targets."""
    written = simulate_cases("train", 2, tmp_path, photons_per_pixel=30, device="cpu", shard=1, progress=False)
    assert [p.name for p in written] == ["train-00000.npz", "train-00001.npz"]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    cases = load_cases(tmp_path)
    inputs, targets, mask = case_tensors(cases)
    assert inputs.shape == (2, 8, 64, 64) and targets.shape == mask.shape == (2, 64, 64)
    field = mask.bool()
    t, t_mc = cases["transmission"][field], cases["mc_transmission"][field]
    assert float((t_mc * t).sum() / (t * t).sum()) == pytest.approx(1.0, abs=0.05)
    assert bool(torch.isfinite(targets).all()) and float(targets[field].mean()) > 0


def test_network_inputs_and_grid():
    assert bin_grid(960, 1240, (0.3, 0.3)) == (41, 53)
    assert bin_grid(4, 4, (0.1, 0.1)) == (1, 1)
    t = torch.full((2, 5, 9), 0.5)
    x, field = network_inputs(t, torch.full_like(t, 20.0), torch.tensor([[90.0, 50.0, 7.0, 1000.0, 200.0]] * 2))
    assert field == (5, 9) and x.shape == (2, 8, 8, 16)
    assert torch.allclose(x[:, 0, :5, :9], torch.full((2, 5, 9), float(np.log(2.0)) / 4.0))
    assert float(x[:, 2].sum()) == 2 * 45  # the field mask
    assert float(x[:, 0, 5:].abs().sum()) == 0.0  # zero outside the field
    assert torch.allclose(x[:, 3:, 0, 0], torch.tensor([[0.9, 1.0, 1.0, 1.0, 0.8]] * 2))
    with pytest.raises(ValueError, match="multiple of 8"):
        ScatterUNet()(torch.zeros(1, 8, 12, 16))
    kvp, mean_energy = spectrum_scalars(*spectrum_preset("90kVp"))
    assert kvp == pytest.approx(90.0, abs=1.0) and 40.0 < mean_energy < 60.0


def test_host_free_scalars_match_the_host_ones():
    """The forward pass reads the spectrum on its device and the pitch from a per-camera cache: same numbers as the
    host versions, and the cache follows in-place changes of K."""
    for preset in ("60kVp", "90kVp", "120kVp"):
        energy, photons = spectrum_preset(preset)
        kvp, mean_energy = spectrum_scalars(energy, photons)
        numbers = spectrum_numbers(energy, photons)
        assert float(numbers[0]) == pytest.approx(kvp, rel=1e-12) and float(numbers[1]) == pytest.approx(mean_energy)
    weights = photons.clone().requires_grad_(True)
    spectrum_numbers(energy, weights)[1].backward()  # the mean energy is differentiable in the spectrum
    assert float(weights.grad.abs().sum()) > 0
    camera = _camera(40, 30, 0.5, torch.zeros(3, dtype=torch.float64))
    assert camera.pixel_spacing_mm == pytest.approx((0.5, 0.5))
    assert camera.pixel_spacing_mm == pytest.approx((0.5, 0.5))  # the cached answer
    with torch.no_grad():
        camera.intrinsics[0, 0] *= 2.0  # in place: the cache must notice
    assert camera.pixel_spacing_mm == pytest.approx((0.5, 0.25))
    with torch.inference_mode():  # inference tensors have no version counter: read, not cached
        frozen = _camera(40, 30, 0.5, torch.zeros(3, dtype=torch.float64))
        assert frozen.pixel_spacing_mm == pytest.approx((0.5, 0.5))
    assert frozen.pixel_spacing_mm == pytest.approx((0.5, 0.5))


def test_scatter_ratio_gradcheck():
    """Float64 gradients of the whole CNN path (bin, network, upsample) with respect to both input images."""
    torch.manual_seed(0)
    network = ScatterUNet((8, 8, 8, 8)).double()
    torch.nn.init.normal_(network.head.weight, std=0.1)
    cnn = ScatterCNN(network=network)
    transmission = (0.2 + 0.6 * torch.rand(1, 1, 12, 10, dtype=torch.float64)).requires_grad_(True)
    mass = (10.0 * torch.rand(1, 1, 12, 10, dtype=torch.float64)).requires_grad_(True)

    def ratio(t, m):
        return cnn.scatter_ratio(t, m, (10.0, 10.0), 1000.0, 90.0, 50.0, 180.0)

    assert torch.autograd.gradcheck(ratio, (transmission, mass), eps=1e-6, atol=1e-7)


def test_drr_cnn_scatter_is_added_and_differentiable(shipped):
    """``DRR(scatter="cnn")``: the scatter it adds equals the CNN's ratio times the flat field; gradients reach the
    volume through the CNN (they differ from those of the render without scatter) and match finite differences."""
    torch.manual_seed(0)
    densities = torch.zeros(3, 24, 24, 24, dtype=torch.float64)
    densities[1, 3:21, 3:21, 3:21] = 1.0  # a 36 mm soft-tissue cube
    densities[2, 9:15, 9:15, 9:15] = 1.9  # with a bone core
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    materials = ("air", "soft tissue", "cortical bone")
    parameter = torch.nn.Parameter(densities.clone())
    kwargs = {"output": "intensity", "dtype": torch.float64, "photons_per_pixel": 1.0}
    with_cnn = DRR(MaterialChannels(parameter, materials), affine, scatter=ScatterCNN(), **kwargs)
    with_cnn.scatter.double()
    plain = DRR(MaterialChannels(densities, materials), affine, **kwargs)
    flat = DRR(MaterialChannels(torch.zeros_like(densities), materials), affine, **kwargs)
    camera = _camera(12, 10, 8.0, torch.tensor([24.0, 24.0, 24.0], dtype=torch.float64))
    total, primary, open_field = with_cnn(camera), plain(camera), flat(camera)
    gap = object_detector_distance(camera, with_cnn.volume_center)
    assert float(gap) == pytest.approx(1020.0 - 850.0, abs=2.0)  # the C-arm's isocentre is the volume's centre
    ratio = with_cnn.scatter.scatter_ratio(
        primary / open_field,
        plain.material_line_integrals(camera).sum(-1).reshape(1, 1, 12, 10),
        (8.0, 8.0), 1020.0, *spectrum_scalars(*spectrum_preset("90kVp")), gap,
    )  # fmt: skip
    assert torch.allclose(total - primary, ratio * open_field, rtol=1e-9, atol=1e-12)
    assert float((total - primary).min()) > 0

    weights = torch.rand(total.shape, dtype=torch.float64)
    (total * weights).sum().backward()
    grad = parameter.grad.clone()
    assert float(grad.abs().sum()) > 0
    voxel = (1, 12, 12, 4)
    step = 1e-4
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            parameter[voxel] += sign * step
        values.append(float((with_cnn(camera) * weights).sum()))
        with torch.no_grad():
            parameter[voxel] -= sign * step
    assert grad[voxel] == pytest.approx((values[0] - values[1]) / (2 * step), rel=1e-5)
    reference = torch.nn.Parameter(densities.clone())
    no_scatter = DRR(MaterialChannels(reference, materials), affine, **kwargs)
    (no_scatter(camera) * weights).sum().backward()
    assert not torch.allclose(grad, reference.grad)


def test_shipped_network_is_frozen_and_grid_padding(shipped):
    assert not any(p.requires_grad for p in shipped.parameters())
    assert shipped.metadata["training_cases"] > 1000
    assert GRID_MULTIPLE == 8


def test_bad_input(tmp_path, shipped):
    densities = MaterialChannels(torch.ones(1, 4, 4, 4), ("water",))
    affine = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="EnergyIntegratingDetector"):
        DRR(densities, affine, scatter="cnn", detector=PhotonCountingDetector(thresholds_keV=(20.0,)))
    with pytest.raises(FileNotFoundError, match="scatter CNN weights not found"):
        ScatterCNN(tmp_path / "missing.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a scatter CNN checkpoint"):
        ScatterCNN(tmp_path / "other.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt is not a scatter CNN checkpoint"):
        ScatterCNN(tmp_path / "corrupt.pt")
    with pytest.raises(TypeError, match="ScatterUNet"):
        ScatterCNN(network=torch.nn.Linear(2, 2))
    t = torch.full((1, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        shipped.scatter_ratio(t, torch.ones(1, 1, 8, 7), (1.0, 1.0), 1000.0, 90.0, 50.0, 200.0)
    with pytest.raises(ValueError, match="no photons"):
        spectrum_scalars(torch.arange(3.0), torch.zeros(3))


def test_outside_the_training_range_warns_once(monkeypatch, shipped):
    """Geometry or spectrum the network never saw is flagged (once per quantity), typical detectors are not."""
    monkeypatch.setattr(scatter_module, "_WARNED", set())
    t, m = torch.full((1, 1, 96, 124), 0.3), torch.full((1, 1, 96, 124), 20.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in range: no warning at all
        shipped.scatter_ratio(t, m, (3.0, 3.0), 1020.0, 90.0, 50.0, 200.0)  # 288 x 372 mm at SDD 1020
        assert check_training_range(kvp=60.0, mean_energy_keV=36.0, sdd_mm=1250.0, field_mm=430.0) == []
        for preset in ("60kVp", "90kVp", "120kVp"):  # the presets are all in range
            DRR(MaterialChannels(torch.ones(1, 4, 4, 4), ("water",)), torch.eye(4, dtype=torch.float64),
                scatter="cnn", spectrum=preset)  # fmt: skip
    with pytest.warns(UserWarning, match=r"detector field side 9\.6 mm is outside.*150-520 mm"):
        shipped.scatter_ratio(t[..., :8, :8], m[..., :8, :8], (1.2, 1.2), 1020.0, 90.0, 50.0, 200.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped.scatter_ratio(t[..., :8, :8], m[..., :8, :8], (1.2, 1.2), 1020.0, 90.0, 50.0, 200.0)  # said once
    with pytest.warns(UserWarning, match="tube voltage 140 kVp"):
        shipped.scatter_ratio(t, m, (3.0, 3.0), 1020.0, 140.0, 65.0, 200.0)
    with pytest.warns(UserWarning, match="source-to-detector distance 1800 mm"):
        shipped.scatter_ratio(t, m, (3.0, 3.0), 1800.0, 90.0, 50.0, 200.0)
    densities = MaterialChannels(torch.ones(1, 4, 4, 4), ("water",))
    monkeypatch.setattr(scatter_module, "_WARNED", set())
    # The DRR checks its spectrum when it is built: an unfiltered 60 kVp beam is far softer than any training beam.
    with pytest.warns(UserWarning, match=r"mean photon energy \(filtration\) 16.16 keV"):
        DRR(densities, torch.eye(4, dtype=torch.float64), scatter="cnn", spectrum=spectrum(60.0))


def test_save_round_trip(tmp_path):
    network = ScatterUNet((8, 8, 8, 8))
    save_network(network, tmp_path / "net.pt", {"note": np.float32(1.5)}, half=False)
    loaded = ScatterCNN(tmp_path / "net.pt")
    assert loaded.metadata == {"note": "1.5"}
    for a, b in zip(network.state_dict().values(), loaded.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(shipped):
    torch.manual_seed(0)
    t = 0.05 + 0.9 * torch.rand(2, 1, 96, 124)
    m = 30.0 * torch.rand(2, 1, 96, 124)
    cpu = shipped.scatter_ratio(t, m, (3.0, 3.0), 1020.0, 90.0, 50.0, 200.0)
    gpu = ScatterCNN().cuda().scatter_ratio(t.cuda(), m.cuda(), (3.0, 3.0), 1020.0, 90.0, 50.0, 200.0)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_path_matches_eager_and_keeps_gradients():
    """Inference replays a captured CUDA graph: the same numbers as the eager network, for new inputs of the same
    shape too (the graph reads its input buffer), and a call that needs gradients runs eagerly and gets them."""
    torch.manual_seed(2)
    graphed, eager = ScatterCNN().cuda(), ScatterCNN(cuda_graphs=False).cuda()
    args = ((3.0, 3.0), 1020.0, 90.0, 50.0, 200.0)
    for _ in range(2):
        t = (0.05 + 0.9 * torch.rand(2, 1, 96, 124)).cuda()
        m = (30.0 * torch.rand(2, 1, 96, 124)).cuda()
        with torch.no_grad():
            fast = graphed.scatter_ratio(t, m, *args)
            reference = eager.scatter_ratio(t, m, *args)
        assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-7)
    assert len(graphed._graphs.entries) == 1  # one shape, one graph
    with torch.inference_mode():  # inference tensors take the graph path too
        assert torch.allclose(graphed.scatter_ratio(t, m, *args), reference, rtol=1e-5, atol=1e-7)
    t.requires_grad_(True)
    out = graphed.scatter_ratio(t, m, *args)
    assert out.requires_grad
    out.sum().backward()
    assert float(t.grad.abs().sum()) > 0
    assert len(graphed._graphs.entries) == 1


def test_flip_average_is_the_mean_of_the_mirror_images(shipped):
    torch.manual_seed(1)
    scalars = torch.tensor([[70.0, 40.0, 7.0, 1000.0, 150.0], [110.0, 55.0, 7.2, 1200.0, 300.0]])
    x, _ = network_inputs(0.05 + 0.9 * torch.rand(2, 20, 27), 30.0 * torch.rand(2, 20, 27), scalars)
    single = predict_ratio(shipped.network, x, flip_average=False)
    manual = sum(
        predict_ratio(shipped.network, x.flip(dims), flip_average=False).flip(dims) if dims else single
        for dims in ((), (-1,), (-2,), (-2, -1))
    ) / 4  # fmt: skip
    assert torch.allclose(predict_ratio(shipped.network, x, flip_average=True), manual, rtol=1e-5)
    assert not torch.allclose(manual, single, rtol=1e-3)
    averaged = ScatterCNN(flip_average=True)
    t, m = 0.05 + 0.9 * torch.rand(1, 1, 40, 50), 30.0 * torch.rand(1, 1, 40, 50)
    assert averaged.scatter_ratio(t, m, (1.0, 1.0), 1020.0, 90.0, 50.0, 200.0).shape == (1, 1, 40, 50)


def test_training_entry_point(tmp_path):
    """One epoch of the Lightning training on the committed cases: it writes loadable weights with its record."""
    import shutil

    from torchdrr.learned.scatter_training import train

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(HELDOUT, data / "train-00000.npz")
    shutil.copy(HELDOUT, data / "heldout-00000.npz")
    out = tmp_path / "net.pt"
    record = train(data, out, epochs=1, batch_size=8, widths=(8, 8, 8, 8), device="cpu", log_dir=tmp_path / "logs",
                   progress=False)  # fmt: skip
    assert record["training_cases"] == 44 and record["validation_cases"] == 4 and record["steps_run"] == 5
    assert record["heldout"]["cases"] == 48
    loaded = ScatterCNN(out)
    assert loaded.network.widths == (8, 8, 8, 8)
    assert [stage["steps"] for stage in loaded.metadata["lineage"]] == [5]
    tuned = train(data, tmp_path / "tuned.pt", epochs=1, batch_size=8, device="cpu", log_dir=tmp_path / "logs",
                  progress=False, init=out, widths=(8, 8, 8, 8), spr_weight=2.0)  # fmt: skip
    assert [stage["spr_weight"] for stage in tuned["lineage"]] == [1.0, 2.0]  # the start's runs, then this one
    for bad, match in (({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
                       ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
                       ({"spr_weight": float("nan")}, "spr_weight must be a number >= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            train(data, tmp_path / "bad.pt", device="cpu", log_dir=tmp_path / "logs", progress=False, **bad)
    assert not (tmp_path / "bad.pt").exists()
    from torchdrr.learned.scatter_training import main

    with pytest.raises(SystemExit):  # the command: a one-line usage error
        main(["--data", str(data), "--out", str(tmp_path / "bad.pt"), "--batch-size", "0", "--device", "cpu"])
    assert loaded.metadata["heldout"]["relative_rmse"]["median"] == pytest.approx(
        record["heldout"]["relative_rmse"]["median"]
    )
