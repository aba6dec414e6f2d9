#!/usr/bin/env bash
# Renders the README gallery with torchdrr's own command line: one PA chest view of the bundled CT with different
# physics, then a labelled montage, docs/gallery/gallery.png.
#
#   bash docs/gallery/make_gallery.sh            (from anywhere; PY=path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=docs/gallery
VIEW=(--view pa --size 540 600 --pixel-spacing 0.75 0.75)

render() {  # render NAME OPTIONS...
    local name=$1
    shift
    "$PY" -m torchdrr render "${VIEW[@]}" "$@" --out "$OUT/$name.png"
}

render line_integral --physics line-integral
render mono_60keV --mono 60
render poly_60kVp --spectrum 60kVp
render poly_90kVp --spectrum 90kVp
render poly_120kVp --spectrum 120kVp
render fluoroscopy_90kVp --spectrum 90kVp --noise fluoroscopy
render radiography_90kVp --spectrum 90kVp --noise radiography

"$PY" - "$OUT" <<'PYEOF'
"""A 4 x 2 grid of half-size tiles with a label under each."""
import sys
from pathlib import Path

from PIL import Image, ImageDraw

out = Path(sys.argv[1])
tiles = [
    ("line_integral", "line integral (water model)"),
    ("mono_60keV", "monochromatic 60 keV"),
    ("poly_60kVp", "60 kVp"),
    ("poly_90kVp", "90 kVp"),
    ("poly_120kVp", "120 kVp"),
    ("fluoroscopy_90kVp", "90 kVp, fluoroscopy noise"),
    ("radiography_90kVp", "90 kVp, radiography noise"),
]
columns, scale, label_px, pad = 4, 0.5, 18, 4
first = Image.open(out / f"{tiles[0][0]}.png")
w, h = round(first.width * scale), round(first.height * scale)
rows = -(-len(tiles) // columns)
montage = Image.new("L", (columns * (w + pad) + pad, rows * (h + label_px + pad) + pad), 255)
draw = ImageDraw.Draw(montage)
for i, (name, label) in enumerate(tiles):
    x = pad + (i % columns) * (w + pad)
    y = pad + (i // columns) * (h + label_px + pad)
    montage.paste(Image.open(out / f"{name}.png").convert("L").resize((w, h), Image.Resampling.LANCZOS), (x, y))
    draw.text((x + 2, y + h + 3), label, fill=0)
montage.save(out / "gallery.png", optimize=True)
print(f"wrote {out / 'gallery.png'} ({montage.width}x{montage.height})")
PYEOF
