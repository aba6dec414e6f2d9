"""Layer 6: training-scale data: random C-arm views with random physics, rendered on the fly or written to disk.

``DRRDataset`` yields DRRs with their geometry and landmark projections; each sample is a pure function of the
dataset's seed and its index (``sampling``), so results do not depend on batching, workers or ranks.
"""

from .datamodule import DRRDataModule, IndexDataset, RenderIndices, box_landmarks
from .dataset import DRRDataset
from .generate import generate_dataset
from .sampling import PhysicsDistribution, PoseDistribution, SampleParameters, sample_parameters

__all__ = [
    "DRRDataModule",
    "DRRDataset",
    "IndexDataset",
    "RenderIndices",
    "box_landmarks",
    "generate_dataset",
    "PhysicsDistribution",
    "PoseDistribution",
    "SampleParameters",
    "sample_parameters",
]
