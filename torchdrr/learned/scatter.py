"""The scatter CNN: from the primary image and the material line integrals to the expected scatter image.

Scatter is smooth, so the network works on a coarse detector grid of about ``BIN_MM`` (7 mm) bins, whatever the
detector's pixel count: the inputs are averaged into bins, the network predicts the scatter there, and the result is
interpolated bilinearly back to full resolution. Every step is differentiable (average pooling, the network,
bilinear upsampling), so ``DRR(scatter="cnn")`` stays inside a training graph.

What the network sees, per bin (``network_inputs``):

- the polychromatic line integral ``-log T`` of the primary (``T = primary / flat field``);
- the summed mass thickness of all materials (g/cm^2), the amount of matter that scatters;
- a mask of the irradiated field (the bins are padded to a multiple of 8 with zeros: no field, no scatter);
- five numbers broadcast over the grid: the tube voltage (kVp), the mean photon energy of the beam (keV), the bin
  pitch (mm), the source-to-detector distance (mm) and the object-to-detector distance (mm, from the volume's centre
  along the central ray: the air gap, which decides how much scatter reaches the detector and which the images
  alone do not show).

It predicts the scatter-to-flat ratio ``S / I_flat``: the scatter signal per unit of the flat-field signal, which the
DRR multiplies by its flat field (N0, spectrum, detector, falloff). The training data and the command that makes the
shipped weights are in ``torchdrr.learned.scatter_data`` and ``torchdrr.learned.scatter_training``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..io.writers import atomic_write

__all__ = [
    "BIN_MM",
    "SCALAR_NAMES",
    "ScatterCNN",
    "ScatterUNet",
    "TRAINING_RANGE",
    "bundled_scatter_weights_path",
    "check_training_range",
    "network_inputs",
    "object_detector_distance",
    "spectrum_numbers",
]

#: Detector bin pitch (mm) the network works at.
BIN_MM = 7.0
#: The grid is padded to a multiple of this (three 2x poolings).
GRID_MULTIPLE = 8
#: The per-image numbers the network takes, in order, and the scale that brings each near 1.
SCALAR_NAMES = ("kvp", "mean_energy_keV", "bin_pitch_mm", "sdd_mm", "object_detector_mm")
_SCALAR_SCALES = (100.0, 50.0, BIN_MM, 1000.0, 250.0)
#: Scale of the line integral and mass thickness maps (typical chest values map near 1).
_LINE_INTEGRAL_SCALE = 4.0
_MASS_SCALE = 20.0  # g/cm^2
#: The transmission is clamped here before the log (a bin that sees no primary still has a finite input).
_MIN_TRANSMISSION = 1e-7


#: What the training cases span (``scatter_data.case_parameters``: 60-120 kVp, SDD 950-1250 mm, fields of 30-62 bins
#: of 6.3-7.7 mm), widened a little; outside these the network extrapolates and ``check_training_range`` warns.
TRAINING_RANGE = {
    "kvp": (57.0, 123.0),
    "mean_energy_keV": (33.0, 60.0),  # 60 kVp + 2 mm Al: 35 keV; 120 kVp + 4.5 mm Al: 58 keV
    "sdd_mm": (900.0, 1300.0),
    "field_mm": (150.0, 520.0),
    "bin_pitch_mm": (5.5, 9.0),
}
_UNITS = {"kvp": "kVp", "mean_energy_keV": "keV", "sdd_mm": "mm", "field_mm": "mm", "bin_pitch_mm": "mm"}
_WHAT = {
    "kvp": "tube voltage",
    "mean_energy_keV": "mean photon energy (filtration)",
    "sdd_mm": "source-to-detector distance",
    "field_mm": "detector field side",
    "bin_pitch_mm": "bin pitch (pixels coarser than the network's ~7 mm bins)",
}
#: Quantities already warned about in this process (one warning each, so a registration loop is not flooded).
_WARNED: set[str] = set()


def check_training_range(**values: float) -> list[str]:
    """Warns once per quantity (per process) when a value lies outside ``TRAINING_RANGE``; returns the messages.

    ``values``: any of ``kvp``, ``mean_energy_keV``, ``sdd_mm``, ``field_mm`` (a detector side, mm) and
    ``bin_pitch_mm``. A narrow beam is the common case: the network never saw fields under ~19 cm and overestimates
    the scatter of small ones.
    """
    messages = []
    for name, value in values.items():
        low, high = TRAINING_RANGE[name]
        if low <= float(value) <= high:
            continue
        unit = _UNITS[name]
        messages.append(
            f"ScatterCNN: {_WHAT[name]} {float(value):.4g} {unit} is outside the range it was trained on "
            f"({low:g}-{high:g} {unit}); its scatter is an extrapolation there (scatter='montecarlo' is exact)"
        )
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(messages[-1], stacklevel=3)
    return messages


def bundled_scatter_weights_path() -> Path:
    """The shipped weights of the scatter CNN (``torchdrr/assets/scatter_net.pt``; ``torchdrr.learned.scatter_training``
    has the command that reproduces them)."""
    return Path(str(resources.files("torchdrr.assets").joinpath("scatter_net.pt")))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
    )  # fmt: skip


class ScatterUNet(nn.Module):
    """A small 2D U-Net with a global-context branch, on the binned grid.

    Args:
        widths: channels of the four levels (full, 1/2, 1/4, 1/8 of the grid).
        in_channels: input maps (``network_inputs``: 3 maps + the broadcast scalars).

    ``forward(x [B, C, h, w]) -> [B, 1, h, w]`` is the log of the scatter-to-flat ratio; h and w must be multiples
    of 8 (``GRID_MULTIPLE``). The global branch averages the deepest features over the irradiated field (the mask
    channel), so every bin sees the whole field: scatter reaches across the detector.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (24, 48, 96, 128), in_channels: int = 8) -> None:
        super().__init__()
        self.widths, self.in_channels = tuple(int(w) for w in widths), int(in_channels)
        w0, w1, w2, w3 = self.widths
        self.encoders = nn.ModuleList([_block(in_channels, w0), _block(w0, w1), _block(w1, w2), _block(w2, w3)])
        self.context = nn.Sequential(nn.Linear(w3, w3), nn.SiLU(), nn.Linear(w3, w3))
        self.decoders = nn.ModuleList([_block(w3 + w2, w2), _block(w2 + w1, w1), _block(w1 + w0, w0)])
        self.head = nn.Conv2d(w0, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, math.log(0.1))  # a typical scatter-to-flat ratio behind a body

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % GRID_MULTIPLE or x.shape[-1] % GRID_MULTIPLE:
            raise ValueError(f"the grid must be a multiple of {GRID_MULTIPLE} bins, got {tuple(x.shape[-2:])}")
        mask = x[:, 2:3]
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                x = F.avg_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        deep_mask = F.avg_pool2d(mask, 8)
        pooled = (x * deep_mask).sum((-2, -1)) / deep_mask.sum((-2, -1)).clamp_min(1e-6)
        x = x + self.context(pooled)[:, :, None, None]
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
        return self.head(x)


