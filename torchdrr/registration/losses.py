"""Image-similarity losses for 2D/3D registration (DRR vs. X-ray).

Every loss takes a ``fixed`` image (the X-ray, usually constant data) and a ``moving`` image (the DRR rendered at
the current pose estimate), both ``[B, C, H, W]`` floating-point tensors, and returns a ``[B]`` tensor of losses
to *minimise* (lower = more similar), so ``loss.sum().backward()`` drives a pose optimiser. ``fixed`` may have a
batch of 1, shared by every ``moving`` image.

An optional ``mask`` of shape ``[B or 1, 1, H, W]`` (bool, or float weights in ``[0, 1]``) marks the valid pixels
(e.g. the collimated field); statistics are weighted by it, so masked-out pixels do not count. The mask is shared
by all channels, and channels are pooled as extra samples (one similarity per image, not per channel).

Constant images (zero variance) make the correlation 0/0. The losses never return NaN for them: the correlation is
taken as 0 (no information), the loss is finite with a finite gradient, and one ``UserWarning`` per call names the
constant image.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "get_loss",
    "gradient_ncc",
    "multiscale_ncc",
    "mutual_information",
    "normalized_cross_correlation",
    "patch_ncc",
]

# Sobel kernel for d/dx (along W); its transpose is d/dy. Scaled by 1/8 like kornia's normalised Sobel, although
# the scale does not matter: NCC is invariant to it.
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------

#: Whether the losses read values back to the host to check them (mask range, valid pixels, constant images).
_HOST_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("torchdrr_loss_host_checks", default=True)


@contextlib.contextmanager
def without_host_checks() -> Iterator[None]:
    """Within this block the losses skip the checks that read values back to the host (mask weights in [0, 1],
    at least 2 valid pixels, constant-image warnings), so that a loss can be captured in a CUDA graph and never makes
    the host wait. Check the inputs once beforehand (``register`` does)."""
    token = _HOST_CHECKS.set(False)
    try:
        yield
    finally:
        _HOST_CHECKS.reset(token)


def _validate(fixed: object, moving: object, mask: object) -> tuple[Tensor, Tensor, Tensor]:
    """Check the inputs; return ``fixed`` expanded to the batch of ``moving``, ``moving`` and the weights.

    The weights are ``[B, 1, H, W]`` in the dtype of ``moving`` (ones when there is no mask).
    """
    for name, t in (("fixed", fixed), ("moving", moving)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a [B, C, H, W] tensor (4 dimensions), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    assert isinstance(fixed, Tensor) and isinstance(moving, Tensor)  # for the type checker
    if moving.dtype != fixed.dtype:
        raise TypeError(f"moving: expected dtype {fixed.dtype} (that of fixed), got {moving.dtype}")
    if moving.device != fixed.device:
        raise ValueError(f"moving: expected device {fixed.device} (that of fixed), got {moving.device}")
    b, c, h, w = moving.shape
    if fixed.shape[1:] != moving.shape[1:] or fixed.shape[0] not in (1, b):
        raise ValueError(f"fixed: expected shape (1 or {b}, {c}, {h}, {w}) to match moving, got {tuple(fixed.shape)}")

    if mask is None:
        weights = moving.new_ones((b, 1, h, w))
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1:] != (1, h, w):
            raise ValueError(f"mask: expected shape (1 or {b}, 1, {h}, {w}), got {tuple(mask.shape)}")
        if mask.device != moving.device:
            raise ValueError(f"mask: expected device {moving.device} (that of the images), got {mask.device}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask: expected a bool or floating-point tensor, got {mask.dtype}")
        if mask.is_floating_point():
            m = mask.detach()
            if _HOST_CHECKS.get() and bool(((m < 0) | (m > 1) | m.isnan()).any()):
                raise ValueError(
                    f"mask: expected weights in [0, 1], got values in [{m.min().item()}, {m.max().item()}]"
                )
        weights = mask.to(moving.dtype).expand(b, 1, h, w)
    _check_valid_pixels(weights, "mask" if mask is not None else "moving")
    return fixed.expand(b, c, h, w), moving, weights


def _check_valid_pixels(weights: Tensor, name: str, after: str = "") -> None:
    """Raise unless every image of the batch has at least 2 pixels of positive weight (a variance needs two)."""
    if not _HOST_CHECKS.get():
        return
    n_valid = (weights > 0).flatten(1).sum(1).min().item()  # one host sync per call, at the boundary
    if n_valid < 2:
        raise ValueError(f"{name}: expected at least 2 valid pixels per image{after}, got {n_valid}")


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def _check_patch_size(patch_size: int, h: int, w: int, where: str = "") -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 2:
        raise ValueError(f"patch_size: expected an int >= 2, got {patch_size!r}")
    if patch_size > min(h, w):
        raise ValueError(f"patch_size: expected at most {min(h, w)} (the image{where} is {h}x{w}), got {patch_size}")


def _warn_constant(names: list[str], what: str = "image", why: str = "no contrast") -> None:
    """One warning per call naming the constant images (``names`` may be empty: then nothing)."""
    if names:
        verb = "is" if len(names) == 1 else "are"
        warnings.warn(
            f"{' and '.join(names)} {what} {verb} constant ({why}): the similarity carries no information",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Global NCC
# ---------------------------------------------------------------------------------------------------------------------


def _is_constant(var: Tensor, mean_sq: Tensor, tol: float) -> Tensor:
    """True where the standard deviation is at most ``sqrt(tol)`` times the RMS value (scale-free; 0 <= 0 for zeros)."""
    return (var <= tol * (var + mean_sq)).detach()


def _pearson(x: Tensor, y: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted Pearson correlation of each image pair over pixels and channels.

    ``x, y``: ``[B, C, H, W]``, ``w``: ``[B, 1, H, W]``. Returns ``r`` ``[B]`` (0 where either image is constant)
    and the ``[B]`` bool flags "x is constant", "y is constant".
    """
    w = w.expand_as(x)  # the mask is shared by every channel
    dims = (1, 2, 3)
    wsum = w.sum(dims)
    # Two passes (centre first) so the variance does not suffer the cancellation of E[x^2] - E[x]^2.
    mx = (w * x).sum(dims) / wsum
    my = (w * y).sum(dims) / wsum
    xc = x - mx.view(-1, 1, 1, 1)
    yc = y - my.view(-1, 1, 1, 1)
    vx = (w * xc * xc).sum(dims) / wsum
    vy = (w * yc * yc).sum(dims) / wsum
    cov = (w * xc * yc).sum(dims) / wsum
    x_const = _is_constant(vx, mx * mx, eps * eps)
    y_const = _is_constant(vy, my * my, eps * eps)
    ok = ~(x_const | y_const)
    # Double where: the unused branch must not see sqrt(0), or its NaN gradient leaks through the where.
    denom = torch.where(ok, vx * vy, torch.ones_like(vx))
    r = torch.where(ok, cov / denom.sqrt(), torch.zeros_like(cov))
    return r, x_const, y_const


