"""Layer 4: the physics of a radiograph: HU -> density, material decomposition, attenuation data, spectra.

The model and reference values are in design.md §4. ``torchdrr.DRR`` composes these modules into an X-ray image.
"""

from .density import AIR_DENSITY, MODELS, PADDING_HU, check_density, hu_to_density
from .detector import (
    DETECTOR_OUTPUTS,
    EnergyIntegratingDetector,
    PhotonCountingDetector,
    absorption_efficiency,
    falloff_factor,
)
from .materials import (
    ENERGY_RANGE_KEV,
    Material,
    attenuation_table,
    get_material,
    iodinated_contrast,
    mass_attenuation,
    material_names,
    register_material,
)
from .montecarlo import AntiScatterGrid, MonteCarloScatter, TransportResult, transport
from .noise import NOISE_METHODS, NOISE_PRESETS, Noise, NoisePreset
from .segmentation import (
    LabelMapSegmentation,
    MaterialChannels,
    ProbabilityMapSegmentation,
    SoftThresholdSegmentation,
    ThresholdSegmentation,
)
from .spectra import (
    DEFAULT_PRESET,
    KVP_RANGE,
    PRESETS,
    air_mass_energy_absorption,
    filter,
    half_value_layer,
    mean_energy,
    spectrum,
    spectrum_preset,
)

__all__ = [
    "DETECTOR_OUTPUTS",
    "EnergyIntegratingDetector",
    "AntiScatterGrid",
    "MonteCarloScatter",
    "NOISE_METHODS",
    "NOISE_PRESETS",
    "Noise",
    "NoisePreset",
    "PhotonCountingDetector",
    "absorption_efficiency",
    "falloff_factor",
    "AIR_DENSITY",
    "DEFAULT_PRESET",
    "ENERGY_RANGE_KEV",
    "KVP_RANGE",
    "MODELS",
    "PADDING_HU",
    "PRESETS",
    "LabelMapSegmentation",
    "Material",
    "MaterialChannels",
    "ProbabilityMapSegmentation",
    "SoftThresholdSegmentation",
    "ThresholdSegmentation",
    "air_mass_energy_absorption",
    "attenuation_table",
    "check_density",
    "filter",
    "get_material",
    "half_value_layer",
    "hu_to_density",
    "iodinated_contrast",
    "mass_attenuation",
    "material_names",
    "mean_energy",
    "register_material",
    "spectrum",
    "spectrum_preset",
    "TransportResult",
    "transport",
]
