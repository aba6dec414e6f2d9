"""Learned models: a 3D network that splits a CT into materials where HU thresholds fail, and the scatter CNN.

- ``phantoms``: procedural torso phantoms with known materials (the training data).
- ``network``: ``MaterialUNet`` (a small 3D U-Net), sliding-window inference, ``NetworkSegmentation`` (a DRR
  segmentation module) and its checkpoints.
- ``training``: the Lightning module and the command that trains the shipped weights.
- ``evaluate``: Dice per material on held-out phantoms against the best HU thresholds.
- ``inference``: segmenting a real CT at the network's voxel size and back on the CT's grid.

Learned scatter:

- ``scatter``: ``ScatterCNN`` (``DRR(scatter="cnn")``) and its ``ScatterUNet``.
- ``scatter_data``: Monte Carlo training and held-out cases; ``scatter_training``: the Lightning training.
"""

from .network import MaterialUNet, NetworkSegmentation, sliding_window_logits
from .phantoms import MATERIAL_CLASSES, Phantom, PhantomOptions, make_phantom
from .scatter import ScatterCNN, ScatterUNet

__all__ = [
    "MATERIAL_CLASSES",
    "MaterialUNet",
    "NetworkSegmentation",
    "Phantom",
    "PhantomOptions",
    "ScatterCNN",
    "ScatterUNet",
    "make_phantom",
    "sliding_window_logits",
]
