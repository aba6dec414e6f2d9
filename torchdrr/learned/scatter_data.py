"""Training and held-out data of the scatter CNN: Monte Carlo scatter of the chest CT and procedural phantoms.

Each case is a C-arm view of a volume (the chest CT or a procedural torso phantom, ``make_phantom``) at a random
pose, tube voltage (60-120 kVp), filtration, source-to-detector distance, air gap and field size. For each case:

- the DRR renders the primary transmission ``T`` and the summed mass thickness on a detector 4x finer than the
  network's bins, averaged into the bins (what ``ScatterCNN`` does to a full-resolution image);
- the Monte Carlo (``torchdrr.physics.transport``) tallies the scatter in the bins, on the same material volume,
  spectrum and detector; the target is the scatter-to-flat ratio with its standard error.

A case is a pure function of ``(split, index)``. The held-out split uses other phantom seeds, other poses and tube
voltages that the training split never draws (``HELDOUT_KVP``, each with a 3 kV gap around it in training), and
more photons (its own noise is a per cent or two). Cases are written in shards of ``--shard`` cases, each written
atomically (a stopped run leaves only whole shards).

    python -m torchdrr.learned.scatter_data --split train --count 800 --out data/scatter/train --ct CT.nii.gz
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..drr import DRR
from ..geometry import Camera, carm_extrinsics, intrinsic_matrix
from ..io import Volume
from ..io.volume import bundled_ct_path
from ..io.writers import atomic_write
from ..physics.montecarlo import transport
from ..physics.scatter_data import majorant, transport_tables
from ..physics.spectra import spectrum
from .phantoms import make_phantom
from .scatter import BIN_MM, SCALAR_NAMES, spectrum_scalars

__all__ = ["CANVAS", "HELDOUT_KVP", "ScatterCase", "case_parameters", "load_cases", "simulate_cases"]

#: Every case is stored on a CANVAS x CANVAS grid of bins (its field in the top-left corner, zeros elsewhere).
CANVAS = 64
#: Tube voltages of the held-out cases; training never draws within 3 kV of them.
HELDOUT_KVP = (65.0, 80.0, 95.0, 110.0)
_KVP_GAP = 3.0
_SPLIT_SEEDS = {"train": 101, "heldout": 202}
#: The energy grid of every DRR here (the spectra of lower kVp are zero above their kVp).
_GRID_KVP = 120
#: Each phantom is seen from this many poses (a phantom takes longer to make than a case to simulate).
VIEWS_PER_PHANTOM = 4
_PHANTOM_SHAPE = (176, 176, 96)
_PHANTOM_SPACING = (2.0, 2.0, 2.5)
_FINE = 4  # DRR pixels per bin along each axis


@dataclass(frozen=True)
class ScatterCase:
    """The parameters of one case (a pure function of ``(split, index)``, see ``case_parameters``)."""

    split: str
    index: int
    source: str  #: "chest" (the CT) or "phantom"
    phantom_seed: int
    primary_deg: float
    secondary_deg: float
    translation_mm: tuple[float, float, float]
    sdd_mm: float
    sod_mm: float
    kvp: float
    filtration_mm_al: float
    bin_pitch_mm: float
    rows: int
    cols: int
    mc_seed: int


def _training_kvp(rng: np.random.Generator) -> float:
    while True:
        kvp = float(rng.uniform(60.0, 120.0))
        if all(abs(kvp - k) >= _KVP_GAP for k in HELDOUT_KVP):
            return kvp


def case_parameters(split: str, index: int) -> ScatterCase:
    """The parameters of case ``index`` of ``split`` ("train" or "heldout").

    Consecutive cases come in groups of ``VIEWS_PER_PHANTOM`` that share a volume: even groups view the chest CT,
    odd groups one phantom each (so half the cases are chest views).
    """
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_SEEDS)}, got {split!r}")
    if isinstance(index, bool) or int(index) != index or index < 0:
        raise ValueError(f"index must be a whole number >= 0, got {index!r}")
    rng = np.random.default_rng(np.random.SeedSequence([_SPLIT_SEEDS[split], int(index)]))
    group = index // VIEWS_PER_PHANTOM
    source = "chest" if group % 2 == 0 else "phantom"
    # Phantom seeds of the two splits never meet: training uses even seeds, held-out odd ones.
    phantom_seed = 2 * group + (1 if split == "heldout" else 0) + 10_000
    kvp = float(HELDOUT_KVP[index % len(HELDOUT_KVP)]) if split == "heldout" else _training_kvp(rng)
    sdd = float(rng.uniform(950.0, 1250.0))
    gap = float(rng.uniform(120.0, 320.0))  # isocenter to detector
    pitch = float(rng.uniform(0.9, 1.1) * BIN_MM)
    return ScatterCase(
        split=split,
        index=int(index),
        source=source,
        phantom_seed=phantom_seed if source == "phantom" else -1,
        primary_deg=float(rng.uniform(-90.0, 90.0)),
        secondary_deg=float(rng.uniform(-25.0, 25.0)),
        translation_mm=tuple(float(v) for v in rng.uniform(-30.0, 30.0, 3)),
        sdd_mm=sdd,
        sod_mm=sdd - gap,
        kvp=kvp,
        filtration_mm_al=float(rng.uniform(2.0, 4.5)),
        bin_pitch_mm=pitch,
        rows=int(rng.integers(30, CANVAS - 1)),
        cols=int(rng.integers(30, CANVAS - 1)),
        mc_seed=int(rng.integers(0, 2**62)),
    )


def object_detector_mm(case: ScatterCase | dict) -> float:
    """The case's object-to-detector distance (mm): from the volume's centre to the detector along the central ray
    (the isocentre sits ``sod_mm`` from the source; the volume's centre is ``translation_mm`` away from it)."""
    c = case if isinstance(case, dict) else asdict(case)
    rotation, _ = carm_extrinsics(
        c["primary_deg"], c["secondary_deg"], c["sod_mm"], torch.zeros(3, dtype=torch.float64)
    )
    axis = rotation.reshape(3, 3)[2]  # the central ray's direction in the world
    return c["sdd_mm"] - c["sod_mm"] + float(torch.tensor(c["translation_mm"], dtype=torch.float64) @ axis)


def case_camera(case: ScatterCase, isocenter: Tensor, fine: int = 1) -> Camera:
    """The case's camera: ``rows x cols`` bins of ``bin_pitch_mm`` (``fine`` x finer pixels over the same field)."""
    centre = isocenter + torch.tensor(case.translation_mm, dtype=torch.float64)
    rotation, translation = carm_extrinsics(case.primary_deg, case.secondary_deg, case.sod_mm, centre)
    pitch = case.bin_pitch_mm / fine
    k = intrinsic_matrix(case.sdd_mm, case.rows * fine, case.cols * fine, (pitch, pitch))
    return Camera(k, rotation.reshape(1, 3, 3), translation.reshape(1, 3), case.rows * fine, case.cols * fine,
                  case.sdd_mm)  # fmt: skip


class _Scene:
    """A volume's DRR, Monte Carlo tables and majorant, reused by all its views."""

    def __init__(self, volume: Volume, device: torch.device) -> None:
        self.drr = DRR(volume, spectrum=spectrum(_GRID_KVP)).to(device)
        self.densities = self.drr.material_volume().detach()[: len(self.drr.materials)]
        self.tables = transport_tables(self.drr.materials, float(self.drr.energy_keV.max()))
        self.majorant = majorant(self.densities, self.tables.total)
        self.isocenter = self.drr.volume_center


def _relative_noise(scatter: Tensor, error: Tensor) -> float:
    """The tally's relative noise over the field: sqrt(sum err^2 / sum S^2)."""
    return float(((error**2).sum() / (scatter**2).sum().clamp_min(1e-300)).sqrt())


def simulate_case(
    case: ScatterCase, scene: _Scene, photons_per_pixel: float, target_noise: float | None = None
) -> dict[str, np.ndarray]:
    """One case: binned inputs and the Monte Carlo target, on the ``CANVAS`` grid (see the module docstring).

    With ``target_noise``, a second, independent run (another seed) adds the photons that bring the scatter's
    relative noise (``sqrt(sum err^2 / sum S^2)`` over the field) below it, and the two runs are pooled.
    """
    drr = scene.drr
    energy = drr.energy_keV
    _, photons = spectrum(case.kvp, filtration_mm_al=case.filtration_mm_al)
    weights = torch.zeros(energy.numel(), dtype=torch.float64)
    weights[: photons.numel()] = photons
    fine = case_camera(case, scene.isocenter, _FINE).to(drr.device)
    with torch.no_grad():
        integrals = drr.material_line_integrals(fine)
        kwargs = {"spectrum_weights": weights, "photons_per_pixel": 1.0, "noisy": False}
        transmission = drr.detect(integrals, fine, output="flat_field", **kwargs)[:, 0]
        intensity = drr.detect(integrals, fine, output="intensity", **kwargs)[:, 0]
        mass = integrals.sum(-1).reshape(1, fine.height, fine.width).to(transmission.dtype)
    flat = intensity / transmission
    pool = lambda x: F.avg_pool2d(x.double(), _FINE)[0]  # noqa: E731
    t_bins, mass_bins, flat_bins = pool(transmission), pool(mass), pool(flat)
    bins = case_camera(case, scene.isocenter).to(drr.device)

    def run(photons: float, seed: int) -> dict[str, Tensor]:
        result = transport(
            scene.densities, drr.affine, drr.materials, bins, (energy, weights.to(energy.device)),
            photons_per_pixel=photons, detector=drr.detector, seed=seed, tables=scene.tables,
            volume_majorant=scene.majorant, progress=False,
        )  # fmt: skip
        return {"scatter": result.scatter[0], "scatter_error": result.scatter_error[0], "single": result.single[0],
                "primary": result.primary[0], "photons": photons}  # fmt: skip

    tally = run(photons_per_pixel, case.mc_seed)
    noise = _relative_noise(tally["scatter"], tally["scatter_error"])
    if target_noise is not None and noise > target_noise:
        extra = run(photons_per_pixel * ((1.1 * noise / target_noise) ** 2 - 1.0), case.mc_seed ^ 0x5CA77E4)
        n1, n2 = tally["photons"], extra["photons"]
        pooled = {k: (n1 * tally[k] + n2 * extra[k]) / (n1 + n2) for k in ("scatter", "single", "primary")}
        pooled["scatter_error"] = ((n1 * tally["scatter_error"]) ** 2 + (n2 * extra["scatter_error"]) ** 2).sqrt()
        pooled["scatter_error"] = pooled["scatter_error"] / (n1 + n2)
        tally = pooled | {"photons": n1 + n2}
    kvp, mean_energy = spectrum_scalars(energy, weights)

    def canvas(x: Tensor, fill: float = 0.0) -> np.ndarray:
        out = np.full((CANVAS, CANVAS), fill, dtype=np.float32)
        out[: case.rows, : case.cols] = x.detach().cpu().double().numpy()
        return out

    flat_bins = flat_bins.to(tally["scatter"].device)
    return {
        "transmission": canvas(t_bins, 1.0),
        "mass_thickness": canvas(mass_bins),
        "scatter_ratio": canvas(tally["scatter"] / flat_bins),
        "scatter_ratio_error": canvas(tally["scatter_error"] / flat_bins),
        "single_ratio": canvas(tally["single"] / flat_bins),
        "mc_transmission": canvas(tally["primary"] / flat_bins, 1.0),
        "scalars": np.array(
            [kvp, mean_energy, case.bin_pitch_mm, case.sdd_mm, object_detector_mm(case)], dtype=np.float32
        ),  # fmt: skip
        "field": np.array([case.rows, case.cols], dtype=np.int32),
        "photons_per_pixel": np.array(tally["photons"], dtype=np.float64),
    }


def _write_shard(path: Path, cases: list[ScatterCase], records: list[dict]) -> None:
    arrays = {key: np.stack([r[key] for r in records]) for key in records[0]}
    arrays["parameters"] = np.array(json.dumps([asdict(c) for c in cases]))
    arrays["scalar_names"] = np.array(json.dumps(list(SCALAR_NAMES)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def simulate_cases(
    split: str,
    count: int,
    out: Path,
    ct: Path | None = None,
    photons_per_pixel: float = 1e4,
    device: str | torch.device = "cuda",
    shard: int = 50,
    first: int = 0,
    max_minutes: float | None = None,
    progress: bool = True,
    target_noise: float | None = None,
) -> list[Path]:
    """Simulates cases ``first .. first + count - 1`` of ``split`` into shards ``out/{split}-{first:05d}.npz``.

    Args:
        split: "train" or "heldout".
        count: number of cases.
        out: the folder of the shards.
        ct: the chest CT (default: the bundled downsampled one).
        photons_per_pixel: Monte Carlo flat-field photons per bin.
        device: where the DRR and the Monte Carlo run.
        shard: cases per shard (each written atomically when complete).
        first: the first case index.
        max_minutes: stop after the shard that passes this budget.
        progress: a progress bar over cases.
        target_noise: add photons to each case until its scatter's relative noise is below this (``simulate_case``).

    Returns:
        The shards written.
    """
    from tqdm.auto import tqdm

    if count < 1 or shard < 1:
        raise ValueError(f"count and shard must be >= 1, got {count} and {shard}")
    device = torch.device(device)
    chest_path = Path(ct) if ct is not None else bundled_ct_path()
    if not chest_path.exists():
        raise FileNotFoundError(f"CT not found: {chest_path}")
    chest: _Scene | None = None
    phantom: tuple[int, _Scene] | None = None
    started = time.perf_counter()
    written: list[Path] = []
    cases, records = [], []
    bar = tqdm(range(first, first + count), desc=f"scatter {split}", disable=not progress)
    for index in bar:
        case = case_parameters(split, index)
        if case.source == "chest":
            if chest is None:
                chest = _Scene(Volume.load(chest_path, fix_padding=True), device)
            scene = chest
        else:
            if phantom is None or phantom[0] != case.phantom_seed:
                body = make_phantom(_PHANTOM_SHAPE, _PHANTOM_SPACING, seed=case.phantom_seed, device=device)
                affine = torch.diag(torch.tensor([*_PHANTOM_SPACING, 1.0], dtype=torch.float64))
                phantom = (case.phantom_seed, _Scene(Volume(body.hu.cpu(), affine, source="phantom"), device))
            scene = phantom[1]
        cases.append(case)
        records.append(simulate_case(case, scene, photons_per_pixel, target_noise))
        last = index == first + count - 1
        if len(cases) == shard or last:
            path = Path(out) / f"{split}-{cases[0].index:05d}.npz"
            _write_shard(path, cases, records)
            written.append(path)
            cases, records = [], []
            if max_minutes is not None and time.perf_counter() - started > 60.0 * max_minutes and not last:
                bar.close()
                print(f"stopped after {written[-1].name}: the {max_minutes:g} min budget is spent")
                break
    return written


def load_cases(paths: list[Path] | Path) -> dict[str, Tensor | list]:
    """Loads shards (files, or every ``*.npz`` in a folder) into stacked tensors plus ``parameters`` (dicts)."""
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(sorted(p.glob("*.npz")) if p.is_dir() else [p])
    files = [f for f in files if not f.name.startswith(".")]
    if not files:
        raise FileNotFoundError(f"no scatter case shards (*.npz) in {[str(p) for p in paths]}")
    parts: dict[str, list] = {}
    for f in files:
        with np.load(f) as data:
            for key in ("transmission", "mass_thickness", "scatter_ratio", "scatter_ratio_error", "single_ratio",
                        "mc_transmission", "scalars", "field", "photons_per_pixel"):  # fmt: skip
                if key not in data:
                    continue
                value = data[key]
                if value.ndim == 0:  # one photon count for the whole shard
                    value = np.full(len(data["field"]), value)
                parts.setdefault(key, []).append(torch.from_numpy(value))
            parts.setdefault("parameters", []).extend(json.loads(str(data["parameters"])))
    out: dict[str, Tensor | list] = {k: torch.cat(v) for k, v in parts.items() if k != "parameters"}
    out["parameters"] = parts["parameters"]
    if out["scalars"].shape[1] == len(SCALAR_NAMES) - 1:
        # Shards made before the object-to-detector distance was an input: it follows from each case's geometry.
        gaps = torch.tensor([[object_detector_mm(p)] for p in out["parameters"]], dtype=out["scalars"].dtype)
        out["scalars"] = torch.cat([out["scalars"], gaps], dim=1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m torchdrr.learned.scatter_data",
        description="Simulate scatter CNN cases (DRR inputs and Monte Carlo scatter) into .npz shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--split", choices=sorted(_SPLIT_SEEDS), default="train", help="which case stream")
    parser.add_argument("--count", type=int, default=800, help="number of cases")
    parser.add_argument("--first", type=int, default=0, help="index of the first case")
    parser.add_argument("--out", type=Path, required=True, help="folder of the shards")
    parser.add_argument("--ct", type=Path, default=None, help="chest CT (default: the bundled downsampled one)")
    parser.add_argument("--photons-per-pixel", type=float, default=None,
                        help="Monte Carlo flat-field photons per bin (default 1e4 train, 2e5 held-out)")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shard", type=int, default=50, help="cases per shard file")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes")
    parser.add_argument("--target-noise", type=float, default=None,
                        help="add photons until each case's scatter noise is below this "
                             "(default 0.019 for held-out)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name, value in (("--count", args.count), ("--shard", args.shard)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.first < 0:
        parser.error(f"--first must be >= 0, got {args.first}")
    if args.ct is not None and not args.ct.exists():
        parser.error(f"--ct: CT not found: {args.ct}")
    ppp = args.photons_per_pixel or (2e5 if args.split == "heldout" else 1e4)
    target = args.target_noise if args.target_noise is not None else (0.019 if args.split == "heldout" else None)
    if not (math.isfinite(ppp) and ppp > 0):
        parser.error(f"--photons-per-pixel must be a positive number, got {ppp}")
    written = simulate_cases(args.split, args.count, args.out, args.ct, ppp, args.device, args.shard, args.first,
                             args.max_minutes, not args.no_progress, target)  # fmt: skip
    print(f"wrote {len(written)} shard(s) to {args.out}")


if __name__ == "__main__":
    main()
