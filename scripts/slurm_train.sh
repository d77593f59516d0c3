#!/bin/bash
# Mask R-CNN's 1x COCO recipe on several machines of a SLURM cluster: torchrun + DDP + NCCL.
#
# The same command as on one machine (`torchrun --nproc_per_node=8 -m mrcnn_edu.cli train ...`),
# started once per node by srun; the launchers find each other through torchrun's c10d
# rendezvous on the first node of the allocation, then start one process per GPU. Notebook
# 09_coco_training.ipynb explains the recipe.
#
#   sbatch scripts/slurm_train.sh                         # 2 nodes x 8 GPUs, preset coco-r50-fpn-1x
#   sbatch --nodes=4 scripts/slurm_train.sh --set train.batch_size=32
#   DATA=/data/coco RUN=runs/r50-1x sbatch scripts/slurm_train.sh
#
# Extra arguments go to `mrcnn-edu train` (e.g. `--set key=value`, `--max-minutes`, `--eval`).
#
# Batch and learning rate: train.batch_size is the GLOBAL batch (all GPUs together, 16 in the
# preset); each GPU takes batch_size / (nodes x GPUs per node) images, which must divide evenly.
# The preset states its reference batch (16 for lr 0.02); a different global batch scales the
# learning rate by batch / 16 and shortens or lengthens the warm-up to the same number of images
# (Goyal et al. 2017). The number of steps is not scaled: with batch 32, set train.steps=45000
# and train.milestones="(30000, 40000)" to see the same number of images as the 1x schedule.
#
# Time: the 1x schedule (90k steps of 16 images) takes about 6.5 h on 8 V100s (detectron2's
# Mask R-CNN R50-FPN 1x: 0.261 s/iter; the often-quoted 0.21 s/iter, 5.3 h, is its Faster R-CNN
# without the mask branch); with twice the GPUs (and the same global batch) expect a little over
# half.
#
# ImageNet weights: the coco-* presets start the ResNet-50 from torchvision's
# ResNet50_Weights.IMAGENET1K_V1, which every rank reads from torch's hub cache
# (${TORCH_HOME:-~/.cache/torch}/hub/checkpoints/resnet50-0676ba61.pth, downloaded on first
# use). Compute nodes without internet: download
# https://download.pytorch.org/models/resnet50-0676ba61.pth once to a shared path and add
# `--set model.backbone.weights=/shared/resnet50-0676ba61.pth` (data/README.md).
#
# Requeueing: RUN must be on a file system every node sees (rank 0 writes the checkpoints, every
# rank reads RUN/last.pt on --resume). --resume starts afresh when RUN holds no checkpoint, so the
# same script continues a run after a time limit or a failure: --max-minutes below stops cleanly,
# with a checkpoint, 20 minutes before the job's time limit; `sbatch` it again to go on.

#SBATCH --job-name=mrcnn-r50-1x
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node ...
#SBATCH --gpus-per-node=8            # ... which starts one training process per GPU
#SBATCH --cpus-per-task=64           # data loading: train.num_workers per process
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

DATA=${DATA:-data/coco}                       # COCO 2017 layout (data/README.md)
RUN=${RUN:-runs/coco-r50-fpn-1x}              # checkpoints, metrics.csv (shared file system)
PRESET=${PRESET:-coco-r50-fpn-1x}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-29500}                           # a free TCP port on the first node
MINUTES=${MINUTES:-220}                       # stop cleanly before the --time limit above

# The rendezvous endpoint: the first node of the allocation hosts torchrun's c10d store.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# A rank that dies makes the others stop instead of waiting: NCCL's watchdog aborts a
# collective that waits longer than this many seconds (mrcnn_edu.engine.distributed).
export MRCNN_EDU_DIST_TIMEOUT=${MRCNN_EDU_DIST_TIMEOUT:-600}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # per process; the GPUs do the heavy work
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# --kill-on-bad-exit: when one node's launcher fails, SLURM ends the others at once.
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$PORT" \
    -m mrcnn_edu.cli train --preset "$PRESET" --data "$DATA" --out "$RUN" \
    --resume --max-minutes "$MINUTES" --no-progress "$@"
