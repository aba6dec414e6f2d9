"""Test geometry shared by the reference and kernel tests: affines, index-space ray cases, and exact answers
computed independently of the ray-casting code (a world-space clipper with no matrix inversion)."""

from __future__ import annotations

import math

import numpy as np
import torch

SHAPE = (5, 6, 7)
SPACING = (0.7, 0.8, 2.5)

# Affines and independent geometry helpers
# ----------------------------------------------------------------------------------------------------------


def _affine(linear: np.ndarray, translation: tuple[float, float, float]) -> torch.Tensor:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = translation
    return torch.tensor(out, dtype=torch.float64)


def _rotation() -> np.ndarray:
    # A fixed generic rotation (Rodrigues formula around a non-axis direction), so no face is world-aligned.
    axis = np.array([0.3, -0.5, 0.8])
    axis /= np.linalg.norm(axis)
    angle = 0.7
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


AFFINES = {
    "scaled": _affine(np.diag(SPACING), (10.0, -20.0, 30.0)),
    # Index axis i -> world +y, j -> world -z (flip), k -> world x.
    "permuted_flipped": _affine(
        np.array([[0.0, 0.0, SPACING[2]], [SPACING[0], 0.0, 0.0], [0.0, -SPACING[1], 0.0]]), (-5.0, 3.0, 12.0)
    ),
    "rotated": _affine(_rotation() @ np.diag(SPACING), (1.5, 2.0, -3.0)),
}


def to_world(affine: torch.Tensor, index_points: np.ndarray | list) -> torch.Tensor:
    """Map ``[..., 3]`` index-space points to world mm with the (forward) affine."""
    p = torch.as_tensor(np.asarray(index_points, dtype=np.float64))
    return p @ affine[:3, :3].T + affine[:3, 3]


def world_box_chord(
    affine: torch.Tensor, lower: np.ndarray, upper: np.ndarray, source: np.ndarray, target: np.ndarray
) -> float:
    """Length (mm) of the segment ``source -> target`` inside the world-space image of an index-space box.

    Clips against the six face planes of the parallelepiped in *world* space (plane normals from cross
    products of edge vectors), independently of the matrix inversion used by the reference. Faces count as
    inside (closed box).
    """
    a = affine.numpy()
    linear, shift = a[:3, :3], a[:3, 3]
    corner = linear @ lower + shift
    edges = [linear[:, axis] * (upper[axis] - lower[axis]) for axis in range(3)]
    t0, t1 = 0.0, 1.0
    direction = target - source
    for axis in range(3):
        normal = np.cross(edges[(axis + 1) % 3], edges[(axis + 2) % 3])
        if normal @ edges[axis] < 0:
            normal = -normal
        # Inside: 0 <= normal . (x - corner) <= normal . edge
        lo, hi = 0.0, normal @ edges[axis]
        start = normal @ (source - corner)
        rate = normal @ direction
        if rate == 0.0:
            if start < lo or start > hi:
                return 0.0
            continue
        a0, a1 = sorted(((lo - start) / rate, (hi - start) / rate))
        t0, t1 = max(t0, a0), min(t1, a1)
    return max(t1 - t0, 0.0) * float(np.linalg.norm(direction))


def outer_box_chord(affine: torch.Tensor, shape: tuple[int, ...], source, target) -> float:
    lower = np.full(3, -0.5)
    upper = np.asarray(shape, dtype=np.float64) - 0.5
    return world_box_chord(affine, lower, upper, np.asarray(source), np.asarray(target))


# Index-space rays covering the geometric cases for SHAPE = (5, 6, 7), whose outer box is
# [-0.5, 4.5] x [-0.5, 5.5] x [-0.5, 6.5]. Each entry: (name, source, target), index space.
INDEX_RAYS = [
    ("axis_i", [-3.0, 2.0, 3.0], [9.0, 2.0, 3.0]),
    ("axis_j_reversed", [1.0, 8.0, 3.3], [1.0, -2.0, 3.3]),
    ("axis_k", [2.2, 1.7, -4.0], [2.2, 1.7, 9.0]),
    ("oblique", [-2.0, -1.5, -3.0], [6.0, 7.5, 8.0]),
    ("oblique_2", [5.7, -1.1, 2.0], [-1.3, 6.2, 5.1]),
    ("grazing_face_i", [-0.3, -2.0, 1.0], [-0.3, 8.0, 5.0]),  # parallel to the i = -1/2 face, inside
    ("grazing_face_k", [-1.0, 1.0, 6.4], [6.0, 4.0, 6.4]),  # parallel to the k = K - 1/2 face, inside
    ("corner_clip", [4.0, 5.8, 0.0], [4.8, 5.0, 0.0]),  # clips the (i, j) = (4.5, 5.5) edge
    ("corner_clip_3d", [4.1, 5.9, 6.6], [4.6, 5.2, 6.1]),  # clips the far corner
    ("starts_inside", [2.0, 3.0, 3.0], [2.5, 9.0, -2.0]),
    ("ends_inside", [-4.0, -3.0, 9.0], [1.2, 2.3, 4.4]),
    ("entirely_inside", [0.1, 0.2, 0.3], [3.9, 4.8, 5.7]),
    ("inside_zero_length", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
]
MISSING_INDEX_RAYS = [
    ("parallel_outside", [-0.6, -2.0, 1.0], [-0.6, 8.0, 5.0]),
    ("line_hits_segment_short", [-5.0, 2.0, 3.0], [-1.0, 2.0, 3.0]),
    ("pointing_away", [6.0, 2.0, 3.0], [10.0, 3.0, 4.0]),
    ("skew_miss", [-2.0, 7.0, 3.0], [7.0, 5.8, 3.0]),  # passes outside the (4.5, 5.5) edge
]


def random_rays(affine: torch.Tensor, shape: tuple[int, int, int], n: int, seed: int):
    """Random float64 rays in world mm: half cross the volume from outside, half start or end inside."""
    gen = np.random.default_rng(seed)
    size = np.asarray(shape, dtype=np.float64)
    inside_a = -0.4 + gen.uniform(0, 1, size=(n, 3)) * (size - 0.2)
    inside_b = -0.4 + gen.uniform(0, 1, size=(n, 3)) * (size - 0.2)
    direction = inside_b - inside_a
    far_a = inside_a - 3.0 * direction
    far_b = inside_b + 3.0 * direction
    src = np.where(np.arange(n)[:, None] % 2 == 0, far_a, inside_a)
    tgt = np.where(np.arange(n)[:, None] % 4 < 2, far_b, inside_b)
    return to_world(affine, src), to_world(affine, tgt)
