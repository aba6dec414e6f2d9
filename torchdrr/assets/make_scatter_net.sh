#!/usr/bin/env bash
# Reproduces torchdrr/assets/scatter_net.pt (the scatter CNN) on one CUDA GPU, from the repository root.
#
# The shipped weights were made in two runs on an H100 (torch 2.11, CUDA 13), each inside a 10-minute machine lease,
# so both ran to a time budget; the counts below are what those budgets reached:
#   stage 1: cases 0-1399 of the training stream (2.3 min of Monte Carlo), 2.3 min of training from random weights
#            (186 epochs, 8,357 steps of 32 images, 138 s);
#   stage 2: cases 1400-3199 (2.6 min), 3.5 min of fine-tuning from stage 1 (379 epochs, 9,454 steps of 64 images,
#            210 s).
# The held-out cases are tests/data/scatter_heldout.npz (48 cases; make them again with the heldout command below).
# The learning-rate schedule follows the time budget (--max-minutes), so another GPU gives slightly other weights.
set -euo pipefail
CT=${1:?usage: make_scatter_net.sh CHEST_CT.nii.gz (the full LIDC-IDRI-0001 CT) [WORK_DIR]}
WORK=${2:-data/scatter}
python -m torchdrr.learned.scatter_data --split heldout --count 48 --shard 16 --out "$WORK/heldout" --ct "$CT"
python -m torchdrr.learned.scatter_data --split train --count 1400 --shard 200 --out "$WORK/stage1" --ct "$CT"
python -m torchdrr.learned.scatter_data --split train --first 1400 --count 1800 --shard 200 --out "$WORK/stage2" --ct "$CT"
cp "$WORK"/heldout/heldout-*.npz "$WORK/stage1/"
cp "$WORK"/heldout/heldout-*.npz "$WORK/stage2/"
python -m torchdrr.learned.scatter_training --data "$WORK/stage1" --out "$WORK/stage1.pt" \
    --epochs 400 --batch-size 32 --lr 1e-3 --max-minutes 2.3 --report "$WORK/stage1.json"
python -m torchdrr.learned.scatter_training --data "$WORK/stage2" --out torchdrr/assets/scatter_net.pt \
    --init "$WORK/stage1.pt" --epochs 400 --batch-size 64 --lr 5e-4 --max-minutes 3.5 --report "$WORK/stage2.json"
