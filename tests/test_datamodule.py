"""DRRDataModule: the worker and main-process render paths give DRRDataset.render_batch's batches exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import cuda_ready
from torchdrr.data import DRRDataset
from torchdrr.data.datamodule import DRRDataModule, IndexDataset, RenderIndices, box_landmarks
from torchdrr.io import Volume, bundled_ct_path

SIZE = 32
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_landmarks.py"


@pytest.fixture(scope="module")
def volume() -> Volume:
    return Volume.load(bundled_ct_path(), fix_padding=True)


def make_datamodule(volume: Volume, **kwargs) -> DRRDataModule:
    options = dict(train_length=12, val_length=6, seed=3, batch_size=4, height=SIZE, width=SIZE, render_on="cpu")
    options.update(kwargs)
    return DRRDataModule(volume, landmarks=box_landmarks(volume), **options)


def reference(volume: Volume, seed: int, length: int, indices) -> dict:
    dataset = DRRDataset(volume, length=length, seed=seed, height=SIZE, width=SIZE, landmarks=box_landmarks(volume))
    return dataset.render_batch(indices)


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype, key
            assert torch.equal(x.cpu(), y.cpu()), key
        else:
            assert x == y, key


def batches(datamodule: DRRDataModule, split: str = "train") -> list[dict]:
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    return [datamodule.on_after_batch_transfer(batch, 0) for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_batches_equal_render_batch(volume, workers):
    datamodule = make_datamodule(volume, num_workers=workers)
    train = batches(datamodule)
    assert len(train) == 3
    seen = torch.cat([batch["index"] for batch in train])
    assert sorted(seen.tolist()) == list(range(12))  # shuffled, each sample once
    train_seed = DRRDataModule.split_seed(3, "train")
    for batch in train:
        assert batch["image"].shape == (4, 1, SIZE, SIZE)
        assert batch["landmarks_2d"].shape == (4, 8, 2) and batch["landmarks_visible"].shape == (4, 8)
        assert_batches_equal(batch, reference(volume, train_seed, 12, batch["index"].tolist()))
    val = batches(datamodule, "val")
    assert [batch["index"].tolist() for batch in val] == [[0, 1, 2, 3], [4, 5]]  # never shuffled
    assert_batches_equal(val[0], reference(volume, DRRDataModule.split_seed(3, "val"), 6, [0, 1, 2, 3]))


def test_val_differs_from_train_and_seed_reproduces(volume):
    datamodule = make_datamodule(volume, shuffle=False)
    train, val = batches(datamodule)[0], batches(datamodule, "val")[0]
    assert train["index"].tolist() == val["index"].tolist() == [0, 1, 2, 3]
    assert not torch.equal(train["image"], val["image"])
    assert not torch.equal(train["primary_deg"], val["primary_deg"])
    assert DRRDataModule.split_seed(3, "train") == 6 and DRRDataModule.split_seed(3, "val") == 7

    first, again = make_datamodule(volume), make_datamodule(volume)
    for a, b in zip(batches(first), batches(again), strict=True):  # same seed: same order, same samples
        assert_batches_equal(a, b)
    other = batches(make_datamodule(volume, seed=4))
    assert not torch.equal(other[0]["image"], batches(first)[0]["image"])


def test_main_process_path_equals_worker_path(volume):
    workers = make_datamodule(volume, render_on="cpu")
    main = make_datamodule(volume, render_on="main")
    index_batch = next(iter(main.train_dataloader()))
    assert set(index_batch) == {"index", "split"} and index_batch["index"].dtype == torch.int64
    for split in ("train", "val"):
        for a, b in zip(batches(workers, split), batches(main, split), strict=True):
            assert_batches_equal(a, b)
    assert main.render_device() == torch.device("cpu")


def test_render_indices_transform(volume):
    dataset = DRRDataset(volume, length=10, seed=1, height=SIZE, width=SIZE, landmarks=box_landmarks(volume))
    render = RenderIndices(dataset)
    expected = dataset.render_batch([7, 2, 5])
    assert_batches_equal(render([7, 2, 5]), expected)
    assert_batches_equal(render(torch.tensor([7, 2, 5])), expected)
    assert_batches_equal(render({"index": torch.tensor([7, 2, 5]), "split": torch.zeros(3)}), expected)
    with pytest.raises(TypeError):
        RenderIndices(IndexDataset(3))


def test_index_dataset_and_options(volume):
    loader = torch.utils.data.DataLoader(IndexDataset(5, split=1), batch_size=2)
    assert [b["index"].tolist() for b in loader] == [[0, 1], [2, 3], [4]]
    assert all(b["split"].tolist() == [1] * len(b["index"]) for b in loader)
    with pytest.raises(ValueError, match="render_on"):
        make_datamodule(volume, render_on="gpu")
    with pytest.raises(ValueError, match="device"):
        make_datamodule(volume, render_on="cpu", device="cuda")
    with pytest.raises(RuntimeError, match="render_on='cuda'"):
        make_datamodule(volume, render_on="cuda", device="cpu").render_device()
    assert make_datamodule(volume, val_length=0).val_dataloader() == []
    loader = make_datamodule(volume, num_workers=2).train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2


def test_box_landmarks(volume):
    points = box_landmarks(volume, 0.2)
    assert points.shape == (8, 3) and points.dtype == torch.float64
    assert torch.allclose(points.mean(0), volume.center)
    voxels = volume.world_to_voxel(points)
    extent = torch.tensor(volume.shape, dtype=torch.float64) - 1
    assert torch.allclose((voxels - extent / 2).abs(), 0.2 * extent.expand(8, 3))
    with pytest.raises(ValueError):
        box_landmarks(volume, 0.7)


def test_from_bundled():
    datamodule = DRRDataModule.from_bundled(train_length=4, val_length=0, batch_size=2, height=SIZE, width=SIZE)
    assert datamodule.train_dataset.landmarks[0].shape == (8, 3)
    assert datamodule.render_on == ("cuda" if cuda_ready() else "cpu")


def _load_example():
    spec = importlib.util.spec_from_file_location("train_landmarks", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_heatmaps():
    example = _load_example()
    points = torch.tensor([[[3.0, 5.0], [10.0, 2.0]]])
    target = example.heatmaps(points, torch.tensor([[True, False]]), 12, 16, 1.0)
    assert target.shape == (1, 2, 12, 16)
    assert target[0, 0, 5, 3] == 1 and target[0, 0].argmax() == 5 * 16 + 3 and target[0, 1].abs().sum() == 0
    logits = torch.full((1, 1, 12, 16), -50.0)
    logits[0, 0, 5, 3] = 50.0
    assert torch.allclose(example.soft_argmax(logits), torch.tensor([[[3.0, 5.0]]]))


def test_example_trains_and_loss_falls(tmp_path, capsys):
    """The example, through pl.Trainer with the main-process render hook on the CPU: the loss falls."""
    example = _load_example()
    argv = ["--steps", "24", "--size", "32", "--batch-size", "4", "--device", "cpu", "--render-on", "main"]
    result = example.main([*argv, "--log-dir", str(tmp_path), "--lr", "3e-3"])
    losses = result["losses"]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert result["samples"] == 24 * 4 and result["drrs_per_s"] > 0
    out = capsys.readouterr().out
    assert "DRRs/s" in out and "GPU utilisation" in out


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
def test_cuda_path_renders_on_gpu(volume):
    cpu = make_datamodule(volume, render_on="cpu", shuffle=False)
    gpu = make_datamodule(volume, render_on="cuda", shuffle=False)
    index_batch = next(iter(gpu.train_dataloader()))
    index_batch = {key: value.cuda() for key, value in index_batch.items()}
    rendered = gpu.on_after_batch_transfer(index_batch, 0)
    expected = batches(cpu)[0]
    assert rendered["image"].is_cuda and rendered["image"].shape == expected["image"].shape
    assert torch.isfinite(rendered["image"]).all()
    for key in ("index", "kvp", "noisy", "noise_seed", "landmarks_visible"):
        assert torch.equal(rendered[key].cpu(), expected[key]), key
    for key in ("K", "R", "t", "P", "landmarks_2d"):
        assert torch.allclose(rendered[key].cpu(), expected[key], rtol=1e-5, atol=1e-4), key
    # Noise streams differ between CPU and CUDA generators; the noise-free expectation must agree closely.
    assert gpu.renderer("train").dataset.device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr")
def test_cuda_path_noise_free_matches_cpu(volume):
    from torchdrr.data import PhysicsDistribution

    physics = PhysicsDistribution(noise_probability=0.0)
    cpu = batches(make_datamodule(volume, render_on="cpu", shuffle=False, physics=physics))[0]
    gpu_dm = make_datamodule(volume, render_on="cuda", shuffle=False, physics=physics)
    index_batch = {key: value.cuda() for key, value in next(iter(gpu_dm.train_dataloader())).items()}
    gpu = gpu_dm.on_after_batch_transfer(index_batch, 0)
    assert torch.allclose(gpu["image"].cpu(), cpu["image"], rtol=1e-3, atol=1e-3)


def test_workers_prepare_and_the_main_process_renders(volume):
    """The GPU path's split (workers run prepare_batch, the main process render_prepared) gives the same batches."""
    direct = make_datamodule(volume, render_on="main", shuffle=False)
    split = make_datamodule(volume, render_on="main", shuffle=False)
    dataset = split.train_dataset
    for expected in batches(direct):
        prepared = dataset.prepare_batch(expected["index"].tolist())
        assert all(group["packed"].device.type == "cpu" for group in prepared["groups"])
        assert_batches_equal(dataset.render_prepared(prepared), expected)
