"""Replaying a no-grad render as a CUDA graph: ``cuda_graphed``.

A single GPU render of a 1240 x 960 image is a ~1 ms kernel, and eager PyTorch spends 0.07-0.23 ms of host time
(H100 machines, benchmarks/RESULTS.md) before it starts (Python argument checks, the C-arm ray-parameter op, tensor
allocations, kernel launches), time in which the GPU waits. A CUDA graph records the launches once and replays
them with one call, so a render that is repeated with new poses (a training loop, on-the-fly augmentation, a sweep
of views) costs the kernels plus a few microseconds. ``torch.cuda.CUDAGraph`` does the capture; this module adds
what a render needs around it: static input buffers the new poses are copied into, a warm-up on a side stream,
checks with clear errors, and outputs that are not overwritten by the next replay unless asked.

For gradients, capture forward and backward together with ``torch.cuda.make_graphed_callables``, or use
``torchdrr.registration.register(cuda_graph=True)``, which graphs a whole optimisation step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["cuda_graphed"]


def _flat_tensors(value: Any, what: str) -> list[Tensor]:
    """The tensors of a tensor or a (nested) tuple/list of tensors, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flat_tensors(item, what)]
    raise TypeError(f"{what} must be a tensor or a tuple/list of tensors, got {type(value).__name__}")


def cuda_graphed(
    render: Callable[..., Any], *example_inputs: Tensor, warmup: int = 2, clone_outputs: bool = True
) -> Callable[..., Any]:
    """Captures ``render(*example_inputs)`` as a CUDA graph and returns a function that replays it for new inputs.

    Args:
        render: a function of the tensors ``example_inputs`` only (e.g. C-arm angles ``[B]`` in degrees, or
            ``sources [B, 3]`` and ``ray_matrices [B, 3, 3]``) that returns a CUDA tensor or a tuple/list of them,
            such as ``lambda angles: camera_raycast(volume, affine, *carm_ray_parameters(angles, ...), H, W)``.
            Everything else it reads (the volume, the affine, the detector size, Python numbers) is fixed at
            capture: the volume's memory is read again at every replay, so in-place changes to it are seen, but a
            new volume tensor needs a new capture. It must not synchronise with the host (``.item()``, printing a
            value, a data-dependent check) and must not copy from the CPU; it runs under ``torch.no_grad()``.
        example_inputs: CUDA tensors with the shapes, dtypes and device of every later call's inputs.
        warmup: untimed eager calls on a side stream before the capture (>= 1; lazy initialisation must not end up
            in the graph).
        clone_outputs: return copies of the graph's output buffers (default), so that results of earlier calls stay
            valid. With False each call returns the same tensors, overwritten by the next call: fastest, for a
            caller that consumes each result before the next call.

    Returns:
        ``replay(*inputs)``: copies ``inputs`` (same shapes, dtypes and device as ``example_inputs``) into the
        graph's input buffers, replays the graph on the current stream and returns what ``render`` returned. The
        values are those of an eager ``render(*inputs)`` (the same kernels run).

    Raises:
        TypeError / ValueError: non-tensor or non-CUDA inputs, ``warmup`` < 1, inputs that need gradients, or
        (at replay) inputs of another shape, dtype or device than the examples, named with both.
        RuntimeError: ``render`` synchronised with the host during the warm-up (checked with
            ``torch.cuda.set_sync_debug_mode("error")`` before the capture starts).
    """
    if not callable(render):
        raise TypeError(f"render must be callable, got {type(render).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be a whole number >= 1, got {warmup!r}")
    if not example_inputs:
        raise ValueError("cuda_graphed needs at least one example input tensor (the inputs that change per call)")
    for index, value in enumerate(example_inputs):
        if not isinstance(value, Tensor):
            raise TypeError(f"example_inputs[{index}] must be a torch.Tensor, got {type(value).__name__}")
        if value.device.type != "cuda":
            raise ValueError(f"example_inputs[{index}] must be a CUDA tensor (CUDA graphs), got device {value.device}")
        if value.requires_grad:
            raise ValueError(
                f"example_inputs[{index}] requires grad; cuda_graphed replays no-grad renders (for gradients use "
                "torch.cuda.make_graphed_callables)"
            )
    device = example_inputs[0].device
    if any(value.device != device for value in example_inputs):
        raise ValueError(f"example_inputs must be on one device, got {[str(v.device) for v in example_inputs]}")

    static_inputs = [value.detach().clone() for value in example_inputs]
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # The warm-up runs with synchronising calls turned into errors, so that a render that syncs (e.g. .item())
        # fails here, before the capture: a capture that fails half-way leaves torch's CUDA random generator in a
        # state that breaks later random calls in the process.
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.stream(side), torch.no_grad():
                torch.cuda.set_sync_debug_mode("error")
                for _ in range(warmup):
                    render(*static_inputs)
        except RuntimeError as error:
            raise RuntimeError(
                f"render cannot be captured as a CUDA graph ({error}). It must not synchronise with the host "
                "(.item(), printing values, data-dependent checks) nor copy from the CPU."
            ) from error
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_output = render(*static_inputs)
    outputs = _flat_tensors(static_output, "render's result")
    if any(t.device != device for t in outputs):
        raise ValueError(f"render must return tensors on {device}, got {[str(t.device) for t in outputs]}")

    def copy_result(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.clone()
        return type(value)(copy_result(item) for item in value)

    def replay(*inputs: Tensor) -> Any:
        if len(inputs) != len(static_inputs):
            raise TypeError(f"expected {len(static_inputs)} input tensors (as captured), got {len(inputs)}")
        for index, (value, static) in enumerate(zip(inputs, static_inputs, strict=True)):
            if not isinstance(value, Tensor):
                raise TypeError(f"inputs[{index}] must be a torch.Tensor, got {type(value).__name__}")
            if value.shape != static.shape or value.dtype != static.dtype or value.device != static.device:
                raise ValueError(
                    f"inputs[{index}] must match the captured example: shape {tuple(static.shape)}, "
                    f"{static.dtype} on {static.device}; got shape {tuple(value.shape)}, {value.dtype} on "
                    f"{value.device}"
                )
            static.copy_(value)
        graph.replay()
        return copy_result(static_output) if clone_outputs else static_output

    return replay
