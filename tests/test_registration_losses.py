"""Image-similarity losses for 2D/3D registration: values checked by hand, gradients, and bad inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from torchdrr.registration.losses import (
    LOSSES,
    get_loss,
    gradient_ncc,
    multiscale_ncc,
    mutual_information,
    normalized_cross_correlation,
    patch_ncc,
)

# Keyword arguments that let every loss run on the small images below.
SMALL_KW = {
    "ncc": {},
    "gncc": {},
    "patch_ncc": {"patch_size": 3},
    "multiscale_ncc": {"scales": (1, 2), "patch_size": 3},
    "mi": {"bins": 8},
}
BLOB_KW = {**SMALL_KW, "patch_ncc": {"patch_size": 7}, "multiscale_ncc": {"scales": (1, 2, 4), "patch_size": 7}}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook Pearson correlation, written out."""
    a, b = a.ravel().tolist(), b.ravel().tolist()
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb)


def blob(cx: float, cy: float, size: int = 32, width: float = 4.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))[None, None]


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Global NCC
# ---------------------------------------------------------------------------------------------------------------------


def test_ncc_matches_hand_pearson():
    a = np.array([[1.0, 2.0, 4.0], [3.0, 0.5, 7.0]])
    b = np.array([[2.0, 1.0, 5.0], [2.5, 0.0, 9.0]])
    loss = normalized_cross_correlation(torch.tensor(a)[None, None], torch.tensor(b)[None, None])
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(1 - pearson(a, b), abs=1e-12)
    assert 0.01 < loss.item() < 0.2  # not a degenerate case


def test_ncc_pools_channels_as_samples():
    x, y = rand(1, 3, 4, 5, seed=1), rand(1, 3, 4, 5, seed=2)
    loss = normalized_cross_correlation(x, y)
    assert loss.item() == pytest.approx(1 - pearson(x.numpy(), y.numpy()), abs=1e-12)


