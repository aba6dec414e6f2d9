"""Held-out evaluation of the material network against the best HU thresholds, per material (Dice).

The thresholds get every advantage: they are fitted on training phantoms to the best mean Dice (exhaustively for the
three DeepDRR classes, by coordinate descent for all six), from per-class HU histograms, so the search sees millions
of voxels at the cost of a histogram. Scores are computed on test phantoms (seeds from ``TEST_SEED``) that neither the
network nor the thresholds saw.

Usage::

    python -m torchdrr.learned.evaluate --weights torchdrr/assets/material_net.pt --phantoms 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .phantoms import MATERIAL_CLASSES, make_phantom
from .training import TEST_SEED, dice_per_class

__all__ = [
    "DEEPDRR_GROUPS",
    "DEEPDRR_THRESHOLDS",
    "best_thresholds",
    "evaluate",
    "merge_classes",
    "threshold_labels",
]

#: DeepDRR's three classes as unions of ours: air (air, lung), soft tissue (soft tissue, contrast), bone (bone, metal).
DEEPDRR_GROUPS = ((0, 1), (2, 4), (3, 5))
DEEPDRR_THRESHOLDS = (-800.0, 350.0)
#: HU histogram range and bin width of the threshold search.
HU_RANGE = (-1100.0, 4000.0)
HU_BIN = 5.0
#: The six classes in the order of their typical HU, the order a single set of thresholds can separate them in.
HU_ORDER = (0, 1, 2, 4, 3, 5)  # air, lung, soft tissue, contrast, bone, metal


def merge_classes(labels: Tensor, groups: Sequence[Sequence[int]] = DEEPDRR_GROUPS) -> Tensor:
    """Labels of our classes mapped to the index of the group holding them (e.g. DeepDRR's three classes)."""
    lookup = torch.empty(max(max(g) for g in groups) + 1, dtype=torch.long, device=labels.device)
    for index, group in enumerate(groups):
        lookup[list(group)] = index
    return lookup[labels]


def threshold_labels(hu: Tensor, thresholds: Sequence[float], order: Sequence[int] | None = None) -> Tensor:
    """Labels from increasing HU thresholds: ``hu < t0`` -> ``order[0]``, ``t0 <= hu < t1`` -> ``order[1]``, ...
    (``order`` default 0, 1, 2, ...)."""
    edges = torch.tensor(list(thresholds), dtype=hu.dtype, device=hu.device)
    bucket = torch.bucketize(hu, edges, right=True)
    if order is None:
        return bucket
    return torch.tensor(list(order), device=hu.device)[bucket]


def _histograms(phantoms: Sequence[tuple[Tensor, Tensor]], num_classes: int) -> Tensor:
    """Per-class voxel counts per HU bin ``[C, bins]`` (float64), HU clamped into ``HU_RANGE``."""
    bins = int((HU_RANGE[1] - HU_RANGE[0]) / HU_BIN)
    counts = torch.zeros(num_classes, bins, dtype=torch.float64)
    for hu, labels in phantoms:
        index = ((hu.double().clamp(*HU_RANGE) - HU_RANGE[0]) / HU_BIN).long().clamp_max(bins - 1)
        flat = (labels.long() * bins + index).flatten().cpu()
        counts += torch.bincount(flat, minlength=num_classes * bins).reshape(num_classes, bins).double()
    return counts


def _dice_from_histograms(counts: Tensor, cuts: Sequence[int], order: Sequence[int]) -> Tensor:
    """Dice per class when bins ``[cuts[k-1], cuts[k])`` are labelled ``order[k]`` (cuts are bin indices)."""
    bounds = [0, *cuts, counts.shape[1]]
    dice = torch.ones(counts.shape[0], dtype=torch.float64)
    truth = counts.sum(1)
    for k, c in enumerate(order):
        inside = counts[:, bounds[k] : bounds[k + 1]].sum(1)  # voxels of each class labelled c
        predicted = inside.sum()
        if truth[c] + predicted > 0:
            dice[c] = 2 * inside[c] / (truth[c] + predicted)
    return dice


def best_thresholds(
    phantoms: Sequence[tuple[Tensor, Tensor]], groups: Sequence[Sequence[int]] | None = None
) -> tuple[tuple[float, ...], Tensor]:
    """The HU thresholds with the best mean Dice on ``phantoms`` (``(hu, labels)`` pairs).

    Args:
        phantoms: training phantoms.
        groups: classes merged into groups first (``DEEPDRR_GROUPS``: two thresholds, searched exhaustively), or
            None for all six classes in ``HU_ORDER`` (five thresholds, coordinate descent from the HU midpoints).

    Returns:
        The thresholds (HU, increasing) and the per-class (or per-group) Dice they reach on ``phantoms``.
    """
    if groups is not None:
        merged = [(hu, merge_classes(labels, groups)) for hu, labels in phantoms]
        counts = _histograms(merged, len(groups))
        order = list(range(len(groups)))
    else:
        counts = _histograms(phantoms, len(MATERIAL_CLASSES))
        order = list(HU_ORDER)
    bins = counts.shape[1]
    cuts = [bins * (k + 1) // len(order) for k in range(len(order) - 1)]
    best = _dice_from_histograms(counts, cuts, order).mean()
    candidates = range(1, bins)
    for _sweep in range(6):  # coordinate descent; for two thresholds a full sweep per coordinate is exhaustive enough
        improved = False
        for k in range(len(cuts)):
            low = cuts[k - 1] + 1 if k > 0 else 1
            high = cuts[k + 1] - 1 if k + 1 < len(cuts) else bins - 1
            for cut in candidates[low - 1 : high]:
                trial = [*cuts[:k], cut, *cuts[k + 1 :]]
                score = _dice_from_histograms(counts, trial, order).mean()
                if score > best + 1e-12:
                    best, cuts, improved = score, trial, True
        if not improved:
            break
    thresholds = tuple(HU_RANGE[0] + HU_BIN * c for c in cuts)
    return thresholds, _dice_from_histograms(counts, cuts, order)


def evaluate(
    segment,
    test_phantoms: int = 16,
    fit_phantoms: int = 16,
    shape: Sequence[int] = (176, 176, 64),
    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
    device: str = "cpu",
) -> dict:
    """Dice per material of ``segment`` (HU ``[I, J, K]`` -> labels ``[I, J, K]``) against the thresholds.

    Args:
        segment: the method under test, e.g. ``lambda hu: network_segmentation.memberships(hu).argmax(0)``.
        test_phantoms: held-out phantoms (seeds from ``TEST_SEED``).
        fit_phantoms: training phantoms the thresholds are fitted on (seeds 0 ..).
        shape, spacing_mm: phantom size (voxels) and voxel size (mm).
        device: where phantoms are made.

    Returns:
        ``{"classes", "groups", "thresholds": {...}, "dice": {method: {class: mean Dice}}, "dice_deepdrr_classes":
        {...}}``, means over the test phantoms.
    """
    fit = [tuple(make_phantom(shape, spacing_mm, seed=s, device=device))[:2] for s in range(fit_phantoms)]
    six_thresholds, _ = best_thresholds(fit)
    three_thresholds, _ = best_thresholds(fit, DEEPDRR_GROUPS)
    del fit
    six, three = {}, {}
    for seed in range(TEST_SEED, TEST_SEED + test_phantoms):
        hu, labels = tuple(make_phantom(shape, spacing_mm, seed=seed, device=device))[:2]
        predicted = segment(hu).to(labels.device)
        methods = {
            "network": predicted,
            "best thresholds": threshold_labels(hu, six_thresholds, HU_ORDER),
        }
        for name, result in methods.items():
            six.setdefault(name, []).append(dice_per_class(result.cpu(), labels.cpu(), len(MATERIAL_CLASSES)))
        truth3 = merge_classes(labels)
        merged = {
            "network": merge_classes(predicted),
            "best thresholds": threshold_labels(hu, three_thresholds),
            "DeepDRR thresholds (-800, 350)": threshold_labels(hu, DEEPDRR_THRESHOLDS),
        }
        for name, result in merged.items():
            three.setdefault(name, []).append(dice_per_class(result.cpu(), truth3.cpu(), len(DEEPDRR_GROUPS)))
    names3 = ("air + lung", "soft tissue + contrast", "bone + metal")
    return {
        "classes": list(MATERIAL_CLASSES),
        "test_phantoms": test_phantoms,
        "thresholds": {"six classes": list(six_thresholds), "DeepDRR classes": list(three_thresholds)},
        "dice": {m: dict(zip(MATERIAL_CLASSES, torch.stack(v).mean(0).tolist(), strict=True)) for m, v in six.items()},
        "dice_deepdrr_classes": {
            m: dict(zip(names3, torch.stack(v).mean(0).tolist(), strict=True)) for m, v in three.items()
        },  # fmt: skip
    }


def markdown(result: dict) -> str:
    """The evaluation as two Markdown tables (six classes; DeepDRR's three)."""
    lines = ["| method | " + " | ".join(result["classes"]) + " | mean |", "|---" * (len(result["classes"]) + 2) + "|"]

    def row(method: str, scores: dict) -> str:
        values = list(scores.values())
        return f"| {method} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values) / len(values):.3f} |"

    lines += [row(method, scores) for method, scores in result["dice"].items()]
    names = list(next(iter(result["dice_deepdrr_classes"].values())))
    lines += ["", "| method | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    lines += [row(method, scores) for method, scores in result["dice_deepdrr_classes"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from .network import NetworkSegmentation

    parser = argparse.ArgumentParser(prog="python -m torchdrr.learned.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--weights", type=Path, default=Path("torchdrr/assets/material_net.pt"))
    parser.add_argument("--phantoms", type=int, default=16, help="held-out test phantoms")
    parser.add_argument("--fit-phantoms", type=int, default=16, help="phantoms the thresholds are fitted on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the scores")
    args = parser.parse_args(argv)
    segmentation = NetworkSegmentation.from_checkpoint(args.weights, device=args.device)

    def segment(hu: Tensor) -> Tensor:
        return segmentation.memberships(hu).argmax(0)

    result = evaluate(segment, args.phantoms, args.fit_phantoms, device=args.device)
    print(markdown(result))
    print("thresholds:", json.dumps(result["thresholds"]))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