def predict_ratio(network: ScatterUNet, inputs: Tensor, flip_average: bool = True) -> Tensor:
    """The network's scatter-to-flat ratio ``[B, 1, H', W']`` on padded inputs ``[B, 8, H', W']``.

    ``flip_average``: average the predictions of the four mirror images of the scene (one batched pass; training
    flips at random, so each mirror image is as valid as the original); this averages out some of the network's
    error.
    """
    if not flip_average:
        return network(inputs).clamp(max=5.0).exp()
    b = inputs.shape[0]
    views = torch.cat([inputs, inputs.flip(-1), inputs.flip(-2), inputs.flip(-2, -1)])
    ratio = network(views).clamp(max=5.0).exp()
    return (ratio[:b] + ratio[b : 2 * b].flip(-1) + ratio[2 * b : 3 * b].flip(-2) + ratio[3 * b :].flip(-2, -1)) / 4


def bin_grid(height: int, width: int, pixel_pitch_mm: tuple[float, float]) -> tuple[int, int]:
    """Bins ``(rows, cols)`` of about ``BIN_MM`` for an ``height x width`` detector of pitch (row, col) mm."""
    rows = max(1, round(height * float(pixel_pitch_mm[0]) / BIN_MM))
    cols = max(1, round(width * float(pixel_pitch_mm[1]) / BIN_MM))
    return min(rows, height), min(cols, width)


