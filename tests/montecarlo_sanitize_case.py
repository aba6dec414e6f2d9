"""Small CUDA Monte Carlo transports for `compute-sanitizer --tool memcheck` (out-of-bounds reads and writes): a
rotated, anisotropic volume of three materials, photons that miss it, a source inside it, a grid, falloff, several
cameras, edges of the detector and of the tables (photons up to the grid's top energy).

Not collected by pytest; .device/run8.sh runs it on the lent GPU.
"""

import torch

from torchdrr.geometry import Camera
from torchdrr.physics import AntiScatterGrid, EnergyIntegratingDetector, spectrum_preset, transport

from .geometry_cases import AFFINES


def main() -> None:
    affine = AFFINES["rotated"]
    generator = torch.Generator().manual_seed(0)
    densities = (torch.rand((3, 9, 7, 5), generator=generator) * torch.tensor([0.01, 1.0, 2.0]).view(3, 1, 1, 1)).cuda()
    centre = (affine @ torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))[:3]
    for sod in (400.0, 0.5):  # the second source sits inside the volume
        angles = torch.tensor([0.0, 90.0, 33.0]), torch.tensor([0.0, 10.0, -20.0])
        camera = Camera.from_carm(*angles, centre, sod_mm=sod, sdd_mm=800.0, height=13, width=17,
                                  pixel_spacing_mm=(3.0, 2.0)).to("cuda")  # fmt: skip
        for grid, falloff in ((None, False), (AntiScatterGrid(8.0, 0.7), True)):
            result = transport(
                densities, affine, ["air", "soft tissue", "cortical bone"], camera, spectrum_preset("120kVp"),
                photons_per_pixel=200, grid=grid, detector=EnergyIntegratingDetector(falloff=falloff),
                field=(-3.0, 20.0, -0.5, 12.5), seed=sod > 1, progress=False,
            )  # fmt: skip
            assert torch.isfinite(result.primary).all()
    torch.cuda.synchronize()
    print("montecarlo sanitize case done")


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    main()
