#!/usr/bin/env bash
# Multi-node CAP pruning under Slurm: one launcher per node (accelerate or torchrun),
# which starts GPUS_PER_NODE ranks; requeue-safe (resumes from the latest checkpoint).
#
#   sbatch slurm/prune_large.sh
#   CONFIG=capscale/configs/roberta_large_zero3.yaml EXTRA="train.lr=2.0e-5" \
#       sbatch --nodes 4 slurm/prune_large.sh
#   DRY_RUN=1 sbatch --nodes 2 slurm/prune_large.sh   # print each node's command only
#   # CPU nodes (e.g. scripts/slurm_local.sh): command-line options override the #SBATCH
#   # lines below; no GPUs means one rank per node unless GPUS_PER_NODE says otherwise.
#   CAPSCALE_CPU=1 sbatch --gpus-per-node=0 --cpus-per-task=1 slurm/prune_large.sh
#
# Everything is set by environment variables (no positional arguments):
#   CONFIG             capscale YAML (path, or a name in capscale/configs)
#   OUTPUT_DIR         run directory (checkpoints, export); default outputs/<job name>-<job id>
#   EXTRA              more key=value overrides, space-separated
#   STRATEGY           override the config's strategy (single/ddp/zero3/fsdp2); empty: keep
#   LAUNCHER           accelerate (default) or torchrun
#   ACCELERATE_CONFIG  optional accelerate YAML passed as --config_file
#   NNODES             default $SLURM_NNODES
#   GPUS_PER_NODE      ranks per node; default the allocation's GPUs per node
#                      ($SLURM_GPUS_ON_NODE, else --gpus-per-node), 1 when it has none
#   MAIN_PORT          rendezvous port on the head node (default 29500)
#   RESUME             1 (default): pass resume=latest, so a requeued job continues; 0: off
#                      (it continues from checkpoints: set checkpoint.every_steps, or a
#                      requeued job starts over)
#   REPO_DIR           capscale checkout to run from (default: the submission directory)
#   DRY_RUN            1: print the exact per-node command instead of running it
#   CAPSCALE_PROGRESS_INTERVAL_S  seconds between progress lines in the output file (30)
#
#SBATCH --job-name=capscale-prune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# (append: a requeued job runs again into the same output file, which Slurm would
# otherwise truncate, losing the interrupted run's log)
#
# --- cluster specifics: uncomment and edit for your site ------------------------------
##SBATCH --partition=gpu
##SBATCH --account=my-account
##SBATCH --qos=normal
# export NCCL_SOCKET_IFNAME=ib0        # the inter-node interface
# export NCCL_IB_HCA=mlx5              # InfiniBand adapters
# export NCCL_DEBUG=WARN
# module load cuda/12.4                # or: source /path/to/venv/bin/activate
# ---------------------------------------------------------------------------------------
set -euo pipefail

if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
  echo "prune_large.sh: no Slurm allocation (SLURM_JOB_NODELIST unset); submit it with sbatch" >&2
  exit 2
fi

CONFIG=${CONFIG:-capscale/configs/demo_minilm_tweets.yaml}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
# --gpus-per-node=0 leaves SLURM_GPUS_ON_NODE unset and SLURM_GPUS_PER_NODE=0 (a typed
# request reads "a100:4": keep the count).
ALLOC_GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${ALLOC_GPUS##*:}}
if [[ "$GPUS_PER_NODE" == 0 ]]; then
  GPUS_PER_NODE=1  # no GPUs in the allocation: one (CPU) rank per node
fi
if ! [[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
  echo "prune_large.sh: GPUS_PER_NODE=$GPUS_PER_NODE; set it to the ranks per node" >&2
  exit 2
fi
OUTPUT_DIR=${OUTPUT_DIR:-outputs/${SLURM_JOB_NAME:-capscale}-${SLURM_JOB_ID:-0}}
EXTRA=${EXTRA:-}
STRATEGY=${STRATEGY:-}
LAUNCHER=${LAUNCHER:-accelerate}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-}
MAIN_PORT=${MAIN_PORT:-29500}
RESUME=${RESUME:-1}
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
DRY_RUN=${DRY_RUN:-0}

# pipefail off here: `head` closing the pipe early would fail the job with SIGPIPE.
HEAD_NODE=$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [[ -z "$HEAD_NODE" ]]; then
  echo "prune_large.sh: scontrol found no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
  exit 2
fi
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
export TORCH_DIST_INIT_BARRIER=1  # all ranks wait for the store before the first collective
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
# DeepSpeed calls collectives torch deprecates; torch then warns (two lines) on every call,
# burying the progress lines of the output file. Set PYTHONWARNINGS to see them again.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning:torch.distributed.c10d_logger}

# capscale's own arguments: the config, then key=value overrides (later ones win).
run_args=(capscale/run.py --config "$CONFIG" "output_dir=$OUTPUT_DIR")
[[ -n "$STRATEGY" ]] && run_args+=("strategy=$STRATEGY")
[[ "$RESUME" == 1 ]] && run_args+=("resume=latest")
if [[ -n "$EXTRA" ]]; then
  read -r -a extra_args <<< "$EXTRA"
  run_args+=("${extra_args[@]}")
fi

case "$LAUNCHER" in
  accelerate)
    launch=(accelerate launch --multi_gpu --num_machines "$NNODES"
            --num_processes "$WORLD_SIZE" --main_process_ip "$HEAD_NODE"
            --main_process_port "$MAIN_PORT" --rdzv_backend c10d)
    [[ -n "$ACCELERATE_CONFIG" ]] && launch+=(--config_file "$ACCELERATE_CONFIG")
    rank_flag=--machine_rank ;;
  torchrun)
    launch=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
            --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$MAIN_PORT"
            --rdzv_id "${SLURM_JOB_ID:-capscale}")
    rank_flag=--node_rank ;;
  *)
    echo "prune_large.sh: LAUNCHER=$LAUNCHER; use accelerate or torchrun" >&2
    exit 2 ;;
esac

# One string run by bash on every node. \$SLURM_NODEID stays literal here and is
# expanded by each node's shell; unescaped, every node would claim machine rank 0.
NODE_CMD="cd $(printf '%q' "$REPO_DIR") && $(printf '%q ' "${launch[@]}")$rank_flag \$SLURM_NODEID $(printf '%q ' "${run_args[@]}")"
export NODE_CMD

echo "capscale: $NNODES node(s) x $GPUS_PER_NODE GPU(s) = $WORLD_SIZE ranks; head node $HEAD_NODE:$MAIN_PORT; output $OUTPUT_DIR"
srun_args=(--nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)

if [[ "$DRY_RUN" == 1 ]]; then
  # Each node prints its command with its own node id substituted, exactly as it would run.
  # shellcheck disable=SC2016  # expanded by the per-node shell
  srun "${srun_args[@]}" bash -c \
    'echo "[node $SLURM_NODEID] ${NODE_CMD//\$SLURM_NODEID/$SLURM_NODEID}"'
  exit 0
fi

# Requeue before the time limit (Slurm sends USR1 300 s ahead, see --signal above); the
# requeued job runs this script again and resume=latest picks up the last checkpoint.
requeue() {
  echo "capscale: caught signal, requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1
# In the background, so the trap runs while srun is still going (bash defers traps
# during a foreground command).
srun "${srun_args[@]}" bash -c "$NODE_CMD" &
wait $!
