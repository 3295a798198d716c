#!/usr/bin/env bash
# GPU check of aligntool on one GPU (sized for one H200: under 8 minutes in all, install included). Installs what it
# can (install.sh --dev, then the vllm extra; with no network it says what it could not install and goes on), prints
# nvidia-smi, then runs each check under a timeout, going on past failures:
#   build    a random-init Qwen2-0.5B-shaped model (bench_generation.py --build-qwen2-0.5b; no download, ever)
#   (a)      the README quickstart: DPO on the tiny model with train.bf16=true, then aligntool eval of it
#   (b)      PPO and ReMax on the 0.5B model with generation.backend=hf and =vllm (4 iterations, 64 new tokens)
#   (c)      QLoRA DPO (peft.load_in_4bit=true) on the 0.5B model
#   (d)      ZeRO-3 on one GPU (distributed.backend=deepspeed, zero_stage=3): DPO on the 0.5B model
#   (e)      scripts/bench_generation.py on the 0.5B model: HF generate vs vLLM tokens/s
#   (f)      rollouts at scale: REINFORCE++ with generation.asynchronous (HF); ReMax with vLLM sleep mode and
#            max_num_seqs (GPU + vllm); GRPO through TRL's AsyncGRPOTrainer against a `vllm serve` on a second GPU
#            (skipped with fewer than 2 GPUs: NCCL weight transfer needs the server and the trainer on separate GPUs)
#   (g)      scripts/bench_sampler.py: per-row reproducible sampling vs plain at 32k/152k vocabularies, with the % of
#            the card's measured bf16 matmul peak; multi-turn tool episodes (recipes reinforce_pp_tools, grpo_tools on
#            tiny-tools, 4 steps)
# Each check prints PASS / FAIL / TIMEOUT / SKIP; the end prints a table (samples/s and peak memory from each run's
# summary.json, the most GPU memory nvidia-smi saw during the check) and writes it to gpu_check_summary.txt.
# Everything goes under the work folder: $OUT when set (the device tool brings it back), else /tmp/gpu_check.
#
# --cpu-dry-run: the same steps on a CPU with the tiny model and tiny step counts, without install, without the checks
# that need a GPU (4-bit: LoRA DPO instead) and without vLLM unless it is importable - to check this script itself.
#
# Exit 0 when every check passed or was skipped, else 1. The 0.5B model is built in $GPU_CHECK_MODELS
# (default /tmp/gpu_check_models, outside $OUT); the runs' weights are deleted at the end, their logs kept.
# Usage: bash scripts/gpu_check.sh [--cpu-dry-run] [--work DIR] [--budget SECONDS] [--skip-install] [--only REGEX]
#        (--only: run only the checks whose name matches the bash regex, e.g. '^(b-|e-)'; install and build always run)
#        (PYTHON=/path/to/python picks the interpreter; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

DRY=0
WORK=""
BUDGET=""
INSTALL=1
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) DRY=1; shift ;;
    --work) WORK="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (expected --cpu-dry-run, --work DIR, --budget S, --skip-install, --only REGEX)" >&2
       exit 2 ;;
  esac
done
[[ $DRY == 1 ]] && INSTALL=0
WORK="${WORK:-${OUT:-/tmp/gpu_check}}"
BUDGET="${BUDGET:-$([[ $DRY == 1 ]] && echo 2400 || echo 450)}"  # seconds for everything; 8 min = 480 on the GPU
MODELS="${GPU_CHECK_MODELS:-/tmp/gpu_check_models}"  # outside $OUT: a 0.7 GB model need not come back
mkdir -p "$WORK/logs" "$WORK/runs" "$MODELS"
SUMMARY="$WORK/gpu_check_summary.txt"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # aligntool from this tree even where pip install -e failed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing is downloaded; models are built here
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-15}" PIP_RETRIES="${PIP_RETRIES:-1}"
export TOKENIZERS_PARALLELISM=false
AT=("$PY" -c "import sys; from aligntool.cli import main; sys.exit(main())")  # the CLI of this tree and this python
T0=$SECONDS

HAVE_GPU=0
if [[ $DRY == 0 ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; fi

say() { echo "$*" | tee -a "$WORK/gpu_check.log"; }
left() { echo $(( BUDGET - (SECONDS - T0) )); }

NAMES=(); STATUS=(); SECS=(); INFO=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); INFO+=("$4"); }

