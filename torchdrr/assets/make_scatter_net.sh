#!/usr/bin/env bash
# Reproduces torchdrr/assets/scatter_net.pt (the scatter CNN), from the repository root.
#
# How the shipped weights were made (2026-11-25):
#   cases: training cases 0-1199 and the 48 held-out cases, simulated on an H100 (torch 2.11, CUDA 13) by the
#          first two commands below (about 2 min of Monte Carlo); the training cases were kept as float16 copies;
#   training: the last command, on the 2-core CPU VM (torch 2.13), 21 minutes from random weights.
# The learning-rate schedule follows the time budget (--max-minutes), so another machine gives slightly other weights.
# The Monte Carlo needs a CUDA GPU to be quick (about 10 cases/s on an H100; about 2 min per case on 2 CPU cores).
set -euo pipefail
CT=${1:?usage: make_scatter_net.sh CHEST_CT.nii.gz (the full LIDC-IDRI-0001 CT) [WORK_DIR]}
WORK=${2:-data/scatter}
python -m torchdrr.learned.scatter_data --split heldout --count 48 --shard 16 --out "$WORK" --ct "$CT"
python -m torchdrr.learned.scatter_data --split train --count 1200 --shard 200 --out "$WORK" --ct "$CT"
python -m torchdrr.learned.scatter_training --data "$WORK" --out torchdrr/assets/scatter_net.pt --device cpu \
    --epochs 400 --batch-size 16 --lr 1e-3 --max-minutes 21 --report "$WORK/report.json"
