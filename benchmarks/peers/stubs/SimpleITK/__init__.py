"""Stand-in for SimpleITK, for benchmarking the peer renderers where SimpleITK is not installed.

Written for this project (no SimpleITK code is copied). It is put on ``sys.path`` by
``benchmarks/peers/run_peers.py`` ONLY when the real SimpleITK cannot be imported (or when
``PEERS_FORCE_SIMPLEITK_STUB=1`` is set, to test this fallback). On this project's CPU machine the real
SimpleITK is installed by ``setup_peers.sh`` and this module is never imported.

Why it is enough: torchio imports SimpleITK at module import time, but the only thing the peers need
from torchio is reading a NIfTI file (``torchio.ScalarImage``). torchio's readers (``read_image``,
``read_shape``, ``read_affine`` in ``torchio/data/io.py``) try SimpleITK first and fall back to
NiBabel when SimpleITK raises ``RuntimeError``. Every class or function taken from this module
raises ``RuntimeError`` when called, so the read goes through NiBabel; torchio's resampling and
augmentation transforms (which really need SimpleITK) are not used by the renderers and fail loudly if
something does call them.

Names that start with ``sitk`` (pixel-type and interpolator constants such as ``sitkFloat32``,
``sitkLinear``) are distinct integers so module-level tables that use them still build.
"""

__version__ = "0+stand-in"
IS_STAND_IN = True

_MESSAGE = "SimpleITK stand-in (benchmarks/peers/stubs): {name} is not available; install SimpleITK"
_cache: dict = {}


def _make_unavailable(name: str) -> type:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(_MESSAGE.format(name=name))

    return type(name, (), {"__init__": __init__, "__module__": __name__, "__doc__": f"Unavailable: {name}"})


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name not in _cache:
        if name.startswith("sitk"):
            _cache[name] = 10_000 + len(_cache)
        else:
            _cache[name] = _make_unavailable(name)
    return _cache[name]
