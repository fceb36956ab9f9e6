#!/usr/bin/env bash
# Multi-node training under Slurm: one task per node, each starting torchrun for its GPUs.
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm_train.sh launch/configs/e5_mistral_7b.yaml [--set k=v ...]
# Every node needs the same checkout, environment and data paths (a shared filesystem); rank 0
# (on the first node) writes the run folder. Rerun the same command after a preemption: the run
# resumes from its last checkpoint.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: sbatch launch/slurm_train.sh CONFIG [--set k=v ...]}
shift
master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
srun --kill-on-bad-exit=1 bash -c "exec .venv/bin/python -m torch.distributed.run \
  --nnodes $SLURM_JOB_NUM_NODES --node_rank \$SLURM_NODEID --nproc_per_node $gpus \
  --master_addr $master --master_port ${MASTER_PORT:-29500} \
  launch/train.py --config $config --resume auto $*"