# run_check NAME TIMEOUT_S RUN_DIR_OR_- COMMAND... : runs COMMAND with its output in logs/NAME.log (stdout in
# $CHECK_STDOUT instead when that is set), under timeout
# (which ends the command's whole process group: torchrun ranks, vLLM engine processes), while nvidia-smi samples
# the GPU's used memory; records PASS/FAIL/TIMEOUT/SKIP and what the run's summary.json says.
run_check() {
  local name="$1" limit="$2" rundir="$3"; shift 3
  local remaining; remaining=$(left)
  wanted "$name" || return 0
  if (( remaining < 30 )); then
    say "SKIP    $name (time budget spent: $((SECONDS - T0)) of $BUDGET s)"
    record "$name" SKIP 0 "no time left"
    return 0
  fi
  (( limit > remaining )) && limit=$remaining
  local log="$WORK/logs/$name.log" mem="$WORK/logs/$name.gpumem" poller=""
  echo "+ $*" > "$log"
  if [[ $HAVE_GPU == 1 ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem" 2>/dev/null &
    poller=$!
  fi
  local t=$SECONDS rc
  if [[ -n ${CHECK_STDOUT:-} ]]; then  # the command's stdout is data (JSON): into that file, stderr into the log
    timeout -k 15 "$limit" "$@" > "$CHECK_STDOUT" 2>> "$log"; rc=$?
  else
    timeout -k 15 "$limit" "$@" >> "$log" 2>&1; rc=$?
  fi
  local dt=$((SECONDS - t))
  [[ -n $poller ]] && { kill "$poller" 2>/dev/null; wait "$poller" 2>/dev/null; }
  local status
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL($rc)" ;;
  esac
  local info=""
  if [[ $rundir != - && -f $rundir/summary.json ]]; then
    info=$("$PY" - "$rundir" <<'EOF' 2>/dev/null
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
s = json.loads((d / "summary.json").read_text())
rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()] \
    if (d / "metrics.jsonl").is_file() else []
lens = [r["completions/mean_length"] for r in rows if "completions/mean_length" in r]
sps = s.get("train_samples_per_second")
out = [f"train {s.get('train_time_s')} s", f"{sps} samples/s"]
if lens and sps:
    out.append(f"~{sps * sum(lens) / len(lens):.0f} response tok/s (mean length {sum(lens) / len(lens):.1f})")
out.append(f"peak {s.get('peak_memory_mb')} MB (torch)")
print(", ".join(out))
EOF
)
  fi
  if [[ -s $mem ]]; then
    info="${info:+$info, }nvidia-smi max $(sort -n "$mem" | tail -1) MiB"
  fi
  say "$(printf '%-8s %s (%d s)%s' "$status" "$name" "$dt" "${info:+: $info}")"
  if [[ $status != PASS ]]; then  # the reason: aligntool's one-line error, else the log's last lines
    local why
    why=$(grep -E "^aligntool: error|Error|error:" "$log" | grep -v "^+ " | tail -2)
    [[ -z $why ]] && why=$(tail -3 "$log")
    echo "$why" | sed 's/^/          /' | cut -c1-300 | tee -a "$WORK/gpu_check.log"
    info="${info:+$info; }$(echo "$why" | tail -1 | cut -c1-160)"
  fi
  record "$name" "$status" "$dt" "$info"
  return 0
}

wanted() { [[ -z $ONLY || $1 =~ $ONLY || $1 =~ ^(install|build) ]]; }   # not filtered out by --only
last_is() { [[ ${#NAMES[@]} -gt 0 && ${NAMES[-1]} == "$1" ]]; }        # the last recorded check is NAME
last_failed() { last_is "$1" && [[ ${STATUS[-1]} != PASS ]]; }     # ... and it did not pass
vllm_ok() { "$PY" -c "import vllm" >/dev/null 2>&1; }

say "gpu_check: $(date -u +%FT%TZ), repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), \
work $WORK, python $PY, budget ${BUDGET}s, mode $([[ $DRY == 1 ]] && echo cpu-dry-run || echo gpu)"

# ------------------------------------------------------------------------------------------------ install
if [[ $INSTALL == 1 ]]; then
  run_check install-dev 200 - bash scripts/install.sh --dev
  if vllm_ok; then
    say "vllm: already importable ($("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null))"
  elif grep -q -- "--vllm" scripts/install.sh; then
    run_check install-vllm 240 - bash scripts/install.sh --vllm
  else
    say "vllm: scripts/install.sh has no --vllm option; vllm not installed"
    record install-vllm SKIP 0 "install.sh has no --vllm"
  fi
else
  say "install: skipped ($([[ $DRY == 1 ]] && echo 'cpu dry run' || echo '--skip-install'))"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$WORK/gpu_check.log"
import importlib.util
missing = [m for m in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes",
                       "vllm") if importlib.util.find_spec(m) is None]
print("not installed: " + (", ".join(missing) if missing else "nothing (all of torch, transformers, trl, peft, "
                                                                "accelerate, datasets, deepspeed, bitsandbytes, vllm)"))
EOF
VLLM=0; vllm_ok && VLLM=1

# ------------------------------------------------------------------------------------------------ environment
if [[ $HAVE_GPU == 1 ]]; then
  nvidia-smi 2>&1 | tee -a "$WORK/gpu_check.log"
elif [[ $DRY == 0 ]]; then
  say "WARNING: no working nvidia-smi: this is not a GPU machine (use --cpu-dry-run for a CPU)"
fi
run_check doctor 90 - "${AT[@]}" doctor
[[ -f $WORK/logs/doctor.log ]] && sed -n '2,40p' "$WORK/logs/doctor.log" | tee -a "$WORK/gpu_check.log"

# ------------------------------------------------------------------------------------------------ settings per mode
R="$WORK/runs"
if [[ $DRY == 1 ]]; then
  M=tiny
  DPO_STEPS=(train.max_steps=4 train.per_device_train_batch_size=8)
  ONLINE=(train.max_steps=2 train.per_device_train_batch_size=4 algo.max_new_tokens=16)
  DTYPE=()
  GEN_ARGS=(--num-prompts 16 --max-new-tokens 16 --repeats 2)
  VLLM_UTIL=0.2
else
  M="$MODELS/qwen2-0.5b"
  DPO_STEPS=(train.max_steps=10 train.per_device_train_batch_size=8)
  ONLINE=(train.max_steps=4 train.per_device_train_batch_size=16 algo.max_new_tokens=64)
  DTYPE=(model.dtype=bfloat16)
  GEN_ARGS=(--num-prompts 64 --max-new-tokens 128 --repeats 3)
  VLLM_UTIL=0.3
  if [[ -f $M/model.safetensors ]]; then
    say "model: $M already built"
  else
    run_check build-qwen2-0.5b 240 - "$PY" scripts/bench_generation.py --build-qwen2-0.5b "$M"
  fi
fi
QUIET=(train.save_steps=100000 train.logging_steps=1 --overwrite)

# (a) the README quickstart, in bf16, and the eval of its model
QS=(train.bf16=true)
[[ $DRY == 1 ]] && QS+=(train.max_steps=10)
run_check a-dpo-tiny-bf16 240 "$R/dpo_tiny" "${AT[@]}" train --recipe dpo output_dir="$R/dpo_tiny" \
  "${QS[@]}" --overwrite
if [[ -f $R/dpo_tiny/summary.json ]]; then
  CHECK_STDOUT="$WORK/eval_dpo_tiny.json" run_check a-eval-dpo-tiny 120 - "${AT[@]}" eval --model "$R/dpo_tiny" \
    --reference tiny --json $([[ $DRY == 1 ]] && echo --num-prompts 32)
  ev=$("$PY" - "$WORK/eval_dpo_tiny.json" <<'EOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
print(f"gold reward {d['gold_reward']:.3f} +- {d['gold_reward_stderr']:.3f} vs reference "
      f"{d['reference_gold_reward']:.3f}, win rate {d['win_rate']:.2f}, KL {d['kl_to_reference']:.1f}, "
      f"{d['num_prompts']} prompts")
EOF
)
  if [[ -n $ev ]] && last_is a-eval-dpo-tiny; then
    say "          $ev"
    INFO[${#INFO[@]}-1]="$ev"
  fi
elif wanted a-eval-dpo-tiny; then
  say "SKIP    a-eval-dpo-tiny (no trained model)"; record a-eval-dpo-tiny SKIP 0 "no trained model"
fi

# (b) PPO and ReMax with the HF and the vLLM generation backend
for algo in ppo remax; do
  extra=()
  [[ $algo == ppo ]] && extra=(algo.ppo_epochs=1 algo.num_minibatches=1)
  for gb in hf vllm; do
    name="b-$algo-$gb"
    if [[ $gb == vllm && $VLLM == 0 ]] && wanted "$name"; then
      say "SKIP    $name (vllm not importable)"; record "$name" SKIP 0 "vllm not importable"; continue
    fi
    gen=(generation.backend="$gb")
    [[ $gb == vllm ]] && gen+=(generation.vllm_mode=colocate generation.gpu_memory_utilization="$VLLM_UTIL")
    run_check "$name" 180 "$R/$name" "${AT[@]}" train --recipe "$algo" output_dir="$R/$name" \
      model.name_or_path="$M" "${DTYPE[@]}" train.bf16=true "${ONLINE[@]}" "${extra[@]}" "${gen[@]}" "${QUIET[@]}"
    if [[ $gb == hf ]] && last_failed "$name" && grep -q "unknown key 'generation'" "$WORK/logs/$name.log"; then
      say "          (this aligntool has no generation section: $algo again with its default generation)"
      run_check "b-$algo-default" 180 "$R/b-$algo-default" "${AT[@]}" train --recipe "$algo" \
        output_dir="$R/b-$algo-default" model.name_or_path="$M" "${DTYPE[@]}" train.bf16=true "${ONLINE[@]}" \
        "${extra[@]}" "${QUIET[@]}"
    fi
  done
done

# (c) QLoRA DPO (4-bit base: CUDA + bitsandbytes); on a CPU dry run, plain LoRA through the same keys
if [[ $HAVE_GPU == 1 ]]; then
  run_check c-qlora-dpo 180 "$R/qlora_dpo" "${AT[@]}" train --recipe dpo output_dir="$R/qlora_dpo" \
    model.name_or_path="$M" peft.r=16 peft.load_in_4bit=true train.bf16=true "${DPO_STEPS[@]}" "${QUIET[@]}"
else
  run_check c-lora-dpo-no4bit 180 "$R/lora_dpo" "${AT[@]}" train --recipe dpo output_dir="$R/lora_dpo" \
    model.name_or_path="$M" peft.r=8 "${DPO_STEPS[@]}" "${QUIET[@]}"
fi

# (d) ZeRO-3 on one process
ZERO3=(train --recipe dpo output_dir="$R/zero3_dpo" model.name_or_path="$M" "${DTYPE[@]}" train.bf16=true
       distributed.backend=deepspeed distributed.zero_stage=3 "${DPO_STEPS[@]}" "${QUIET[@]}")
run_check d-zero3-dpo 180 "$R/zero3_dpo" "${AT[@]}" "${ZERO3[@]}"
if last_failed d-zero3-dpo && grep -q "mpi4py\|mpi_discovery" "$WORK/logs/d-zero3-dpo.log"; then
  # DeepSpeed looks for MPI when torchrun's variables are missing: a one-process run not under a launcher
  say "          (DeepSpeed wanted MPI in a plain one-process run: again with torchrun's variables for one rank)"
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  run_check d-zero3-dpo-rank-env 180 "$R/zero3_dpo" env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 \
    MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" "${AT[@]}" "${ZERO3[@]}"
fi

# (e) generation throughput, HF vs vLLM (HF only when vllm is not importable)
run_check e-bench-generation 240 - "$PY" scripts/bench_generation.py --model "$M" "${GEN_ARGS[@]}" \
  --timeout 200 --json "$WORK/bench_generation.json"
gen=$("$PY" - "$WORK/bench_generation.json" <<'EOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
r = d["results"]
out = [f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in r.items()]
if "hf" in r and "vllm" in r:
    out.append(f"vLLM/HF {r['vllm']['tokens_per_s'] / r['hf']['tokens_per_s']:.2f}")
out += [f"{k} failed" for k in d["failed"]]
print(", ".join(out))
EOF
)
[[ -n $gen ]] && last_is e-bench-generation && INFO[${#INFO[@]}-1]="$gen${INFO[-1]:+, ${INFO[-1]}}"
if [[ -f $WORK/logs/e-bench-generation.log ]]; then
  grep -E "^generation|^ *backend|^ *(hf|vllm) |^vLLM" "$WORK/logs/e-bench-generation.log" | tee -a "$WORK/gpu_check.log"
fi

# (f) rollouts at scale: asynchronous engine generation; vLLM sleep mode + max_num_seqs; TRL's AsyncGRPOTrainer
run_check f-reinforce-pp-async 180 "$R/f-rpp-async" "${AT[@]}" train --recipe reinforce_pp output_dir="$R/f-rpp-async" \
  model.name_or_path="$M" "${DTYPE[@]}" "${ONLINE[@]}" generation.asynchronous=true "${QUIET[@]}"
if wanted f-remax-vllm-sleep; then
  if [[ $HAVE_GPU == 0 || $VLLM == 0 ]]; then
    say "SKIP    f-remax-vllm-sleep (needs a GPU and vllm: vLLM's CPU build has no sleep mode)"
    record f-remax-vllm-sleep SKIP 0 "no GPU or no vllm"
  else
    run_check f-remax-vllm-sleep 180 "$R/f-remax-sleep" "${AT[@]}" train --recipe remax output_dir="$R/f-remax-sleep" \
      model.name_or_path="$M" "${DTYPE[@]}" train.bf16=true "${ONLINE[@]}" generation.backend=vllm \
      generation.gpu_memory_utilization="$VLLM_UTIL" generation.enable_sleep_mode=true generation.max_num_seqs=8 \
      "${QUIET[@]}"
  fi
fi
if wanted f-async-grpo; then
  ngpu=0; [[ $HAVE_GPU == 1 ]] && ngpu=$(nvidia-smi -L | wc -l)
  if (( ngpu < 2 )) || [[ $VLLM == 0 ]]; then
    say "SKIP    f-async-grpo (needs vllm and 2 GPUs: a vllm serve with NCCL weight transfer on one, the trainer on another; $ngpu here)"
    record f-async-grpo SKIP 0 "$ngpu GPU(s) or no vllm"
  else
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    CUDA_VISIBLE_DEVICES=1 setsid "$PY" -m vllm.entrypoints.cli.main serve "$M" --port "$port" --max-model-len 1024 \
      --gpu-memory-utilization 0.5 --weight-transfer-config '{"backend": "nccl"}' > "$WORK/logs/f-vllm-serve.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 1; done
    CUDA_VISIBLE_DEVICES=0 run_check f-async-grpo 240 "$R/f-async-grpo" "${AT[@]}" train --recipe grpo \
      output_dir="$R/f-async-grpo" model.name_or_path="$M" train.max_steps=4 train.per_device_train_batch_size=8 \
      algo.num_generations=4 algo.max_completion_length=64 generation.asynchronous=true generation.backend=vllm \
      generation.vllm_mode=server generation.server_base_url="http://127.0.0.1:$port" "${QUIET[@]}"
    kill -- -"$server" 2>/dev/null; wait "$server" 2>/dev/null
  fi
fi

if wanted g-bench-sampler; then
  run_check g-bench-sampler 150 - "$PY" scripts/bench_sampler.py --quick --batch 64,256
  [[ -f $WORK/logs/g-bench-sampler.log ]] && grep -E "^(GPU|vocab|median)" "$WORK/logs/g-bench-sampler.log" \
    | tee -a "$WORK/gpu_check.log"
fi
for recipe in reinforce_pp_tools grpo_tools; do
  wanted "g-$recipe" && run_check "g-$recipe" 180 "$R/g-$recipe" "${AT[@]}" train --recipe "$recipe" \
    output_dir="$R/g-$recipe" train.max_steps=4 "${QUIET[@]}"
done

# ------------------------------------------------------------------------------------------------ summary
{
  echo "gpu_check summary ($(date -u +%FT%TZ), $((SECONDS - T0)) s in all, mode $([[ $DRY == 1 ]] && echo cpu-dry-run \
|| echo gpu), model $M)"
  [[ $HAVE_GPU == 1 ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  printf '%-20s %-11s %6s  %s\n' check status secs "details"
  for i in "${!NAMES[@]}"; do
    printf '%-20s %-11s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${INFO[$i]}"
  done
  if [[ -f $WORK/logs/e-bench-generation.log ]]; then
    echo "generation (bench_generation.py):"
    grep -E "^generation|^ *backend|^ *(hf|vllm) |^vLLM|not importable" "$WORK/logs/e-bench-generation.log" | sed 's/^/  /'
  fi
  if [[ -f $WORK/logs/g-bench-sampler.log ]]; then
    echo "sampler (bench_sampler.py):"
    grep -E "^(GPU|vocab|median)" "$WORK/logs/g-bench-sampler.log" | sed 's/^/  /'
  fi
  pass=0; for s in "${STATUS[@]}"; do [[ $s == PASS ]] && pass=$((pass + 1)); done
  echo "$pass of ${#STATUS[@]} checks passed; logs in $WORK/logs, runs in $WORK/runs"
} > "$SUMMARY"
echo
cat "$SUMMARY"
# runs' model folders are large; keep logs, summaries and metrics only (the device tool brings $OUT back)
find "$WORK/runs" -type f \( -name "*.safetensors" -o -name "*.pt" -o -name "*.bin" \) -delete 2>/dev/null
find "$WORK/runs" -type d -name checkpoints -prune -exec rm -rf {} + 2>/dev/null
for s in "${STATUS[@]}"; do [[ $s == PASS || $s == SKIP ]] || exit 1; done
exit 0