def normalized_cross_correlation(
    fixed: Tensor, moving: Tensor, mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Global normalised cross-correlation loss ``1 - NCC``.

    NCC is the Pearson correlation of the two images over all (masked) pixels and channels: both images are made zero
    mean and unit variance over the mask, then their mean product is taken. It is invariant to intensity changes
    ``a * x + b`` with ``a > 0`` (``a < 0`` flips its sign).

    Args:
        fixed: ``[B or 1, C, H, W]`` reference image (the X-ray).
        moving: ``[B, C, H, W]`` image being aligned (the DRR); same dtype and device.
        mask: optional ``[B or 1, 1, H, W]`` bool or float weights in ``[0, 1]`` marking valid pixels.
        eps: an image whose standard deviation is at most ``eps`` times its RMS value is treated as constant.

    Returns:
        ``[B]`` losses in ``[0, 2]``: 0 for identical (up to a positive affine intensity map), 1 for uncorrelated
        (or a constant image, with a ``UserWarning``), 2 for negated images.
    """
    _check_eps(eps)
    fixed, moving, w = _validate(fixed, moving, mask)
    r, f_const, m_const = _pearson(fixed, moving, w, eps)
    _warn_constant([n for n, f in (("fixed", f_const), ("moving", m_const)) if _HOST_CHECKS.get() and bool(f.any())])
    return 1 - r


# ---------------------------------------------------------------------------------------------------------------------
# Gradient NCC
# ---------------------------------------------------------------------------------------------------------------------


def _sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel x- and y-derivatives of every channel, ``valid`` convolution: ``[B, C, H, W] -> 2 x [B, C, H-2, W-2]``.

    No padding: a padded border would invent edges that are not in the image.
    """
    # Written as shifted sums of slices (the cross-correlation with _SOBEL_X / 8 and its transpose): no kernel
    # tensor is copied to the device, so a step can be captured in a CUDA graph.
    h, w = x.shape[-2:]
    rows = x[..., : h - 2, :] + 2 * x[..., 1 : h - 1, :] + x[..., 2:, :]  # [1, 2, 1] down the rows
    cols = x[..., :, : w - 2] + 2 * x[..., :, 1 : w - 1] + x[..., :, 2:]  # [1, 2, 1] along the columns
    gx = (rows[..., :, 2:] - rows[..., :, : w - 2]) / 8
    gy = (cols[..., 2:, :] - cols[..., : h - 2, :]) / 8
    return gx, gy


def gradient_ncc(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Gradient correlation loss ``1 - (NCC(dx fixed, dx moving) + NCC(dy fixed, dy moving)) / 2``.

    The derivatives are plain 3x3 Sobel filters (``conv2d``, no padding), so only pixels whose 3x3 neighbourhood lies
    inside the image are used; with a mask, the weights are eroded by a 3x3 minimum, so a gradient pixel whose
    neighbourhood leaves the mask does not count. Comparing edges rather than intensities makes the loss insensitive
    to smooth background differences (soft tissue, scatter) between the DRR and the X-ray.

    Args:
        fixed: ``[B or 1, C, H, W]`` reference image, ``H, W >= 3``.
        moving: ``[B, C, H, W]`` image being aligned.
        mask: optional ``[B or 1, 1, H, W]`` bool or float weights in ``[0, 1]``.
        eps: a gradient image whose standard deviation is at most ``eps`` times its RMS value counts as constant.

    Returns:
        ``[B]`` losses in ``[0, 2]``; 0 when the gradients are positively proportional (e.g. images that differ by a
        constant offset or a positive gain). A constant gradient image (a flat or linear-ramp image has no edges)
        contributes a correlation of 0, with a ``UserWarning``.
    """
    _check_eps(eps)
    fixed, moving, w = _validate(fixed, moving, mask)
    h, w_ = moving.shape[-2:]
    if min(h, w_) < 3:
        raise ValueError(f"moving: expected images of at least 3x3 pixels for the 3x3 gradient, got {h}x{w_}")
    w = -F.max_pool2d(-w, 3, stride=1)  # 3x3 erosion (a minimum), valid like the Sobel filter
    _check_valid_pixels(w, "mask" if mask is not None else "moving", after=" after the 3x3 gradient erosion")
    fx, fy = _sobel(fixed)
    mx, my = _sobel(moving)
    rx, fx_const, mx_const = _pearson(fx, mx, w, eps)
    ry, fy_const, my_const = _pearson(fy, my, w, eps)
    names = [
        n
        for n, f in (("fixed", fx_const | fy_const), ("moving", mx_const | my_const))
        if _HOST_CHECKS.get() and bool(f.any())
    ]
    _warn_constant(names, what="image gradient", why="no edges")
    return 1 - (rx + ry) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Local (patch) NCC
# ---------------------------------------------------------------------------------------------------------------------


def _local_ncc(x: Tensor, y: Tensor, w: Tensor, patch_size: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sliding-window NCC loss: ``[B]`` losses and the ``[B]`` flags "x has no structure", "y has no structure".

    Window moments come from ``avg_pool2d`` (stride 1, no padding). A window counts with weight equal to its mask
    coverage, and only where ``x`` (the fixed image) is not flat in it: which windows count then does not depend on
    the moving image, and flat background windows (common in DRRs) neither reward nor penalise. Where ``y`` is flat
    but ``x`` is not, the correlation is 0.
    """
    # Centre globally first: it reduces the cancellation in E[x^2] - E[x]^2 below. NCC ignores offsets, so the
    # (detached) shift changes neither the value nor the gradient.
    wsum = w.sum((1, 2, 3), keepdim=True) * x.shape[1]
    x = x - ((w * x).sum((1, 2, 3), keepdim=True) / wsum).detach()
    y = y - ((w * y).sum((1, 2, 3), keepdim=True) / wsum).detach()

    def pool(t: Tensor) -> Tensor:  # window mean, pooled over channels too (same weights in every channel)
        return F.avg_pool2d(t, patch_size, stride=1).mean(1)

    cover = F.avg_pool2d(w, patch_size, stride=1)[:, 0]  # [B, h', w'] mean mask weight of each window
    safe_cover = torch.where(cover > 0, cover, torch.ones_like(cover))
    mx, my = pool(w * x) / safe_cover, pool(w * y) / safe_cover
    ex2, ey2 = pool(w * x * x) / safe_cover, pool(w * y * y) / safe_cover
    vx = (ex2 - mx * mx).clamp_min(0)
    vy = (ey2 - my * my).clamp_min(0)
    cov = pool(w * x * y) / safe_cover - mx * my
    # The one-pass variance has a rounding error of a few ulps of E[x^2]: a flat window must fall below it.
    tol = eps * eps + 8 * torch.finfo(x.dtype).eps
    x_flat = _is_constant(vx, mx * mx, tol)
    y_flat = _is_constant(vy, my * my, tol)
    ok = ~(x_flat | y_flat)
    denom = torch.where(ok, vx * vy, torch.ones_like(vx))  # double where: no sqrt(0) in the unused branch
    r = torch.where(ok, cov / denom.sqrt(), torch.zeros_like(cov))

    weight = cover * ~x_flat
    total = weight.sum((1, 2))
    has_any = total > 0
    mean_r = (weight * r).sum((1, 2)) / torch.where(has_any, total, torch.ones_like(total))
    x_none = ~has_any
    y_none = has_any & ~((weight > 0) & ~y_flat).flatten(1).any(1)
    return 1 - mean_r, x_none, y_none


def patch_ncc(
    fixed: Tensor, moving: Tensor, patch_size: int = 9, mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Local NCC loss: ``1 -`` the mean Pearson correlation over sliding ``patch_size x patch_size`` windows.

    Windows slide with stride 1 and no padding (every window lies inside the image); their moments are computed with
    ``avg_pool2d``, so the cost does not grow with the patch size. Windows are weighted by their mask coverage and by
    whether the *fixed* image has structure in them: windows where the fixed image is flat (background) are left out,
    windows where only the moving image is flat count as correlation 0. Local correlation tolerates intensity changes
    that vary slowly over the image (unlike the global NCC).

    The flatness test of a window uses ``eps**2 + 8 * finfo(dtype).eps`` as relative variance tolerance (the window
    variance is a one-pass E[x^2] - E[x]^2): in float32, windows whose standard deviation is below ~0.1 % of their
    (globally centred) RMS value are treated as flat.

    Args:
        fixed: ``[B or 1, C, H, W]`` reference image.
        moving: ``[B, C, H, W]`` image being aligned.
        patch_size: window side in pixels, ``2 <= patch_size <= min(H, W)``.
        mask: optional ``[B or 1, 1, H, W]`` bool or float weights in ``[0, 1]``.
        eps: relative standard-deviation threshold below which a window counts as flat.

    Returns:
        ``[B]`` losses in ``[0, 2]``: 0 for identical images, 1 when no window carries information (with a
        ``UserWarning`` when an image is flat in every window).
    """
    _check_eps(eps)
    fixed, moving, w = _validate(fixed, moving, mask)
    _check_patch_size(patch_size, *moving.shape[-2:])
    loss, f_none, m_none = _local_ncc(fixed, moving, w, patch_size, eps)
    _warn_constant([n for n, f in (("fixed", f_none), ("moving", m_none)) if _HOST_CHECKS.get() and bool(f.any())])
    return loss


def _downsample(x: Tensor, w: Tensor, scale: int) -> tuple[Tensor, Tensor]:
    """Mask-aware ``scale x scale`` average pooling: masked-out pixels do not leak into the pooled values."""
    if scale == 1:
        return x, w
    pw = F.avg_pool2d(w, scale)
    safe = torch.where(pw > 0, pw, torch.ones_like(pw))
    return F.avg_pool2d(w * x, scale) / safe, pw


def multiscale_ncc(
    fixed: Tensor,
    moving: Tensor,
    scales: Sequence[int] = (1, 2, 4),
    patch_size: int = 9,
    mask: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Mean of :func:`patch_ncc` losses over downsampled copies of the images.

    At scale ``s`` the images are average-pooled ``s x s`` (mask-aware; the pooled mask becomes a float coverage
    weight) and compared with the same ``patch_size`` windows, so coarse scales see a wider neighbourhood and widen
    the capture range of the optimiser.

    Args:
        fixed: ``[B or 1, C, H, W]`` reference image.
        moving: ``[B, C, H, W]`` image being aligned.
        scales: positive integer downsampling factors; ``patch_size <= min(H, W) // max(scales)``.
        patch_size: window side in pixels at every scale.
        mask: optional ``[B or 1, 1, H, W]`` bool or float weights in ``[0, 1]``.
        eps: relative standard-deviation threshold below which a window counts as flat.

    Returns:
        ``[B]`` losses in ``[0, 2]`` (0 for identical images).
    """
    _check_eps(eps)
    fixed, moving, w = _validate(fixed, moving, mask)
    if (
        isinstance(scales, (str, bytes))
        or not isinstance(scales, Sequence)
        or len(scales) == 0
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales)
    ):
        raise ValueError(f"scales: expected a non-empty sequence of ints >= 1, got {scales!r}")
    h, w_ = moving.shape[-2:]
    for s in scales:
        _check_patch_size(patch_size, h // s, w_ // s, where=f" at scale {s}")
    losses = []
    f_none = m_none = torch.zeros(moving.shape[0], dtype=torch.bool, device=moving.device)
    for s in scales:
        fs, ws = _downsample(fixed, w, s)
        ms, _ = _downsample(moving, w, s)
        loss, f, m = _local_ncc(fs, ms, ws, patch_size, eps)
        losses.append(loss)
        f_none, m_none = f_none | f, m_none | m
    _warn_constant([n for n, f in (("fixed", f_none), ("moving", m_none)) if _HOST_CHECKS.get() and bool(f.any())])
    return torch.stack(losses).mean(0)


# ---------------------------------------------------------------------------------------------------------------------
# Mutual information
# ---------------------------------------------------------------------------------------------------------------------


def _normalise(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Min-max map each image's valid values to ``[0, 1]``: ``[B, N] -> [B, N]`` and the ``[B]`` "constant" flags.

    A constant image maps to 0 (stretching its rounding noise to ``[0, 1]`` would invent contrast).
    """
    inf = torch.full_like(x, math.inf)
    lo = torch.where(valid, x, inf).amin(1, keepdim=True)
    hi = torch.where(valid, x, -inf).amax(1, keepdim=True)
    span = hi - lo
    const = (span <= 1e-6 * torch.maximum(lo.abs(), hi.abs())).detach()
    xn = torch.where(const, torch.zeros_like(x), (x - lo) / torch.where(const, torch.ones_like(span), span))
    return xn, const[:, 0]


def _plogp(p: Tensor) -> Tensor:
    """``p * log(p)`` with ``0 log 0 = 0`` and a finite gradient (double where)."""
    pos = p > 0
    return torch.where(pos, p * torch.log(torch.where(pos, p, torch.ones_like(p))), torch.zeros_like(p))


def mutual_information(
    fixed: Tensor, moving: Tensor, bins: int = 32, mask: Tensor | None = None, sigma: float | None = None
) -> Tensor:
    """Negative mutual information ``-MI`` (nats) from a differentiable Parzen-window joint histogram.

    Each image is min-max normalised to ``[0, 1]`` over its valid pixels. Each pixel value ``v`` is spread over
    ``bins`` equally spaced bin centres ``c_k = k / (bins - 1)`` with Gaussian weights ``exp(-(v - c_k)^2 / 2 sigma^2)``
    normalised to sum to 1 per pixel (a softmax, so a pixel always has unit mass). The joint histogram is the
    mask-weighted mean of the outer products of the two images' weights, and
    ``MI = sum_kl P_kl log(P_kl / (P_k P_l)) = H(fixed) + H(moving) - H(fixed, moving)``.

    The min and max are *not* detached: the loss is then an ordinary (almost everywhere) differentiable function of
    ``moving`` and its autograd gradient is exact (a detached range would give a gradient that is wrong at the two
    extreme pixels). MI captures any functional intensity relation (e.g. a monotone map), not only linear ones.

    Args:
        fixed: ``[B or 1, C, H, W]`` reference image.
        moving: ``[B, C, H, W]`` image being aligned.
        bins: number of histogram bins, ``>= 2``.
        mask: optional ``[B or 1, 1, H, W]`` bool or float weights in ``[0, 1]``; pixels of weight 0 are ignored,
            also for the min-max normalisation.
        sigma: Parzen kernel width in normalised intensity units; default half the bin spacing, ``0.5 / (bins - 1)``.

    Returns:
        ``[B]`` losses in ``[-log(bins), 0]``: 0 for independent images (or a constant image, with a ``UserWarning``),
        more negative the more the fixed image predicts the moving one.
    """
    fixed, moving, w = _validate(fixed, moving, mask)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins: expected an int >= 2, got {bins!r}")
    if sigma is None:
        sigma = 0.5 / (bins - 1)
    elif isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma: expected a finite number > 0, got {sigma!r}")

    b = moving.shape[0]
    weights = w.expand_as(moving).reshape(b, -1)  # channels are extra samples
    valid = weights > 0
    fn, f_const = _normalise(fixed.reshape(b, -1), valid)
    mn, m_const = _normalise(moving.reshape(b, -1), valid)
    _warn_constant([n for n, f in (("fixed", f_const), ("moving", m_const)) if _HOST_CHECKS.get() and bool(f.any())])

    centres = torch.linspace(0, 1, bins, dtype=moving.dtype, device=moving.device)
    pf = torch.softmax(-0.5 * ((fn.unsqueeze(-1) - centres) / sigma) ** 2, dim=-1)  # [B, N, bins]
    pm = torch.softmax(-0.5 * ((mn.unsqueeze(-1) - centres) / sigma) ** 2, dim=-1)
    joint = torch.einsum("bn,bnk,bnl->bkl", weights, pf, pm) / weights.sum(1).view(b, 1, 1)
    mi = (
        _plogp(joint).sum((1, 2))
        - _plogp(joint.sum(2)).sum(1)  # marginal of fixed
        - _plogp(joint.sum(1)).sum(1)  # marginal of moving
    )
    return -mi


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., Tensor]] = {
    "ncc": normalized_cross_correlation,
    "gncc": gradient_ncc,
    "patch_ncc": patch_ncc,
    "multiscale_ncc": multiscale_ncc,
    "mi": mutual_information,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered as ``name`` in :data:`LOSSES`; ``ValueError`` listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"name: expected one of {', '.join(sorted(LOSSES))}, got {name!r}") from None
