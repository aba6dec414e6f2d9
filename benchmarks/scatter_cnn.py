"""Speed of the scatter CNN at 1240 x 960 (the issue's target: <= 2 ms on the H100), and of the whole DRR with it.

    python benchmarks/scatter_cnn.py [--device cuda] [--weights PATH] [--json out.json]

Times ``ScatterCNN.scatter_ratio`` (bin, network, upsample) on a 960 x 1240 detector (0.3 mm pitch), with CUDA
events (median of repeats after warm-up):

- ``cnn_eager_ms``: every kernel launched from Python (``cuda_graphs=False``; what a call that needs gradients runs);
- ``cnn_ms``: the default inference path (the network replays a CUDA graph captured on the first call);
- ``cnn_graph_ms``: the whole call captured in one CUDA graph by hand (the floor);

then the chest render at that size with ``scatter=None`` and ``scatter="cnn"``, and the gradient of the CNN render
with respect to the volume (eager: gradients are needed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchdrr import DRR  # noqa: E402
from torchdrr.geometry import Camera, carm_extrinsics, intrinsic_matrix  # noqa: E402
from torchdrr.io import Volume  # noqa: E402
from torchdrr.io.volume import bundled_ct_path  # noqa: E402
from torchdrr.learned.scatter import ScatterCNN  # noqa: E402


def _time(fn, device: torch.device, repeats: int = 50, warmup: int = 10) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", type=Path, default=None, help="scatter CNN weights (default: the shipped ones)")
    parser.add_argument("--ct", type=Path, default=None, help="CT for the DRR timing (default: the bundled one)")
    parser.add_argument("--size", type=int, nargs=2, default=(960, 1240), metavar=("ROWS", "COLS"))
    parser.add_argument("--pitch", type=float, default=0.3, help="detector pixel pitch, mm")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    height, width = args.size
    cnn = ScatterCNN(args.weights).to(device).eval()
    eager = ScatterCNN(args.weights, cuda_graphs=False).to(device).eval()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": [height, width], "pitch_mm": args.pitch}  # fmt: skip

    # The network alone, on a realistic image (a chest render's transmission and mass thickness).
    ct = Volume.load(args.ct or bundled_ct_path(), fix_padding=True)
    drr = DRR(ct, output="flat_field").to(device)
    rotation, translation = carm_extrinsics(0.0, 0.0, 850.0, drr.volume_center)
    k = intrinsic_matrix(1020.0, height, width, (args.pitch, args.pitch))
    camera = Camera(k, rotation.reshape(1, 3, 3), translation.reshape(1, 3), height, width, 1020.0).to(device)
    with torch.no_grad():
        transmission = drr(camera)
        mass = drr.material_line_integrals(camera).sum(-1).reshape(1, 1, height, width).to(transmission.dtype)

    def network(module: ScatterCNN = cnn) -> torch.Tensor:
        with torch.no_grad():
            return module.scatter_ratio(transmission, mass, (args.pitch, args.pitch), 1020.0, 90.0, 50.0, 170.0)

    result["cnn_eager_ms"] = _time(lambda: network(eager), device, args.repeats)
    print(f"scatter CNN {height}x{width}, eager: {result['cnn_eager_ms']:.3f} ms")
    if device.type == "cuda":
        same = torch.allclose(network(cnn), network(eager), rtol=1e-5, atol=1e-7)
        result["cnn_ms"] = _time(network, device, args.repeats)
        print(f"scatter CNN {height}x{width}, default (graph replay of the network): {result['cnn_ms']:.3f} ms "
              f"(same numbers as eager: {same})")  # fmt: skip
        result["cnn_graph_matches_eager"] = bool(same)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                network(eager)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            network(eager)
        result["cnn_graph_ms"] = _time(graph.replay, device, args.repeats)
        print(f"scatter CNN {height}x{width}, CUDA graph: {result['cnn_graph_ms']:.3f} ms")

    # The whole render, without and with the CNN, and its backward pass.
    plain = DRR(ct, output="line_integral").to(device)
    learned = DRR(ct, output="line_integral", scatter=ScatterCNN(args.weights)).to(device)
    for name, module in (("drr_no_scatter_ms", plain), ("drr_cnn_scatter_ms", learned)):
        with torch.no_grad():
            result[name] = _time(lambda m=module: m(camera), device, max(5, args.repeats // 5), 3)
        print(f"{name}: {result[name]:.3f} ms")
    learned.hu.requires_grad_(True)

    def backward() -> None:
        learned(camera).sum().backward()

    result["drr_cnn_forward_backward_ms"] = _time(backward, device, max(5, args.repeats // 5), 2)
    print(f"drr_cnn_forward_backward_ms: {result['drr_cnn_forward_backward_ms']:.3f} ms")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=args.json.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(temporary, args.json)


if __name__ == "__main__":
    main()
