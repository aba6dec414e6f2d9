"""Cost of the first registration in a fresh process (CUDA context, kernels, cuBLAS, graph capture) and of the next.

    python benchmarks/registration_first_call.py    # needs a GPU; bundled CT, 128 x 128 detector

``benchmarks/registration.py`` times registrations after an untimed warm-up; a command-line user who registers one
X-ray per process pays the first-call cost this script shows.
"""

from __future__ import annotations

import warnings

import torch

from torchdrr import DRR
from torchdrr.geometry import Camera
from torchdrr.io import Volume, bundled_ct_path
from torchdrr.registration import offset_camera, register


def main() -> None:
    drr = DRR(Volume.load(bundled_ct_path(), fix_padding=True)).to("cuda")
    center = drr.volume_center
    camera = Camera.from_carm(torch.tensor([0.0], dtype=torch.float64), 0.0, center, height=128, width=128,
                              pixel_spacing_mm=(2.9, 2.9))  # fmt: skip
    truth = torch.tensor([[3.0, 2.0, 1.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    xray = drr(offset_camera(camera, truth, center), output="line_integral", noisy=False)[0, 0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = register(drr, xray, camera)
    fallbacks = [str(w.message)[:200] for w in caught if issubclass(w.category, RuntimeWarning)]
    second = register(drr, xray, camera)
    print(f"first registration {first.seconds:.2f} s, second {second.seconds:.2f} s ({second.renders} renders); "
          f"capture fallbacks: {fallbacks or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
