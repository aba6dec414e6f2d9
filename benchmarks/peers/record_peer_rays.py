"""Record DiffDRR's and nanodrr's own rays for a few poses, in the CT's RAS+ world, as a test fixture.

Run with the peers' interpreter (see README.md in this folder)::

    .venv-peers/bin/python benchmarks/peers/record_peer_rays.py [--out tests/data/peer_rays.json]

Only the peers' public APIs are called (nothing of theirs is copied). The volume is a tiny synthetic CT with an
oblique, anisotropic, non-centred affine, given to both peers as a torchio ``ScalarImage``. Rays are computed in
float64 (the peers' modules are moved to float64) so that the fixture is exact to ~1e-12 mm; the pixel pitches are
binary fractions because DiffDRR first stores them in a float32 tensor (2.1 mm would be off by ~4e-7 mm).

* DiffDRR: ``read(image, orientation=o)`` (centres the volume at the origin), ``DRR(..., reverse_x_axis=...)``,
  ``drr.detector(convert(rotation, translation, ...), None)``; the centred world is shifted back by torchio's
  ``get_center()`` (the shift ``read`` applied) to give RAS mm of the affine.
* nanodrr: ``Subject.from_images(image)``, ``make_k_inv``/``DRR`` for the detector, ``make_rt_inv(rotation,
  translation, orientation=o, isocenter=subject.isocenter)``, rays = ``transform_point(rt_inv, drr.src / drr.tgt)``;
  nanodrr's world is already RAS mm of the affine.

Each record: the peer, its pose inputs, detector (height, width, delx, dely, sdd), and ``source`` ``[3]`` and
``targets`` ``[H * W, 3]`` (the peer's pixel order: row-major over the peer's own rows and columns).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

SDD = 1020.0
SHAPE = (6, 5, 4)


def synthetic_affine() -> np.ndarray:
    """Oblique (rotated), anisotropic voxel -> RAS affine with the volume far from the origin."""
    a, b = math.radians(20.0), math.radians(-10.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-37.25, 61.5, -181.0]
    return affine


def make_image(affine: np.ndarray):
    from torchio import ScalarImage

    gen = torch.Generator().manual_seed(0)
    data = torch.randint(-1000, 1500, (1, *SHAPE), generator=gen).to(torch.float32)
    return ScalarImage(tensor=data, affine=affine)


def _list(x: torch.Tensor) -> list:
    return x.detach().to(torch.float64).cpu().tolist()


def record_diffdrr(affine: np.ndarray, rng: np.random.Generator) -> list[dict]:
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.pose import convert

    cases = [
        # orientation, reverse_x_axis, parameterization, degrees, (H, W, delx, dely)
        ("AP", True, "euler_angles", True, (7, 9, 2.125, 1.75)),
        ("AP", True, "euler_angles", False, (8, 6, 1.375, 2.375)),
        ("AP", False, "euler_angles", True, (7, 9, 2.125, 1.75)),
        ("PA", True, "euler_angles", True, (7, 9, 2.125, 1.75)),
        ("PA", False, "matrix", False, (6, 7, 1.875, 1.25)),
        (None, True, "euler_angles", True, (7, 9, 2.125, 1.75)),
        ("AP", True, "matrix", False, (7, 9, 2.125, 1.75)),
    ]
    records = []
    for orientation, reverse_x_axis, parameterization, degrees, (h, w, delx, dely) in cases:
        image = make_image(affine)
        center = [float(v) for v in image.get_center()]  # the shift read(center_volume=True) applies
        subject = read(image, orientation=orientation)
        drr = DRR(subject, sdd=SDD, height=h, delx=delx, width=w, dely=dely, reverse_x_axis=reverse_x_axis)
        drr = drr.to(torch.float64)
        angles = rng.uniform([-180, -40, -40], [180, 40, 40])
        if not degrees:
            angles = np.deg2rad(angles)
        translation = np.array([0.0, 850.0, 0.0]) + rng.uniform(-60, 60, 3)
        rot = torch.tensor(angles[None], dtype=torch.float64)
        trans = torch.tensor(translation[None], dtype=torch.float64)
        rec = {"peer": "diffdrr", "orientation": orientation, "reverse_x_axis": reverse_x_axis}
        if parameterization == "matrix":
            # DiffDRR's "matrix" takes a full 4x4 pose; build one from random ZXY angles with DiffDRR itself.
            pose = convert(rot, trans, parameterization="euler_angles", convention="ZXY", degrees=degrees)
            rec.update(parameterization="matrix", convention=None, degrees=False, rotation=_list(pose.matrix[0]))
            rec["translation"] = None
            pose = convert(pose.matrix, parameterization="matrix")
        else:
            pose = convert(rot, trans, parameterization="euler_angles", convention="ZXY", degrees=degrees)
            rec.update(parameterization="euler_angles", convention="ZXY", degrees=degrees)
            rec.update(rotation=_list(rot[0]), translation=_list(trans[0]))
        source, targets = drr.detector(pose, None)
        shift = torch.tensor(center, dtype=torch.float64)
        rec.update(height=h, width=w, delx=delx, dely=dely, sdd=SDD, volume_center=center)
        rec.update(source=_list(source[0, 0] + shift), targets=_list(targets[0] + shift))
        records.append(rec)
    return records


def record_nanodrr(affine: np.ndarray, rng: np.random.Generator) -> list[dict]:
    from nanodrr.camera import make_k_inv, make_rt_inv
    from nanodrr.data import Subject
    from nanodrr.drr import DRR
    from nanodrr.geometry import transform_point

    subject = Subject.from_images(make_image(affine))
    iso = subject.isocenter.to(torch.float64)  # nanodrr keeps it in float32; record the value it uses
    cases = [
        ("AP", (7, 9, 2.125, 1.75)),
        ("AP", (8, 6, 1.375, 2.375)),
        ("PA", (7, 9, 2.125, 1.75)),
        ("PA", (6, 7, 1.875, 1.25)),
        (None, (7, 9, 2.125, 1.75)),
        ("AP", (7, 9, 2.125, 1.75)),
    ]
    records = []
    for orientation, (h, w, delx, dely) in cases:
        k_inv = make_k_inv(SDD, delx, dely, 0.0, 0.0, h, w, dtype=torch.float64)
        drr = DRR(k_inv, torch.tensor([SDD], dtype=torch.float64), h, w)
        angles = rng.uniform([-180, -40, -40], [180, 40, 40])
        translation = np.array([0.0, 850.0, 0.0]) + rng.uniform(-60, 60, 3)
        rot = torch.tensor(angles[None], dtype=torch.float64)
        trans = torch.tensor(translation[None], dtype=torch.float64)
        rt_inv = make_rt_inv(rot, trans, orientation=orientation, isocenter=iso)
        source = transform_point(rt_inv, drr.src[:1].expand(1, 1, 3))[0, 0]
        targets = transform_point(rt_inv, drr.tgt[:1])[0]
        records.append(
            {
                "peer": "nanodrr",
                "orientation": orientation,
                "rotation": _list(rot[0]),
                "translation": _list(trans[0]),
                "isocenter": _list(iso),
                "rt_inv": _list(rt_inv[0]),
                "height": h,
                "width": w,
                "delx": delx,
                "dely": dely,
                "sdd": SDD,
                "source": _list(source),
                "targets": _list(targets),
            }
        )
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[2] / "tests" / "data" / "peer_rays.json"
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    from importlib.metadata import version

    rng = np.random.default_rng(args.seed)
    affine = synthetic_affine()
    out = {
        "about": "Peer rays (world RAS mm of `affine`) written by benchmarks/peers/record_peer_rays.py",
        "versions": {
            "diffdrr": version("diffdrr"),
            "nanodrr": version("nanodrr"),
            "torch": torch.__version__,
        },
        "affine": affine.tolist(),
        "shape": list(SHAPE),
        "records": record_diffdrr(affine, rng) + record_nanodrr(affine, rng),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(out['records'])} records to {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
