# Shared launcher of scripts/train/*.sh (sourced, not run). Inputs, set by the calling script or the
# environment:
#   LLM       llama3_8b | phi3_mini          (recipe folder configs/${LLM}_${ENCODER}/)
#   ENCODER   clip336 | convnext                (convnext: CLIP-ConvNeXt-XXL @ 768, see README)
#   STAGE     pt | vpt | ift | vpt_ift        (recipe file ${STAGE}.yaml)
#   NGPU      GPUs of this node (default: detected with nvidia-smi, else torch; 0 = CPU)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node torchrun, static ranks (defaults: one node)
#   RDZV_ENDPOINT, RDZV_ID   multi-node torchrun with a c10d rendezvous instead (host:port of any node;
#             no NODE_RANK needed): run the same command on every node, e.g.
#               NNODES=2 RDZV_ENDPOINT=node01:29500 RDZV_ID=pt-run bash scripts/train/pretrain.sh
#             SLURM: sbatch scripts/train/slurm.sbatch pretrain (sets these from the allocation)
#   LAUNCHER  torchrun (default) | accelerate | deepspeed
#   HOSTFILE  LAUNCHER=deepspeed: DeepSpeed hostfile ("node01 slots=8" per line); started once, on the
#             first node, it reaches the others by ssh/pdsh (the recipe must set train.deepspeed)
#   DRY_RUN   1: print the launch command instead of running it
# train.output_dir must be on a filesystem every node mounts (checked at start-up).
#   TINY      folder written by `olavlm make-tiny`: smoke-run the recipe on CPU with tiny models,
#             a generated 8-image dataset and 2 optimizer steps (outputs under $SMOKE_OUT)
#   SMOKE_OUT where smoke data and runs go (default runs/smoke)
# Extra arguments of the script are passed to `olavlm train` (e.g. --train.max_steps=10).
set -euo pipefail
if [[ -n "${TINY:-}" ]]; then TINY=$(realpath "$TINY"); fi  # paths given relative to the caller
if [[ -n "${SMOKE_OUT:-}" ]]; then SMOKE_OUT=$(realpath -m "$SMOKE_OUT"); fi
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RECIPE="configs/${LLM}_${ENCODER}/${STAGE}.yaml"
if [[ ! -f "$RECIPE" ]]; then
  echo "no recipe $RECIPE (LLM=$LLM ENCODER=$ENCODER STAGE=$STAGE); available: $(ls -d configs/*_*/ | tr '\n' ' ')" >&2
  exit 2
fi
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false

if [[ -n "${TINY:-}" ]]; then
  export DS_ACCELERATOR=cpu
  SMOKE_ARGS=$("$PYTHON" -m olavlm.devkit.smoke --tiny "$TINY" --recipe "$RECIPE" --out "${SMOKE_OUT:-runs/smoke}")
  mapfile -t SMOKE <<<"$SMOKE_ARGS"
  echo "smoke run of $RECIPE on $TINY (CPU)" >&2
  exec "$PYTHON" -m olavlm.cli train "$RECIPE" "${SMOKE[@]}" "$@"
fi

if [[ -z "${NGPU:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else
    NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  fi
fi
if [[ "${NGPU:-0}" -lt 1 ]]; then
  echo "no GPU found (NGPU=$NGPU): set NGPU, or TINY=<make-tiny folder> for a CPU smoke run" >&2
  exit 2
fi
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
DS_MASTER=(); if [[ -n "${MASTER_ADDR:-}" ]]; then DS_MASTER=(--master_addr "$MASTER_ADDR"); fi  # DeepSpeed: first host
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
echo "training $RECIPE on $NNODES node(s) x $NGPU GPU(s)" >&2
case "${LAUNCHER:-torchrun}" in
  torchrun)
    if [[ -n "${RDZV_ENDPOINT:-}" ]]; then  # elastic rendezvous: ranks are agreed at start-up
      RANKS=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-olavlm}")
    else
      RANKS=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    fi
    CMD=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" --nnodes "$NNODES" "${RANKS[@]}"
         -m olavlm.cli train "$RECIPE" "$@") ;;
  accelerate)
    CMD=("$PYTHON" -m accelerate.commands.launch --num_processes $((NGPU * NNODES)) --num_machines "$NNODES"
         --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
         -m olavlm.cli train "$RECIPE" "$@") ;;
  deepspeed)  # one command on the first node; the hostfile lists every node and its GPUs
    if [[ -z "${HOSTFILE:-}" || ! -f "$HOSTFILE" ]]; then
      echo "LAUNCHER=deepspeed needs HOSTFILE=<file with one 'host slots=N' line per node>" >&2; exit 2
    fi
    CMD=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${DS_MASTER[@]}" --master_port "$MASTER_PORT"
         --no_local_rank --module olavlm.cli train "$RECIPE" "$@") ;;
  *) echo "LAUNCHER must be torchrun, accelerate or deepspeed, got ${LAUNCHER}" >&2; exit 2 ;;
esac
if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
