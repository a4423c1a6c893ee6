#!/usr/bin/env bash
# The throughput suite of benchmarks/README.md on one GPU, most important first, each run under its own time
# limit so that one that hangs or runs out of memory does not take the rest with it.
#
#   bash benchmarks/gpu.sh                  # cd ct lsun max fp32 sct scd512s scd512xxl
#   bash benchmarks/gpu.sh cd ct lsun       # a subset, in this order
#   DIR=/scratch/me/tp LIMIT=300 bash benchmarks/gpu.sh max
#   EXTRA="model.speed.compile=false" bash benchmarks/gpu.sh cd    # EXTRA: overrides added to every run
#   bash benchmarks/gpu.sh mf_b2 mf_b2_fd mf_xl2 mf_xl2_fd  # MeanFlow DiT steps, each JVP mode (not in the default list)
#
# Each run's JSON line is appended to $DIR/results.jsonl (default outputs/throughput in the repository) and
# its output to $DIR/log.txt; its Hydra run directory is $RUNS_DIR/NAME (default $DIR/runs/NAME). Compiled
# kernels are cached in $TORCHINDUCTOR_CACHE_DIR, so a second invocation on the same machine compiles faster.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(realpath -m "${DIR:-$root/outputs/throughput}")
cd "$root"
LIMIT=${LIMIT:-420}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}
RUNS_DIR=$(realpath -m "${RUNS_DIR:-$DIR/runs}")
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$root/outputs/inductor_cache}
mkdir -p "$DIR"

declare -A RUNS=(
  [cd]="experiment=imagenet64_cd model/objective/distance=l2 bench.batch=64"
  [ct]="experiment=imagenet64_ct model/objective/distance=l2 bench.batch=64"
  [lsun]="experiment=lsun_cd model/objective/distance=l2 bench.batch=16"
  [max]="experiment=imagenet64_cd model/objective/distance=l2 bench.batch=64 bench.find_max_batch=true bench.sample_steps=[]"
  [fp32]="experiment=imagenet64_cd model/objective/distance=l2 bench.batch=64 trainer.precision=32-true
          model.speed.channels_last=false model.speed.compile=false"
  [sct]="experiment=imagenet64_sct bench.batch=64"
  [scd512s]="experiment=imagenet512_scd_s bench.batch=64 trainer.precision=bf16-mixed"
  [scd512xxl]="experiment=imagenet512_scd_xxl bench.batch=16 trainer.precision=bf16-mixed"
  [mf_b2]="experiment=imagenet256_meanflow_b2 bench.batch=64"
  [mf_b2_fd]="experiment=imagenet256_meanflow_b2 bench.batch=64 model.objective.jvp=finite_difference"
  [mf_xl2]="experiment=imagenet256_meanflow_xl2 bench.batch=32"
  [mf_xl2_fd]="experiment=imagenet256_meanflow_xl2 bench.batch=32 model.objective.jvp=finite_difference"
)

runs=("$@")
[[ $# -eq 0 ]] && runs=(cd ct lsun max fp32 sct scd512s scd512xxl)
failed=0
for run in "${runs[@]}"; do
  if [[ -z "${RUNS[$run]:-}" ]]; then
    echo "unknown run '$run'; choose from: ${!RUNS[*]}" >&2
    exit 2
  fi
  out=$RUNS_DIR/$run
  echo "== $run: ${RUNS[$run]} $EXTRA" | tee -a "$DIR/log.txt"
  start=$SECONDS
  # shellcheck disable=SC2086  # the overrides are words
  timeout "$LIMIT" "$PYTHON" benchmarks/throughput.py ${RUNS[$run]} $EXTRA bench.out="$out/throughput.json" \
    hydra.run.dir="$out" >>"$DIR/log.txt" 2>&1
  rc=$?
  echo "== $run: exit $rc after $((SECONDS - start)) s" | tee -a "$DIR/log.txt"
  if [[ $rc -eq 0 ]]; then
    tee -a "$DIR/results.jsonl" <"$out/throughput.json"
  else
    failed=1
  fi
done
exit $failed
