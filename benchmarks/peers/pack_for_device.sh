#!/usr/bin/env bash
# Build .carry/dev/peerlib.tar.xz: the pure-Python packages that the lent GPU machine (Python 3.12, torch 2.11+cu130)
# lacks for the peers' registration (benchmarks/peers/register_peers.py), for carrying there (nothing downloads on
# that machine). Run it here, where PyPI is reachable:
#
#     bash benchmarks/peers/pack_for_device.sh            # PYTHON=... picks the pip (default: .venv-peers, else python3)
#
# Tarball layout (one top folder, peerlib/):
#     peerlib/site/      diffdrr 0.6.1 (bundled example CT and mask stripped), nanodrr 0.1.7, fastcore, roma, torchio,
#                        deprecated: missing on the GPU machine; put FIRST on PYTHONPATH.
#     peerlib/fallback/  einops, jaxtyping, wadler-lindig, humanize: the GPU image has them already (KINDS.md); only
#                        for an image that lacks them: put LAST, via PEERS_EXTRA_PATH (register_peers.py appends it to
#                        sys.path after site-packages, so the image's own copies win).
#     peerlib/stubs/     a copy of benchmarks/peers/stubs/SimpleITK (the runner already uses the repo's copy).
# kornia, kornia-rs, nibabel and platformdirs are not here: they travel in the other carry (.carry/dev/pylib.tar.xz).
# numpy, scipy, pandas, packaging, rich, tqdm, typer, wrapt, timm, torchvision are in the GPU image.
#
# On the GPU machine (name .carry/dev in the run's carry; tarballs unpacked under /tmp):
#     mkdir -p /tmp/carry && tar xJf .carry/dev/peerlib.tar.xz -C /tmp/carry && tar xJf .carry/dev/pylib.tar.xz \
#         -C /tmp/carry && export PYTHONPATH=/tmp/carry/peerlib/site:/tmp/carry/pylib:$PYTHONPATH \
#         PEERS_EXTRA_PATH=/tmp/carry/peerlib/fallback
#     python3 benchmarks/peers/register_peers.py --check      # {"nanodrr": true, "diffdrr": true}
#
# The script ends with an import test under the peers' interpreter with site-packages switched off (-S): only the
# stdlib, the tarball's folders, .carry/pylib (nibabel, platformdirs) and the packages the GPU image is known to hold.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="$ROOT/.carry/dev"
OUT="$OUT_DIR/peerlib.tar.xz"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv-peers/bin/python" ]; then PYTHON="$ROOT/.venv-peers/bin/python"; else PYTHON=python3; fi
fi
SITE_PINS=(diffdrr==0.6.1 nanodrr==0.1.7 fastcore==2.2.39 roma==1.8.0 torchio==1.2.1 deprecated==1.3.1)
FALLBACK_PINS=(einops==0.8.2 jaxtyping==0.3.11 wadler-lindig==0.1.8 humanize==4.17.0)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/peerlib"
mkdir -p "$STAGE/site" "$STAGE/fallback" "$STAGE/stubs" "$OUT_DIR"

PIP=("$PYTHON" -m pip --disable-pip-version-check install -q --no-deps --only-binary=:all: --python-version 3.12
     --implementation py --no-compile)
echo "[pack_for_device] site: ${SITE_PINS[*]}"
"${PIP[@]}" --target "$STAGE/site" "${SITE_PINS[@]}"
echo "[pack_for_device] fallback: ${FALLBACK_PINS[*]}"
"${PIP[@]}" --target "$STAGE/fallback" "${FALLBACK_PINS[@]}"
cp -r "$ROOT/benchmarks/peers/stubs/SimpleITK" "$STAGE/stubs/"

# Strip what no import needs: DiffDRR's bundled example CT (33 MB) and mask, console scripts, caches, RECORD files
# (pip's uninstall manifest; the dist-info METADATA that importlib.metadata reads stays).
rm -f "$STAGE/site/diffdrr/data/"*.nii.gz
rm -rf "$STAGE/site/bin" "$STAGE/fallback/bin"
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$STAGE" -path '*.dist-info/RECORD' -delete

# Import test, isolated from the peers venv's site-packages.
PRESENT="$WORK/present"
mkdir -p "$PRESENT"
SITE_PACKAGES="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SKIP=" diffdrr nanodrr fastcore roma torchio deprecated einops jaxtyping wadler_lindig humanize kornia kornia_rs \
nibabel platformdirs simpleitk "
for entry in "$SITE_PACKAGES"/*; do
    base="$(basename "$entry")"
    name="$(echo "${base%%-*}" | tr 'A-Z-' 'a-z_')"
    name="${name%.py}"
    case "$SKIP" in *" $name "*) continue ;; esac
    ln -s "$entry" "$PRESENT/$base"
done
"$PYTHON" -S -c "
import sys
sys.path[:0] = ['$STAGE/site', '$ROOT/.carry/pylib', '$PRESENT', '$STAGE/fallback']
sys.argv = ['register_peers.py', '--check']
import runpy
try:
    runpy.run_path('$ROOT/benchmarks/peers/register_peers.py', run_name='__main__')
except SystemExit:
    pass
for mod in ('diffdrr', 'nanodrr', 'torchio', 'fastcore', 'roma', 'deprecated', 'einops', 'jaxtyping'):
    where = getattr(sys.modules.get(mod), '__file__', None) or ''
    assert where.startswith('$WORK'), f'{mod} came from {where!r}, not the tarball'
print('[pack_for_device] import test ok (SimpleITK stand-in:', 'SimpleITK' in sys.modules, ')', file=sys.stderr)
" | tee "$WORK/check.json"
grep -q '"nanodrr": true, "diffdrr": true' "$WORK/check.json"

tar -C "$WORK" -cf - peerlib | xz -9e -T0 >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "[pack_for_device] wrote $OUT ($(du -h "$OUT" | cut -f1); uncompressed $(du -sh "$STAGE" | cut -f1))"
for d in site fallback; do
    echo "[pack_for_device] $d: $(cd "$STAGE/$d" && ls -d *.dist-info | sed 's/\.dist-info$//' | tr '\n' ' ')"
done