def network_inputs(
    transmission: Tensor, mass_thickness: Tensor, scalars: Tensor, grid: tuple[int, int] | None = None
) -> tuple[Tensor, tuple[int, int]]:
    """The network's input maps on the padded grid, from binned images.

    Args:
        transmission: ``[B, h, w]`` primary / flat field per bin (mean over the bin's pixels), in (0, 1].
        mass_thickness: ``[B, h, w]`` summed material mass thickness per bin, g/cm^2.
        scalars: ``[B, 5]`` per-image numbers in the order of ``SCALAR_NAMES`` (kVp, keV, mm, mm, mm).
        grid: the padded grid size (default: h and w rounded up to a multiple of 8).

    Returns:
        ``([B, 8, H', W'], (h, w))``: the inputs (zero outside the field) and the field's size.
    """
    b, h, w = transmission.shape
    if grid is None:
        grid = (-(-h // GRID_MULTIPLE) * GRID_MULTIPLE, -(-w // GRID_MULTIPLE) * GRID_MULTIPLE)
    line = -transmission.clamp(_MIN_TRANSMISSION, 1.0).log() / _LINE_INTEGRAL_SCALE
    mass = mass_thickness.clamp_min(0.0) / _MASS_SCALE
    mask = torch.ones_like(line)
    maps = torch.stack([line, mass, mask], dim=1)
    maps = F.pad(maps, (0, grid[1] - w, 0, grid[0] - h))
    numbers = torch.stack([scalars[:, i].to(maps) / scale for i, scale in enumerate(_SCALAR_SCALES)], dim=1)
    numbers = numbers[:, :, None, None].expand(b, len(SCALAR_NAMES), *grid)
    return torch.cat([maps, numbers], dim=1), (h, w)


def spectrum_scalars(energy_keV: Tensor, photons: Tensor) -> tuple[float, float]:
    """The tube voltage (kVp: the top of the highest bin with photons) and mean photon energy (keV) of a spectrum,
    as host numbers (``spectrum_numbers`` read back)."""
    weights = photons.detach().to("cpu", torch.float64)
    if not bool((weights > 0).any()):
        raise ValueError("the spectrum has no photons")
    kvp, mean_energy = spectrum_numbers(energy_keV.detach().to("cpu", torch.float64), weights).tolist()
    return kvp, mean_energy


def spectrum_numbers(energy_keV: Tensor, photons: Tensor) -> Tensor:
    """``[2]`` tube voltage (kVp: the top of the highest bin with photons) and mean photon energy (keV) of a spectrum,
    computed on the spectrum's device (no host copy, so a GPU render does not wait here; ``spectrum_scalars`` reads
    them back). Differentiable in ``photons`` through the mean energy."""
    weights = photons.clamp_min(0)
    energy = energy_keV.to(weights.dtype)
    step = energy[1] - energy[0] if energy.numel() > 1 else energy.new_ones(())
    kvp = torch.where(weights > 0, energy, energy.new_full((), -math.inf)).amax() + 0.5 * step
    mean_energy = (weights * energy).sum() / weights.sum()
    return torch.stack([kvp.detach(), mean_energy])


def object_detector_distance(camera, object_centre: Tensor) -> Tensor:
    """``[B]`` distance (mm) from ``object_centre`` ``[3]`` (world mm) to each camera's detector plane, along the
    central ray: SDD minus the point's depth in the camera frame (computed on the cameras' device, no host copy)."""
    rotation, translation = camera.rotation, camera.translation
    depth = rotation[:, 2] @ object_centre.to(rotation) + translation[:, 2]  # z of R c + t
    return float(camera.sdd_mm) - depth


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class _NetworkGraphs:
    """CUDA graphs of ``predict_ratio`` for inference, one per input shape (least recently used ones dropped).

    The network is about 70 small kernels on a ~50 x 60 grid, so on a GPU its eager call is bound by the host's
    kernel launches (2.4-4.6 ms on the H100 hosts measured), while the replay of a captured graph is one launch
    (about 0.6 ms of GPU work). A graph reads the parameters where they are: in-place changes (``load_state_dict``,
    an optimiser) are seen, a move (``.to``) makes a new graph.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = OrderedDict()

    def __call__(self, network: ScatterUNet, x: Tensor, flip_average: bool) -> Tensor:
        """The network's ratio for ``x``; valid until the next call with this shape (copy or consume it first)."""
        parameter = next(network.parameters())
        key = (tuple(x.shape), x.dtype, x.device, bool(flip_average), parameter.data_ptr(), parameter.dtype)
        entry = self.entries.get(key)
        if entry is None:
            static_input = x.detach().clone()
            current = torch.cuda.current_stream(x.device)
            side = torch.cuda.Stream(x.device)
            side.wait_stream(current)
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (cuDNN picks its algorithms, lazy inits run)
                    predict_ratio(network, static_input, flip_average)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                static_output = predict_ratio(network, static_input, flip_average)
            entry = (graph, static_input, static_output)
            self.entries[key] = entry
            if len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        graph, static_input, static_output = entry
        static_input.copy_(x)
        graph.replay()
        return static_output


class ScatterCNN(nn.Module):
    """The learned scatter estimate (``DRR(scatter="cnn")``): scatter-to-flat ratio from the primary image.

    Args:
        weights: a checkpoint written by ``save`` (default: the shipped weights); None with ``network`` given.
        network: a ``ScatterUNet`` to use instead of loading one.
        flip_average: average the predictions for the four mirror images of the scene (``predict_ratio``).
        cuda_graphs: on a CUDA device, run the network through a captured CUDA graph whenever no gradient is needed
            (inference: about 3x faster at 1240 x 960 on an H100, same numbers); calls that need gradients, run under
            ``torch.compile`` or inside another graph capture always run eagerly.

    The network was trained on Monte Carlo scatter (``transport``) of the chest CT and procedural torso phantoms,
    60-120 kVp, without an anti-scatter grid, energy-integrating detector: it is an estimate for such scenes.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        network: ScatterUNet | None = None,
        flip_average: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        super().__init__()
        self.flip_average = bool(flip_average)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs = _NetworkGraphs()
        self.metadata: dict = {}
        if network is None:
            network, self.metadata = _load(weights)
            # Fixed weights: gradients flow through the network to its inputs, but an optimiser over the DRR's
            # parameters does not pick the network up (call ``requires_grad_(True)`` to fine-tune it).
            network.requires_grad_(False)
        if not isinstance(network, ScatterUNet):
            raise TypeError(f"network must be a ScatterUNet, got {type(network).__name__}")
        self.network = network

    def scatter_ratio(
        self,
        transmission: Tensor,
        mass_thickness: Tensor,
        pixel_pitch_mm: tuple[float, float],
        sdd_mm: float,
        kvp: float | Tensor,
        mean_energy_keV: float | Tensor,
        object_detector_mm: float | Tensor,
    ) -> Tensor:
        """Scatter / flat-field signal ``[B, 1, H, W]`` (dimensionless) at full resolution.

        Args:
            transmission: ``[B, 1, H, W]`` primary / flat field (I / I0), in (0, 1].
            mass_thickness: ``[B, 1, H, W]`` summed mass thickness of all materials per pixel, g/cm^2.
            pixel_pitch_mm: detector pixel pitch (row, col), mm.
            sdd_mm: source-to-detector distance, mm.
            kvp: tube voltage, kVp; mean_energy_keV: mean photon energy of the beam, keV (numbers, or 0-dim
                tensors on the images' device, e.g. from ``spectrum_numbers``).
            object_detector_mm: distance from the object's centre to the detector along the central ray, mm: a
                number, or ``[B]`` (one per image) on the images' device.
        """
        if transmission.dim() != 4 or transmission.shape[1] != 1 or mass_thickness.shape != transmission.shape:
            raise ValueError(
                f"transmission and mass_thickness must both be [B, 1, H, W], got {tuple(transmission.shape)} and "
                f"{tuple(mass_thickness.shape)}"
            )
        b, _, height, width = transmission.shape
        rows, cols = bin_grid(height, width, pixel_pitch_mm)
        parameter = next(self.network.parameters())
        t = F.adaptive_avg_pool2d(transmission.to(parameter.dtype), (rows, cols))[:, 0]
        m = F.adaptive_avg_pool2d(mass_thickness.to(parameter.dtype), (rows, cols))[:, 0]
        bin_pitch = 0.5 * (height * pixel_pitch_mm[0] / rows + width * pixel_pitch_mm[1] / cols)
        field = (height * float(pixel_pitch_mm[0]), width * float(pixel_pitch_mm[1]))
        narrow = min(field) < TRAINING_RANGE["field_mm"][0]
        numbers = {"sdd_mm": sdd_mm, "field_mm": min(field) if narrow else max(field)}
        if not narrow:  # (a narrow field has narrow bins: the field's warning says it already)
            numbers["bin_pitch_mm"] = bin_pitch
        for name, value in (("kvp", kvp), ("mean_energy_keV", mean_energy_keV)):
            if not isinstance(value, Tensor):  # a device tensor is not read back (no wait); DRR checks its spectrum
                numbers[name] = value
        check_training_range(**numbers)
        # Numbers are filled on the device and tensors stay there (no host-to-device copy and no wait: the call can
        # be captured in a CUDA graph).
        columns = [
            value.to(t).reshape(-1).expand(b) if isinstance(value, Tensor) else t.new_full((b,), float(value))
            for value in (kvp, mean_energy_keV, bin_pitch, sdd_mm, object_detector_mm)
        ]
        x, _ = network_inputs(t, m, torch.stack(columns, dim=1))
        if self._graph_eligible(x):
            ratio = self._graphs(self.network, x, self.flip_average)
        else:
            ratio = predict_ratio(self.network, x, self.flip_average)
        # interpolate writes a new tensor, so a graph's output buffer is consumed here, before its next replay.
        ratio = F.interpolate(ratio[:, :, :rows, :cols], size=(height, width), mode="bilinear", align_corners=False)
        return ratio.to(transmission.dtype)

    def _graph_eligible(self, x: Tensor) -> bool:
        """Whether this call may replay a CUDA graph: on CUDA, nothing needs a gradient, not traced or captured."""
        if not (self.cuda_graphs and x.is_cuda) or _compiling() or torch.cuda.is_current_stream_capturing():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.network.parameters())):
            return False
        return True

    def forward(
        self,
        primary: Tensor,
        flat_field: Tensor,
        material_integrals: Tensor,
        camera,
        spectrum: tuple[Tensor, Tensor],
        object_centre: Tensor,
    ) -> Tensor:
        """Expected scatter signal ``[B, 1, H, W]`` in the primary's units.

        Args:
            primary: ``[B, 1, H, W]`` primary signal (e.g. keV per pixel).
            flat_field: ``[B, 1, H, W]`` the flat-field signal in the same units (no object).
            material_integrals: ``[B, M, H, W]`` mass thickness of each material, g/cm^2.
            camera: the ``Camera`` (pixel pitch and SDD are read from it).
            spectrum: ``(energy_keV [E], photons [E])`` of the beam.
            object_centre: ``[3]`` world point (mm) of the object's centre (the DRR passes its volume's centre).

        Nothing is copied to the host on the way (the camera caches its pitch): a GPU render is not held up.
        """
        if primary.dim() != 4 or primary.shape[1] != 1:
            raise ValueError(f"primary must be [B, 1, H, W] (energy-integrating), got {tuple(primary.shape)}")
        pitch = camera.pixel_spacing_mm  # (K is read from the device once per tensor: no wait per call)
        energy, photons = spectrum
        numbers = spectrum_numbers(energy.to(primary.device), photons.to(primary.device))
        transmission = primary / flat_field
        mass = material_integrals.sum(1, keepdim=True)
        gap = object_detector_distance(camera, object_centre.to(transmission.device))
        ratio = self.scatter_ratio(transmission, mass, pitch, float(camera.sdd_mm), numbers[0], numbers[1], gap)
        return ratio * flat_field

    def save(self, path: str | Path, metadata: dict | None = None, half: bool = True) -> None:
        """Writes the network (float16 weights when ``half``) and its config atomically to ``path``."""
        save_network(self.network, path, metadata if metadata is not None else self.metadata, half)


def save_network(network: ScatterUNet, path: str | Path, metadata: dict | None = None, half: bool = True) -> None:
    """Writes ``network``'s weights (float16 when ``half``), widths and ``metadata`` to ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in network.state_dict().items()}  # fmt: skip
    plain = json.loads(json.dumps(metadata or {}, default=str))  # plain types, so weights_only can load them
    payload = {"format": "torchdrr-scatter-cnn-1", "widths": list(network.widths),
               "in_channels": network.in_channels, "state_dict": state, "metadata": plain}  # fmt: skip
    atomic_write(path, lambda handle: torch.save(payload, handle))


def _load(weights: str | Path | None) -> tuple[ScatterUNet, dict]:
    path = Path(weights) if weights is not None else bundled_scatter_weights_path()
    if not path.exists():
        raise FileNotFoundError(f"scatter CNN weights not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which file, in one line
        raise ValueError(f"{path} is not a scatter CNN checkpoint (torch.load failed: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != "torchdrr-scatter-cnn-1":
        raise ValueError(f"{path} is not a scatter CNN checkpoint (format torchdrr-scatter-cnn-1)")
    network = ScatterUNet(tuple(payload["widths"]), int(payload["in_channels"]))
    network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    return network.eval(), dict(payload.get("metadata", {}))