def test_ncc_identical_negated_and_affine():
    x, y = rand(2, 1, 6, 7, seed=3), rand(2, 1, 6, 7, seed=4)
    torch.testing.assert_close(normalized_cross_correlation(x, x), torch.zeros(2, dtype=x.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        normalized_cross_correlation(x, -x), torch.full((2,), 2.0, dtype=x.dtype), atol=1e-12, rtol=0
    )
    base = normalized_cross_correlation(x, y)
    assert (base > 0.5).all()
    torch.testing.assert_close(normalized_cross_correlation(x, 3.5 * y - 2.0), base, atol=1e-12, rtol=0)
    torch.testing.assert_close(normalized_cross_correlation(0.1 * x + 7, y), base, atol=1e-12, rtol=0)
    # A negative gain flips the correlation: 1 - (-r) = 2 - (1 - r).
    torch.testing.assert_close(normalized_cross_correlation(x, -2 * y), 2 - base, atol=1e-12, rtol=0)


def test_ncc_mask_equals_selected_pixels():
    x, y = rand(1, 1, 6, 7, seed=5), rand(1, 1, 6, 7, seed=6)
    mask = rand(1, 1, 6, 7, seed=7) > 0.4
    loss = normalized_cross_correlation(x, y, mask=mask)
    expected = 1 - pearson(x[mask[:, :1].expand_as(x)].numpy(), y[mask.expand_as(y)].numpy())
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert abs(loss.item() - normalized_cross_correlation(x, y).item()) > 1e-3  # the mask matters
    # Float 0/1 weights are the same mask; garbage outside the mask changes nothing.
    y_garbage = torch.where(mask, y, torch.full_like(y, 1e6))
    assert normalized_cross_correlation(x, y_garbage, mask=mask.double()).item() == pytest.approx(expected, abs=1e-12)


def test_ncc_float_weights_are_weighted_pearson():
    x, y, w = rand(1, 1, 5, 5, seed=8), rand(1, 1, 5, 5, seed=9), rand(1, 1, 5, 5, seed=10)
    xs, ys, ws = (t.ravel().numpy() for t in (x, y, w))
    mx, my = (ws * xs).sum() / ws.sum(), (ws * ys).sum() / ws.sum()
    r = (ws * (xs - mx) * (ys - my)).sum() / math.sqrt((ws * (xs - mx) ** 2).sum() * (ws * (ys - my) ** 2).sum())
    assert normalized_cross_correlation(x, y, mask=w).item() == pytest.approx(1 - r, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient NCC
# ---------------------------------------------------------------------------------------------------------------------


def sobel_np(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Valid 3x3 Sobel derivatives along x (columns) and y (rows), written out."""
    h, w = img.shape
    gx, gy = np.zeros((h - 2, w - 2)), np.zeros((h - 2, w - 2))
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            p = img[i - 1 : i + 2, j - 1 : j + 2]
            gx[i - 1, j - 1] = (p[:, 2] - p[:, 0]) @ np.array([1.0, 2.0, 1.0])
            gy[i - 1, j - 1] = (p[2, :] - p[0, :]) @ np.array([1.0, 2.0, 1.0])
    return gx, gy


def test_gncc_matches_hand_sobel():
    x, y = rand(1, 1, 6, 7, seed=11), rand(1, 1, 6, 7, seed=12)
    (fx, fy), (mx, my) = sobel_np(x[0, 0].numpy()), sobel_np(y[0, 0].numpy())
    expected = 1 - (pearson(fx, mx) + pearson(fy, my)) / 2
    assert gradient_ncc(x, y).item() == pytest.approx(expected, abs=1e-12)


def test_gncc_mask_is_eroded():
    x, y = rand(1, 1, 7, 8, seed=13), rand(1, 1, 7, 8, seed=14)
    mask = torch.zeros(1, 1, 7, 8, dtype=torch.bool)
    mask[..., 1:6, 2:8] = True  # eroded by 3x3 (and the image border): gradient rows 1..3, columns 2..5
    (fx, fy), (mx, my) = sobel_np(x[0, 0].numpy()), sobel_np(y[0, 0].numpy())
    sel = (slice(1, 4), slice(2, 6))  # in the (H-2) x (W-2) gradient grid: pixel rows 2..4, columns 3..6
    expected = 1 - (pearson(fx[sel], mx[sel]) + pearson(fy[sel], my[sel])) / 2
    assert gradient_ncc(x, y, mask=mask).item() == pytest.approx(expected, abs=1e-12)


def curved_ramp(h: int = 9, w: int = 10) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return (0.3 * xx + 0.5 * yy + 0.05 * xx * yy + 0.02 * xx**2)[None, None]


def test_gncc_offset_and_ramp():
    x = rand(2, 1, 8, 9, seed=15)
    torch.testing.assert_close(gradient_ncc(x, x + 4.2), torch.zeros(2, dtype=x.dtype), atol=1e-12, rtol=0)
    ramp = curved_ramp()
    assert gradient_ncc(ramp, ramp).item() == pytest.approx(0.0, abs=1e-12)
    assert gradient_ncc(ramp, 2 * ramp - 5).item() == pytest.approx(0.0, abs=1e-12)
    assert gradient_ncc(ramp, -ramp).item() == pytest.approx(2.0, abs=1e-12)
    # A *linear* ramp has constant gradients: no edges, no information.
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(9.0), indexing="ij")
    linear = (xx + 2 * yy).double()[None, None]
    with pytest.warns(UserWarning, match="fixed and moving image gradient are constant"):
        assert gradient_ncc(linear, linear).item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Patch and multiscale NCC
# ---------------------------------------------------------------------------------------------------------------------


def test_patch_ncc_matches_hand_windows():
    x, y = rand(1, 1, 4, 5, seed=16), rand(1, 1, 4, 5, seed=17)
    a, b = x[0, 0].numpy(), y[0, 0].numpy()
    rs = [pearson(a[i : i + 3, j : j + 3], b[i : i + 3, j : j + 3]) for i in range(2) for j in range(3)]
    assert patch_ncc(x, y, patch_size=3).item() == pytest.approx(1 - sum(rs) / len(rs), abs=1e-12)
    # One window covering the whole image is the global NCC.
    assert patch_ncc(x, y, patch_size=4)[0].item() != pytest.approx(normalized_cross_correlation(x, y).item(), abs=1e-3)
    sq_x, sq_y = x[..., :4], y[..., :4]
    assert patch_ncc(sq_x, sq_y, patch_size=4).item() == pytest.approx(
        normalized_cross_correlation(sq_x, sq_y).item(), abs=1e-12
    )


def test_patch_ncc_identical_and_flat_background():
    x = rand(2, 1, 10, 11, seed=18)
    torch.testing.assert_close(patch_ncc(x, x, patch_size=3), torch.zeros(2, dtype=x.dtype), atol=1e-12, rtol=0)
    # A blob on a flat background: the flat windows are left out, so identical images still give 0 ...
    b = blob(16, 16, width=2.0)
    b = torch.where(b > 1e-3, b, torch.zeros_like(b))
    assert patch_ncc(b, b, patch_size=5).item() == pytest.approx(0.0, abs=1e-12)
    # ... in float32 too, where the one-pass window variance of a flat window is rounding noise.
    b32 = b.float() + 100.0
    assert patch_ncc(b32, b32, patch_size=5).item() == pytest.approx(0.0, abs=1e-5)
    # A structured fixed window facing a flat moving window counts as correlation 0.
    half = b.clone()
    half[..., :, 16:] = 0
    assert 0.3 < patch_ncc(b, half, patch_size=5).item() < 0.7


def test_patch_ncc_local_gain_invariance():
    # Local NCC tolerates a slowly varying gain that global NCC does not.
    x = rand(1, 1, 16, 16, seed=19)
    gain = torch.linspace(1, 4, 16, dtype=x.dtype).view(1, 1, 1, 16)
    assert patch_ncc(x, x * gain, patch_size=3).item() < 0.02
    assert normalized_cross_correlation(x, x * gain).item() > 0.1


def test_multiscale_ncc_is_mean_of_pooled_patch_ncc():
    x, y = rand(1, 1, 12, 12, seed=20), rand(1, 1, 12, 12, seed=21)
    expected = (
        patch_ncc(x, y, patch_size=3)
        + patch_ncc(torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(y, 2), patch_size=3)
        + patch_ncc(torch.nn.functional.avg_pool2d(x, 4), torch.nn.functional.avg_pool2d(y, 4), patch_size=3)
    ) / 3
    torch.testing.assert_close(multiscale_ncc(x, y, patch_size=3), expected, atol=1e-12, rtol=0)
    assert multiscale_ncc(x, x, patch_size=3).item() == pytest.approx(0.0, abs=1e-12)


def test_multiscale_ncc_mask_does_not_leak():
    x, y = rand(1, 1, 12, 12, seed=22), rand(1, 1, 12, 12, seed=23)
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    mask[..., :, 9:] = False
    ref = multiscale_ncc(x, y, scales=(1, 2), patch_size=3, mask=mask)
    y_garbage = torch.where(mask, y, torch.full_like(y, -50.0))
    torch.testing.assert_close(multiscale_ncc(x, y_garbage, scales=(1, 2), patch_size=3, mask=mask), ref)
    assert abs(ref.item() - multiscale_ncc(x, y_garbage, scales=(1, 2), patch_size=3).item()) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Mutual information
# ---------------------------------------------------------------------------------------------------------------------


def test_mi_hand_values_with_hard_bins():
    # Values sit on the two bin centres and the kernel is narrow: the soft histogram is the hard one.
    a = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    b = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    assert mutual_information(a, a, bins=2, sigma=0.01).item() == pytest.approx(-math.log(2), abs=1e-12)
    assert mutual_information(a, b, bins=2, sigma=0.01).item() == pytest.approx(0.0, abs=1e-12)
    # 3 bins, P = [[1/4, 0, 0], [0, 1/4, 1/4], [0, 0, 1/4]] (rows: fixed), values min-max normalised to 0, 1/2, 1.
    f = torch.tensor([2.0, 4.0, 4.0, 6.0], dtype=torch.float64).view(1, 1, 1, 4)
    m = torch.tensor([-1.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(1, 1, 1, 4)
    joint = np.array([[0.25, 0, 0], [0, 0.25, 0.25], [0, 0, 0.25]])
    pf, pm = joint.sum(1), joint.sum(0)
    mi = sum(p * math.log(p / (pf[i] * pm[j])) for (i, j), p in np.ndenumerate(joint) if p > 0)
    assert mutual_information(f, m, bins=3, sigma=0.01).item() == pytest.approx(-mi, abs=1e-12)


def test_mi_hand_soft_histogram():
    # The Parzen weights written out: pixel value v -> softmax_k(-(v - c_k)^2 / (2 sigma^2)).
    f = rand(1, 1, 3, 4, seed=24)
    m = rand(1, 1, 3, 4, seed=25)
    bins, sigma = 4, 0.2
    c = np.linspace(0, 1, bins)

    def soft(v: np.ndarray) -> np.ndarray:
        v = (v - v.min()) / (v.max() - v.min())
        g = np.exp(-((v[:, None] - c) ** 2) / (2 * sigma**2))
        return g / g.sum(1, keepdims=True)

    sf, sm = soft(f.ravel().numpy()), soft(m.ravel().numpy())
    joint = sf.T @ sm / sf.shape[0]
    pf, pm = joint.sum(1), joint.sum(0)
    mi = float((joint * np.log(joint / np.outer(pf, pm))).sum())
    assert mutual_information(f, m, bins=bins, sigma=sigma).item() == pytest.approx(-mi, abs=1e-12)


def test_mi_orders_similarity_and_tolerates_monotone_maps():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = ((xx + 2 * yy) / 93).double()[None, None]
    same = mutual_information(ramp, ramp).item()
    noise = mutual_information(ramp, rand(1, 1, 32, 32, seed=26)).item()
    assert same < -1.5 and noise > 0.5 * same  # identical images share far more information than noise
    # Affine maps (either sign) are exact invariances of the min-max normalised histogram ...
    assert mutual_information(ramp, 3 * ramp + 1).item() == pytest.approx(same, abs=1e-10)
    assert mutual_information(ramp, 1 - 2 * ramp).item() == pytest.approx(same, abs=1e-10)
    # ... other monotone maps only change the binning: MI stays within 5 %.
    for mapped in (ramp**1.5, torch.exp(ramp), torch.sqrt(ramp) + ramp):
        assert mutual_information(ramp, mapped).item() == pytest.approx(same, rel=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# Common properties of every loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck(name, masked):
    fixed = rand(1, 1, 8, 9, seed=27)
    moving = rand(1, 1, 8, 9, seed=28).requires_grad_()
    mask = None
    if masked:
        mask = torch.ones(1, 1, 8, 9, dtype=torch.bool)
        mask[..., 0, :4] = False
        mask[..., 5:, 7:] = False
    loss = get_loss(name)
    assert torch.autograd.gradcheck(lambda m: loss(fixed, m, mask=mask, **SMALL_KW[name]), (moving,))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_two_channels_float_mask(name):
    fixed = rand(2, 2, 8, 9, seed=29)
    moving = rand(2, 2, 8, 9, seed=30).requires_grad_()
    mask = 0.2 + 0.8 * rand(1, 1, 8, 9, seed=31)
    loss = get_loss(name)
    assert torch.autograd.gradcheck(lambda m: loss(fixed, m, mask=mask, **SMALL_KW[name]), (moving,))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_shift_beats_two_pixel_shift(name, dtype):
    fixed = blob(16, 15).to(dtype)
    loss = get_loss(name)
    at_zero = loss(fixed, blob(16, 15).to(dtype), **BLOB_KW[name])
    for cx, cy in ((18, 15), (16, 17), (14, 13)):
        assert (at_zero < loss(fixed, blob(cx, cy).to(dtype), **BLOB_KW[name]) - 1e-3).all()


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_constant_image_is_finite_and_warns(name, which):
    x = rand(2, 1, 8, 9, seed=32)
    const = torch.full_like(x, 0.3)
    fixed, moving = (const, x) if which == "fixed" else (x, const)
    moving = moving.clone().requires_grad_()
    with pytest.warns(UserWarning, match=f"{which} image.* constant"):
        loss = get_loss(name)(fixed, moving, **SMALL_KW[name])
    assert torch.isfinite(loss).all()
    expected = 0.0 if name == "mi" else 1.0  # correlation 0 / no information
    torch.testing.assert_close(loss.detach(), torch.full_like(loss, expected), atol=1e-12, rtol=0)
    loss.sum().backward()
    assert torch.isfinite(moving.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_warning_for_ordinary_images(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_loss(name)(rand(1, 1, 8, 9, seed=33), rand(1, 1, 8, 9, seed=34), **SMALL_KW[name])


@pytest.mark.parametrize("name", list(LOSSES))
def test_batch_equals_items_and_fixed_broadcasts(name):
    fixed, moving = rand(3, 2, 8, 9, seed=35), rand(3, 2, 8, 9, seed=36)
    mask = rand(3, 1, 8, 9, seed=37) > 0.2
    loss = get_loss(name)
    batched = loss(fixed, moving, mask=mask, **SMALL_KW[name])
    assert batched.shape == (3,)
    items = torch.cat(
        [loss(fixed[i : i + 1], moving[i : i + 1], mask=mask[i : i + 1], **SMALL_KW[name]) for i in range(3)]
    )
    torch.testing.assert_close(batched, items, atol=1e-12, rtol=0)
    assert batched.std() > 1e-3  # the items differ, so a mix-up would show
    shared = loss(fixed[:1], moving, mask=mask[:1], **SMALL_KW[name])
    one_by_one = torch.cat([loss(fixed[:1], moving[i : i + 1], mask=mask[:1], **SMALL_KW[name]) for i in range(3)])
    torch.testing.assert_close(shared, one_by_one, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_agrees_with_float64(name):
    fixed, moving = rand(2, 1, 8, 9, seed=38), rand(2, 1, 8, 9, seed=39)
    loss = get_loss(name)
    ref = loss(fixed, moving, **SMALL_KW[name])
    single = loss(fixed.float(), moving.float(), **SMALL_KW[name])
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------

X = rand(2, 1, 8, 9, seed=40)
ONE_PIXEL = torch.zeros(1, 1, 8, 9, dtype=torch.bool)
ONE_PIXEL[..., 3, 3] = True

BAD_COMMON = [
    ("fixed not a tensor", lambda: (X.numpy(), X, {}), TypeError, "fixed: expected a torch.Tensor, got ndarray"),
    (
        "moving 3-d",
        lambda: (X, X[0], {}),
        ValueError,
        r"moving: expected a \[B, C, H, W\] tensor .* got shape \(1, 8, 9\)",
    ),
    ("fixed int", lambda: (X.long(), X, {}), TypeError, "fixed: expected a floating-point dtype, got torch.int64"),
    (
        "dtype mismatch",
        lambda: (X, X.float(), {}),
        TypeError,
        "moving: expected dtype torch.float64 .* got torch.float32",
    ),
    ("device mismatch", lambda: (X, X.to("meta"), {}), ValueError, "moving: expected device cpu .* got meta"),
    (
        "shape mismatch",
        lambda: (X[..., :7], X, {}),
        ValueError,
        r"fixed: expected shape \(1 or 2, 1, 8, 9\).* got \(2, 1, 8, 7\)",
    ),
    ("batch mismatch", lambda: (rand(3, 1, 8, 9), X, {}), ValueError, r"fixed: expected shape \(1 or 2"),
    (
        "channel mismatch",
        lambda: (X.expand(2, 2, 8, 9), X, {}),
        ValueError,
        r"fixed: expected shape \(1 or 2, 1, 8, 9\)",
    ),
    ("empty", lambda: (X[:0], X[:0], {}), ValueError, "fixed: expected a non-empty tensor"),
    (
        "mask shape",
        lambda: (X, X, {"mask": torch.ones(2, 1, 8, 8, dtype=torch.bool)}),
        ValueError,
        r"mask: expected shape \(1 or 2, 1, 8, 9\), got \(2, 1, 8, 8\)",
    ),
    (
        "mask channels",
        lambda: (X, X, {"mask": torch.ones(2, 2, 8, 9, dtype=torch.bool)}),
        ValueError,
        r"mask: expected shape",
    ),
    (
        "mask batch",
        lambda: (X, X, {"mask": torch.ones(3, 1, 8, 9, dtype=torch.bool)}),
        ValueError,
        r"mask: expected shape",
    ),
    (
        "mask not tensor",
        lambda: (X, X, {"mask": np.ones((2, 1, 8, 9))}),
        TypeError,
        "mask: expected a torch.Tensor or None, got ndarray",
    ),
    (
        "mask int",
        lambda: (X, X, {"mask": torch.ones(2, 1, 8, 9, dtype=torch.long)}),
        TypeError,
        "mask: expected a bool or floating-point tensor, got torch.int64",
    ),
    (
        "mask range",
        lambda: (X, X, {"mask": torch.full((2, 1, 8, 9), 2.0)}),
        ValueError,
        r"mask: expected weights in \[0, 1\], got values in \[2.0, 2.0\]",
    ),
    (
        "mask device",
        lambda: (X, X, {"mask": torch.ones(2, 1, 8, 9, device="meta")}),
        ValueError,
        "mask: expected device cpu .* got meta",
    ),
    (
        "mask one pixel",
        lambda: (X, X, {"mask": ONE_PIXEL}),
        ValueError,
        "mask: expected at least 2 valid pixels per image.*, got 1",
    ),
    (
        "mask empty",
        lambda: (X, X, {"mask": torch.zeros(1, 1, 8, 9)}),
        ValueError,
        "mask: expected at least 2 valid pixels per image.*, got 0",
    ),
]


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize(("case", "make", "error", "match"), BAD_COMMON, ids=[c[0] for c in BAD_COMMON])
def test_bad_inputs_common(name, case, make, error, match):
    fixed, moving, kw = make()
    with pytest.raises(error, match=match):
        get_loss(name)(fixed, moving, **kw, **SMALL_KW[name])


BAD_SPECIFIC = [
    (
        "patch too large",
        lambda: patch_ncc(X, X, patch_size=9),
        ValueError,
        r"patch_size: expected at most 8 \(the image is 8x9\), got 9",
    ),
    ("patch too small", lambda: patch_ncc(X, X, patch_size=1), ValueError, "patch_size: expected an int >= 2, got 1"),
    ("patch not int", lambda: patch_ncc(X, X, patch_size=3.0), ValueError, "patch_size: expected an int >= 2, got 3.0"),
    (
        "patch at coarse scale",
        lambda: multiscale_ncc(X, X, scales=(1, 4), patch_size=3),
        ValueError,
        r"patch_size: expected at most 2 \(the image at scale 4 is 2x2\), got 3",
    ),
    (
        "scales empty",
        lambda: multiscale_ncc(X, X, scales=(), patch_size=3),
        ValueError,
        r"scales: expected a non-empty sequence of ints >= 1, got \(\)",
    ),
    (
        "scales zero",
        lambda: multiscale_ncc(X, X, scales=(1, 0), patch_size=3),
        ValueError,
        r"scales: expected .* got \(1, 0\)",
    ),
    ("bins", lambda: mutual_information(X, X, bins=1), ValueError, "bins: expected an int >= 2, got 1"),
    ("sigma", lambda: mutual_information(X, X, sigma=0.0), ValueError, "sigma: expected a finite number > 0, got 0.0"),
    ("eps", lambda: normalized_cross_correlation(X, X, eps=-1.0), ValueError, "eps: expected a number >= 0, got -1.0"),
    (
        "gncc too small",
        lambda: gradient_ncc(X[..., :2, :], X[..., :2, :]),
        ValueError,
        "moving: expected images of at least 3x3 pixels .* got 2x9",
    ),
    (
        "gncc mask erodes away",
        lambda: gradient_ncc(X, X, mask=torch.ones(1, 1, 8, 9).index_fill_(2, torch.tensor([2, 5]), 0.0)),
        ValueError,
        "mask: expected at least 2 valid pixels per image after the 3x3 gradient erosion, got 0",
    ),
    (
        "single pixel image",
        lambda: normalized_cross_correlation(X[..., :1, :1], X[..., :1, :1]),
        ValueError,
        "moving: expected at least 2 valid pixels per image, got 1",
    ),
    (
        "unknown loss",
        lambda: get_loss("ssim"),
        ValueError,
        "name: expected one of gncc, mi, multiscale_ncc, ncc, patch_ncc, got 'ssim'",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "match"), BAD_SPECIFIC, ids=[c[0] for c in BAD_SPECIFIC])
def test_bad_inputs_specific(case, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_registry():
    assert set(LOSSES) == {"ncc", "gncc", "patch_ncc", "multiscale_ncc", "mi"}
    assert get_loss("ncc") is normalized_cross_correlation
    assert get_loss("mi") is mutual_information
