"""Loads the compiled extension (``torchdrr._C``) and reports how it was built."""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "torchdrr's compiled extension (torchdrr._C) could not be loaded: "
        f"{error}. Build it against the installed torch ({torch.__version__}) with "
        "`pip install --no-build-isolation -e .` from the repository root (see README.md)."
    ) from error

__all__ = ["build_info", "call_op", "has_cuda_kernels", "require_kernels_for"]


def has_cuda_kernels() -> bool:
    """Whether this build of torchdrr contains the CUDA kernels."""
    return bool(_C.WITH_CUDA)


def build_info() -> dict[str, object]:
    """What was built and what is running.

    Returns:
        A dict with ``torchdrr`` (version), ``torch_built_against`` and ``torch_running`` (versions),
        ``cpu_kernels`` (always True), ``openmp`` (CPU kernel threads through OpenMP), ``cuda_kernels``
        (whether the CUDA kernels were compiled), ``cuda_archs`` (the architectures they were compiled for),
        ``cuda_available`` (whether torch sees a GPU now) and ``cpu_threads``.
    """
    from . import __version__

    archs = [a for a in str(_C.CUDA_ARCHS).replace(" ", ";").split(";") if a]
    return {
        "torchdrr": __version__,
        "torch_built_against": _C.TORCH_VERSION,
        "torch_running": torch.__version__,
        "cpu_kernels": True,
        "openmp": bool(_C.OPENMP),
        "cuda_kernels": has_cuda_kernels(),
        "cuda_archs": archs,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }


def require_kernels_for(device: torch.device, argument: str) -> None:
    """Raises a clear error when no kernel of this build can run on ``device``.

    Args:
        device: the device of the op's tensors.
        argument: the argument name to report.
    """
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not has_cuda_kernels():
            raise RuntimeError(
                f"{argument} is on {device}, but this torchdrr build has no CUDA kernels "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda}). Reinstall on a machine with a CUDA torch "
                "and nvcc (`TORCHDRR_CUDA=1 pip install --no-build-isolation -e .` fails loudly if it cannot), "
                "or move the tensors to the CPU."
            )
        return
    raise ValueError(f"{argument} is on {device}; torchdrr runs on 'cpu' and 'cuda' devices only")


def call_op(op, *args):
    """Calls the torchdrr op ``op`` on ``args``; past its autograd kernel when no argument needs a gradient (grad mode
    off, or no tensor argument requires grad), where autograd would record nothing anyway.

    Why: the ops' autograd formulas are registered from Python (``torch.library.register_autograd``), so even a
    no-grad call runs a Python autograd kernel that re-enters the dispatcher, about 10 us of host time a call. A
    single GPU render waits for its host's launch work, so that is measurable next to a 1 ms kernel. Under
    ``torch.compile`` the plain call is traced instead.
    """
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return op(*args)
    if torch.compiler.is_compiling():
        return op(*args)
    with _BelowAutograd():
        return op(*args)


_BelowAutograd = torch._C._AutoDispatchBelowAutograd
