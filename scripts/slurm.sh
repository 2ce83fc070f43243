#!/bin/bash
# Multi-node training of an mmalign recipe with SLURM + Lightning DDP (example; adapt partition/account).
#   sbatch scripts/slurm.sh configs/lit_contrastive.yaml            # 2 nodes x 4 GPUs = 8 ranks
# Lightning reads SLURM's variables (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, node list) itself:
# launch ONE task per GPU with srun and give the trainer the same devices/num_nodes as the allocation.
#SBATCH --job-name=mmalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch scripts/slurm.sh RECIPE.yaml [extra mmalign fit args]}
shift
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}      # weights pre-downloaded / pre-converted on shared storage
export TOKENIZERS_PARALLELISM=false
export NCCL_ASYNC_ERROR_HANDLING=1

# 1. Feature cache, sharded by rank: shard k of every entry belongs to rank k % world_size; the last rank
#    to finish writes the manifest. Skip when the recipe trains from raw media.
if [[ -n "${CACHE_DIR:-}" ]]; then
  srun --kill-on-bad-exit=1 bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID \
    mmalign cache --config "$0" --output "$1" --num_workers "$SLURM_CPUS_PER_TASK"' "$RECIPE" "$CACHE_DIR"
  set -- --data.init_args.cache_dir="$CACHE_DIR" "$@"
fi

# 2. Training: DDP over every task; contrastive negatives are gathered from all 8 ranks.
srun --kill-on-bad-exit=1 mmalign fit --config "$RECIPE" --config configs/trainer/ddp.yaml \
  --trainer.accelerator=gpu --trainer.devices="$SLURM_NTASKS_PER_NODE" --trainer.num_nodes="$SLURM_NNODES" \
  --trainer.precision=bf16-mixed "$@"
