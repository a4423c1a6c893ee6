#!/bin/bash
# Train on SLURM, from the repository root:
#
#   sbatch slurm/train.sh experiment=lsun_cd model.teacher_ckpt=...          # one node, 8 GPUs
#   sbatch --nodes=4 slurm/train.sh experiment=lsun_cd model.teacher_ckpt=...  # 4 nodes x 8 GPUs
#
# Any #SBATCH line below can be overridden on the sbatch command line, e.g. --account=ACC,
# --partition=PART, --qos=QOS (or uncomment and fill in the lines below), --time=2-00:00:00, or
# --gpus-per-node=4 --ntasks-per-node=4 for 4-GPU nodes. One task per GPU: --ntasks-per-node must equal
# the GPUs per node (Lightning rejects --ntasks). trainer.devices and trainer.num_nodes are set from the
# allocation; if you pass them too they must match it (train.py stops with an error naming both).
#
# Preemption: SLURM sends SIGUSR1 120 s before the time limit; train.py finishes the current step,
# writes checkpoints/last.ckpt and requeues the job, which resumes from it in the same run directory,
# outputs/<experiment>/slurm-<job id>/ (stable across requeues), and logs to the same W&B run.
#
#SBATCH --job-name=cm-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
##SBATCH --account=ACCOUNT
##SBATCH --partition=PARTITION
##SBATCH --qos=QOS
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
job=${SLURM_JOB_ID}
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1  # the log shows each line when it happens, the last ones too
echo "$(date -Is) job ${job} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: $*"

# --kill-on-bad-exit: a rank that dies takes the others down rather than leaving them waiting.
srun --kill-on-bad-exit=1 "${PYTHON:-python}" train.py \
    "hydra.run.dir=outputs/\${run_name}/slurm-${job}" \
    "trainer.devices=${SLURM_NTASKS_PER_NODE}" "trainer.num_nodes=${SLURM_JOB_NUM_NODES}" \
    "$@"
