"""Generate the committed per-element scattering factors ``data/scattering_factors.npz`` with xraylib.

Run as ``python -m torchdrr.physics.make_scatter_tables`` (needs the optional extra ``scatter-tables``: xraylib).

The table holds, for every element Z = 1 .. ``Z_MAX`` and momentum transfer ``x = sin(theta / 2) / lambda`` (1/Å,
xraylib's convention) on ``X_GRID``:

* ``form_factor`` ``[Z_MAX, X]``: the atomic form factor F(x, Z) (xraylib ``FF_Rayl``), which shapes Rayleigh
  scattering: dσ/dΩ = r_e² (1 + cos²θ) / 2 · F²;
* ``scattering_function`` ``[Z_MAX, X]``: the incoherent scattering function S(x, Z) (xraylib ``SF_Compt``), which
  shapes Compton scattering: dσ/dΩ = Klein–Nishina · S.

Only these two xraylib functions are used (design.md: its ``CS_Energy`` is wrong; cross-sections come from xraydb).
At x = 0 the values are the exact limits F = Z and S = 0 (xraylib refuses x = 0).
"""

from __future__ import annotations

import pathlib

import numpy as np

Z_MAX = 98
# 0, then 256 log-spaced points from 1e-3 to 20 1/Å (x = 12.1 1/Å is back-scatter at 150 keV).
X_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 20.0, 256)])
TABLE = pathlib.Path(__file__).parent / "data" / "scattering_factors.npz"


def main() -> None:
    import xraylib  # optional extra: only the generator needs it

    form_factor = np.zeros((Z_MAX, X_GRID.size))
    scattering_function = np.zeros((Z_MAX, X_GRID.size))
    for z in range(1, Z_MAX + 1):
        form_factor[z - 1, 0] = z
        for i, x in enumerate(X_GRID[1:], start=1):
            form_factor[z - 1, i] = xraylib.FF_Rayl(z, float(x))
            scattering_function[z - 1, i] = xraylib.SF_Compt(z, float(x))
    tmp = TABLE.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        x=X_GRID.astype(np.float32),
        form_factor=form_factor.astype(np.float32),
        scattering_function=scattering_function.astype(np.float32),
        source=np.array(f"xraylib {xraylib.__version__}: FF_Rayl, SF_Compt"),
    )
    tmp.replace(TABLE)
    print(f"wrote {TABLE} ({TABLE.stat().st_size / 1024:.0f} KiB): Z = 1..{Z_MAX}, {X_GRID.size} x values")


if __name__ == "__main__":
    main()
