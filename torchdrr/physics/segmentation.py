"""Material decomposition of a CT volume into per-material density channels.

Every module returns ``MaterialChannels(densities, materials)``: ``densities`` is [M, I, J, K] with channel m equal
to rho(HU) * fraction_m (g/cm^3), where rho comes from ``torchdrr.physics.density.hu_to_density`` and fraction_m is
the voxel's membership of material m; ``materials`` holds the M material names in channel order. Multiplying channel
m by mass_attenuation(materials[m], E) and summing gives the linear attenuation coefficient (1/cm) at energy E.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from torchdrr.physics.density import check_density, hu_to_density
from torchdrr.physics.materials import get_material

__all__ = [
    "LabelMapSegmentation",
    "MaterialChannels",
    "ProbabilityMapSegmentation",
    "SoftThresholdSegmentation",
    "ThresholdSegmentation",
]

DEFAULT_THRESHOLDS = (-800.0, 350.0)
DEFAULT_MATERIALS = ("air", "soft tissue", "cortical bone")


class MaterialChannels(NamedTuple):
    """Per-material density channels: ``densities`` [M, I, J, K] in g/cm^3 and the M ``materials`` names."""

    densities: Tensor
    materials: tuple[str, ...]


def _validate_materials(materials: Sequence[str], name: str = "materials") -> tuple[str, ...]:
    if isinstance(materials, str) or not isinstance(materials, Sequence):
        raise TypeError(f"{name} must be a sequence of material names")
    names = tuple(get_material(m).name for m in materials)  # raises ValueError listing the valid names
    if len(set(names)) != len(names):
        raise ValueError(f"{name} must not repeat a material, got {names}")
    return names


def _validate_thresholds(thresholds: Sequence[float], n_materials: int) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if len(values) != n_materials - 1:
        raise ValueError(f"thresholds: need len(materials) - 1 = {n_materials - 1} values, got {len(values)}")
    if any(b <= a for a, b in zip(values[:-1], values[1:], strict=True)):
        raise ValueError(f"thresholds must be strictly increasing (HU), got {values}")
    return values


def _check_volume(hu: Tensor, name: str = "hu") -> None:
    if not isinstance(hu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(hu).__name__}")
    if hu.dim() != 3:
        raise ValueError(f"{name} must have shape [I, J, K], got {tuple(hu.shape)}")


def _density(hu: Tensor, density: Tensor | None) -> Tensor:
    if density is None:
        return hu_to_density(hu)
    if density.shape != hu.shape:
        raise ValueError(f"density must have the shape of hu {tuple(hu.shape)}, got {tuple(density.shape)}")
    return check_density(density)


class ThresholdSegmentation(nn.Module):
    """Hard HU thresholds: material 0 for HU <= t0, material k for t_{k-1} < HU <= t_k, the last above t_{M-2}.

    Args:
        thresholds: M - 1 strictly increasing HU thresholds.
        materials: M registered material names, lowest HU first.
    """

    def __init__(
        self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, materials: Sequence[str] = DEFAULT_MATERIALS
    ) -> None:
        super().__init__()
        self.materials = _validate_materials(materials)
        self.register_buffer(
            "thresholds", torch.tensor(_validate_thresholds(thresholds, len(self.materials)), dtype=torch.float64)
        )

    def memberships(self, hu: Tensor) -> Tensor:
        """[M, I, J, K] one-hot memberships (same dtype as ``hu``) of an [I, J, K] HU volume."""
        _check_volume(hu)
        index = torch.bucketize(hu.detach(), self.thresholds.to(hu.device, hu.dtype), right=False)
        return nn.functional.one_hot(index, len(self.materials)).movedim(-1, 0).to(hu.dtype)

    def forward(self, hu: Tensor, density: Tensor | None = None) -> MaterialChannels:
        """Split an [I, J, K] HU volume into [M, I, J, K] density channels (g/cm^3).

        ``density`` ([I, J, K], g/cm^3, >= 0) overrides the HU-to-density conversion. Differentiable in ``hu``
        through the density only (memberships are piecewise constant).
        """
        _check_volume(hu)
        return MaterialChannels(self.memberships(hu) * _density(hu, density), self.materials)


class SoftThresholdSegmentation(nn.Module):
    """Sigmoid memberships with learnable thresholds.

    With s_k = sigmoid((HU - t_k) / temperature), s_{-1} = 1 and s_{M-1} = 0, membership_k = s_{k-1} - s_k; the
    memberships sum to 1 and tend to ``ThresholdSegmentation``'s as temperature -> 0 (away from the thresholds).
    Memberships can go negative if the learned thresholds cross; ``forward`` refuses that.

    Args:
        thresholds: M - 1 strictly increasing HU thresholds (initial values of an ``nn.Parameter``).
        materials: M registered material names, lowest HU first.
        temperature: Sigmoid width in HU (> 0).
    """

    def __init__(
        self,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        materials: Sequence[str] = DEFAULT_MATERIALS,
        temperature: float = 25.0,
    ) -> None:
        super().__init__()
        self.materials = _validate_materials(materials)
        values = _validate_thresholds(thresholds, len(self.materials))
        if not (float(temperature) > 0):
            raise ValueError(f"temperature must be > 0 HU, got {temperature!r}")
        self.temperature = float(temperature)
        self.thresholds = nn.Parameter(torch.tensor(values, dtype=torch.float64))

    def memberships(self, hu: Tensor) -> Tensor:
        """[M, I, J, K] soft memberships (dtype of ``hu``), differentiable in ``hu`` and the thresholds."""
        _check_volume(hu)
        t = self.thresholds.to(hu.dtype)
        if t.numel() > 1 and bool((t[1:] <= t[:-1]).any()):
            raise ValueError(f"thresholds must stay strictly increasing (HU), got {t.detach().tolist()}")
        s = torch.sigmoid((hu.unsqueeze(0) - t.view(-1, 1, 1, 1)) / self.temperature)
        ones = torch.ones_like(hu).unsqueeze(0)
        upper = torch.cat([ones, s], dim=0)
        lower = torch.cat([s, torch.zeros_like(ones)], dim=0)
        return upper - lower

    def forward(self, hu: Tensor, density: Tensor | None = None) -> MaterialChannels:
        """Split an [I, J, K] HU volume into [M, I, J, K] density channels (g/cm^3); see ``ThresholdSegmentation``."""
        _check_volume(hu)
        return MaterialChannels(self.memberships(hu) * _density(hu, density), self.materials)


class LabelMapSegmentation(nn.Module):
    """Materials from an integer label map.

    Args:
        label_names: Label value -> registered material name. Channels follow the order of this mapping.
    """

    def __init__(self, label_names: Mapping[int, str]) -> None:
        super().__init__()
        if not isinstance(label_names, Mapping) or not label_names:
            raise ValueError("label_names must be a non-empty mapping of int label -> material name")
        labels = []
        for label in label_names:
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f"label_names keys must be ints, got {label!r}")
            labels.append(label)
        self.materials = _validate_materials(list(label_names.values()), "label_names")
        self.register_buffer("labels", torch.tensor(labels, dtype=torch.int64))
        self.register_buffer(
            "nominal_density", torch.tensor([get_material(m).density for m in self.materials], dtype=torch.float64)
        )

    def forward(self, labels: Tensor, hu: Tensor | None = None, density: Tensor | None = None) -> MaterialChannels:
        """[M, I, J, K] density channels (g/cm^3) from an [I, J, K] integer label map.

        The density is ``density`` if given, else rho(``hu``) if ``hu`` is given, else each material's nominal
        density (float64). Every label in the map must be listed in ``label_names``.
        """
        _check_volume(labels, "labels")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        known = self.labels.to(labels.device)
        onehot = labels.to(torch.int64).unsqueeze(0) == known.view(-1, 1, 1, 1)
        if not bool(onehot.any(0).all()):
            unknown = torch.unique(labels[~onehot.any(0)]).tolist()
            raise ValueError(f"labels contains values {unknown[:10]} not in label_names {known.tolist()}")
        if density is None and hu is None:
            nominal = self.nominal_density.to(labels.device).view(-1, 1, 1, 1)
            return MaterialChannels(onehot.to(torch.float64) * nominal, self.materials)
        if hu is not None:
            _check_volume(hu)
            if hu.shape != labels.shape:
                raise ValueError(f"hu must have the shape of labels {tuple(labels.shape)}, got {tuple(hu.shape)}")
            rho = _density(hu, density)
        else:
            if density.shape != labels.shape:
                raise ValueError(f"density must have the shape of labels {tuple(labels.shape)}")
            rho = check_density(density)
        return MaterialChannels(onehot.to(rho.dtype) * rho, self.materials)


class ProbabilityMapSegmentation(nn.Module):
    """Materials from probability maps (e.g. a segmentation network's softmax output).

    Args:
        materials: M registered material names, one per probability channel.
    """

    def __init__(self, materials: Sequence[str]) -> None:
        super().__init__()
        self.materials = _validate_materials(materials)

    def forward(self, probabilities: Tensor, hu: Tensor, density: Tensor | None = None) -> MaterialChannels:
        """[M, I, J, K] density channels: ``probabilities`` [M, I, J, K] (each in [0, 1]) times rho(``hu``) [I, J, K].

        Probabilities are not renormalised, so channels that sum to less than 1 leave part of the voxel empty.
        Differentiable in ``probabilities`` and ``hu``.
        """
        _check_volume(hu)
        if not isinstance(probabilities, Tensor) or probabilities.dim() != 4:
            raise ValueError("probabilities must be a tensor of shape [M, I, J, K]")
        if probabilities.shape != (len(self.materials), *hu.shape):
            raise ValueError(
                f"probabilities must have shape {(len(self.materials), *hu.shape)}, got {tuple(probabilities.shape)}"
            )
        with torch.no_grad():
            if probabilities.numel() and not bool(((probabilities >= 0) & (probabilities <= 1)).all()):
                raise ValueError("probabilities must lie in [0, 1]")
        return MaterialChannels(probabilities * _density(hu, density), self.materials)
