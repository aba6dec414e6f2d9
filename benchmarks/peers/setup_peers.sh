#!/usr/bin/env bash
# Create (idempotently) the separate virtual environment in which the peer renderers
# DiffDRR 0.6.1 and nanodrr 0.1.7 run: <repo>/.venv-peers (override with PEERS_VENV=...).
#
# Order matters:
#   1. torch==2.13.0 FIRST. On the project's machines pip's find-links (/opt/wheels) holds a local CPU
#      build (2.13.0+cpu), which sorts above PyPI's 2.13.0; installing anything that depends on torch
#      before it would let pip pull PyPI's multi-GB CUDA build.
#   2. diffdrr and nanodrr with --no-deps: DiffDRR's metadata drags in torchvision (PyPI's build does
#      not import beside the local torch), pyvista[all], timm, seaborn, matplotlib, kornia, ...; none is
#      imported by the modules that render (diffdrr.data/.drr/.pose/.detector/.renderers,
#      nanodrr.data/.camera/.drr/.geometry).
#   3. Only what those modules import, pinned (plus torchio's own requirements, pinned too).
# Re-running is cheap: pip only checks the pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/.venv-peers}"
PYTHON="${PYTHON:-python3}"

# torch plus its own requirements, pinned (these come from PyPI / the local mirror, all CPU-only)
TORCH_PINS=(
    torch==2.13.0
    filelock==4.2.12
    fsspec==2026.9.0
    jinja2==3.1.6
    markupsafe==3.0.4
    mpmath==1.3.0
    networkx==3.6.1
    sympy==1.14.0
    typing-extensions==4.16.0
    setuptools==84.2.1
)
PEER_PINS=(diffdrr==0.6.1 nanodrr==0.1.7)
# What the rendering modules import (checked by importing them, see README.md):
#   diffdrr: torch, numpy, fastcore, einops, scipy, pandas, nibabel, torchio
#   nanodrr: torch, jaxtyping, roma, platformdirs, torchio
#   torchio: SimpleITK (imported at module level; its reader is tried first), nibabel, ...
DEP_PINS=(
    numpy==2.4.6
    scipy==1.17.1
    pandas==3.1.1
    nibabel==5.4.2
    torchio==1.2.1
    simpleitk==2.5.7
    fastcore==2.2.39
    einops==0.8.2
    roma==1.8.0
    jaxtyping==0.3.11
    platformdirs==4.14.7
    # requirements of the above, pinned so the environment is reproducible
    deprecated==1.3.1
    wrapt==2.5.2
    humanize==4.17.0
    importlib-resources==7.1.0
    packaging==26.3
    python-dateutil==4.0.0
    tzdata==2026.6
    tqdm==4.70.1
    typer==0.29.2
    rich==15.0.0
    pygments==2.21.0
    markdown-it-py==4.3.0
    mdurl==0.1.2
    shellingham==1.5.4
    annotated-doc==0.0.7
    pydantic==2.14.3
    pydantic-core==2.50.4
    annotated-types==0.8.0
    typing-inspection==0.4.5
    wadler-lindig==0.1.8
)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup_peers] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

echo "[setup_peers] 1/3 ${TORCH_PINS[0]} (first)"
"${PIP[@]}" install -q "${TORCH_PINS[@]}"

echo "[setup_peers] 2/3 ${PEER_PINS[*]} (--no-deps)"
"${PIP[@]}" install -q --no-deps "${PEER_PINS[@]}"

echo "[setup_peers] 3/3 runtime dependencies (pinned)"
"${PIP[@]}" install -q "${DEP_PINS[@]}"

# Smoke test: the modules the benchmark uses import, and torch was not replaced.
"$VENV/bin/python" - <<'EOF'
import sys
import torch
import diffdrr.data, diffdrr.drr, diffdrr.pose  # noqa: F401
import nanodrr.camera, nanodrr.data, nanodrr.drr, nanodrr.geometry  # noqa: F401
from importlib.metadata import version
heavy = sorted(m for m in ("torchvision", "timm", "pyvista", "vtk", "kornia", "matplotlib") if m in sys.modules)
assert not heavy, f"unexpected heavy imports: {heavy}"
print(f"[setup_peers] ok: torch {torch.__version__} (cuda={torch.version.cuda}), "
      f"diffdrr {version('diffdrr')}, nanodrr {version('nanodrr')}, python {sys.version.split()[0]}")
EOF
du -sh "$VENV" | sed 's/^/[setup_peers] venv size: /'
