#!/usr/bin/env bash
# Reproduces torchdrr/assets/scatter_net.pt (the scatter CNN), from the repository root.
#
# How the shipped weights were made (2026-11-25). The weights' metadata holds the same record ("lineage").
#   cases:    training cases 0-7699 (Monte Carlo, 10^4 flat-field photons per bin) and the 48 held-out cases
#             (tests/data/scatter_heldout.npz, under 2 % noise each), simulated on an H100 (torch 2.11, CUDA 13):
#             about 10 cases/s, so 7,700 cases take about 12.5 minutes.
#   training: five runs, each starting from the weights of the one before:
#             1. 2-core CPU (torch 2.13), cases 0-1199, from random weights, 21 min, without the mean-SPR term
#                of the loss and without the transposition (the training code of commit 580b54c);
#             2-4. H100, cases 0-3099, 5.5 / 6 / 5.5 min;
#             5. H100, cases 3100-7699 (new cases), 6 min.
#             That makes 1,260 s on the CPU and 1,301 s on the H100.
# Each learning-rate schedule follows its time budget (--max-minutes), so another machine gives slightly different
# weights. The Monte Carlo needs a CUDA GPU to be quick (about 2 min per case on 2 CPU cores).
set -euo pipefail
CT=${1:?usage: make_scatter_net.sh CHEST_CT.nii.gz (the full LIDC-IDRI-0001 CT) [WORK_DIR]}
WORK=${2:-data/scatter}
mkdir -p "$WORK/first" "$WORK/second"
cp tests/data/scatter_heldout.npz "$WORK/first/heldout-00000.npz"
cp tests/data/scatter_heldout.npz "$WORK/second/heldout-00000.npz"
# To remake the held-out cases instead of using the committed copy:
#   python -m torchdrr.learned.scatter_data --split heldout --count 48 --shard 16 --out "$WORK/first" --ct "$CT"
python -m torchdrr.learned.scatter_data --split train --first 0 --count 3100 --shard 100 --out "$WORK/first" --ct "$CT"
python -m torchdrr.learned.scatter_data --split train --first 3100 --count 4600 --shard 100 --out "$WORK/second" \
    --ct "$CT"

train() {  # train DATA OUT INIT BATCH LR SPR_WEIGHT MINUTES [extra arguments]
    local data=$1 out=$2 init=$3 batch=$4 lr=$5 spr=$6 minutes=$7
    shift 7
    python -m torchdrr.learned.scatter_training --data "$data" --out "$out" ${init:+--init "$init"} \
        --epochs 400 --batch-size "$batch" --lr "$lr" --spr-weight "$spr" --max-minutes "$minutes" \
        --report "${out%.pt}.json" "$@"
}
# Run 1 ran older training code (see above); with today's code its closest equivalent is this command, on cases
# 0-1199. Cases 0-1199 are the first 1,200 of the first folder.
mkdir -p "$WORK/run1"
python - "$WORK/first" "$WORK/run1" <<'PY'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src.glob("train-*.npz"))[:12]:  # shards of 100: cases 0-1199
    shutil.copy(f, dst / f.name)
shutil.copy(src / "heldout-00000.npz", dst / "heldout-00000.npz")
PY
train "$WORK/run1" "$WORK/net1.pt" "" 16 1e-3 0 21 --device cpu
train "$WORK/first" "$WORK/net2.pt" "$WORK/net1.pt" 32 1e-3 1 5.5 --device cuda
train "$WORK/first" "$WORK/net3.pt" "$WORK/net2.pt" 64 5e-4 1 6 --device cuda
train "$WORK/first" "$WORK/net4.pt" "$WORK/net3.pt" 64 3e-4 4 5.5 --device cuda
train "$WORK/second" torchdrr/assets/scatter_net.pt "$WORK/net4.pt" 64 3e-4 4 6 --device cuda
