"""Shared fixtures: the devices the kernels are tested on, and the CT files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchdrr

FULL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest-ct" / "lidc-idri-0001.nii.gz"


def cuda_ready() -> bool:
    """A GPU is visible and this build has the CUDA kernels."""
    return torch.cuda.is_available() and bool(torchdrr.build_info()["cuda_kernels"])


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of torchdrr"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def full_ct_path() -> Path:
    if not FULL_CT.exists():
        pytest.skip(f"full-resolution chest CT not found at {FULL_CT}")
    return FULL_CT
