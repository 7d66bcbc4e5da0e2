#!/usr/bin/env bash
# TPO vs LLaMA-Factory's DPO on one GPU, as one prepared run (../shared/GPU.md): install LLaMA-Factory from
# the wheels in .whl/, then benchmarks/bench_tpo.py for LoRA and for full fine-tuning on a random-weight model
# of Qwen2-VL-2B-Instruct's shape (448x448 images, ~180-token answers, bf16, 4 pairs/step). Sized for about
# 5-6 minutes on an H100/H200 (model build, then 2 x 4 training runs), at most ~9; everything goes under $OUT.
#
# Prepare on the development machine, from the project root (the only step that needs the network):
#   bash ../shared/gpu/fetch_wheels.sh                  # LLaMA-Factory 0.9.5 and its wheels -> .whl/
# then start it on the GPU machine with .whl carried along, e.g. run(command="bash benchmarks/gpu_run.sh",
# carry=[".whl"], timeout_s=600). The working tree's tpo_plugin is what is measured (PYTHONPATH below;
# bench_child installs the plugin's import hook itself), so no wheel of the project is needed.
# Results: $OUT/lora.json and $OUT/full.json, and each configuration's table and JSON line in $OUT/<config>.log.
#
# Dry run of this script on a CPU (no install; the same builder, data and bf16 at a scaled-down model shape):
#   BENCH_SKIP_INSTALL=1 BENCH_ARGS="--device cpu --model qwen2-vl-2b-mini --image-size 448 --answer-tokens 180
#   --precision bf16 --warmup-steps 1 --measured-steps 2" bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-saves/gpu_out}
mkdir -p "$OUT"
WORK=${BENCH_WORK_DIR:-/tmp/bench_tpo}
BENCH_ARGS=${BENCH_ARGS:---device cuda}
LORA_LIMIT_S=${LORA_LIMIT_S:-270}  # per configuration; a run cut short still reports its finished variants
FULL_LIMIT_S=${FULL_LIMIT_S:-240}

start=$(date +%s)
if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run 'bash ../shared/gpu/fetch_wheels.sh' on the development machine first" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl >"$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; exit 2; }
  echo "install: $(($(date +%s) - start)) s"
fi
export DISABLE_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import llamafactory, torch, transformers; print('llamafactory', llamafactory.__version__, 'torch', \
torch.__version__, 'transformers', transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  || exit 2

status=0
for config in lora full; do
  limit=$LORA_LIMIT_S
  [ "$config" = full ] && limit=$FULL_LIMIT_S
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  timeout --signal=TERM --kill-after=15 "$limit" python3 benchmarks/bench_tpo.py $BENCH_ARGS --config "$config" \
    --work-dir "$WORK" --output "$OUT/$config.json" --child-timeout 150 >"$OUT/$config.log" 2>&1
  rc=$?
  echo "== $config: exit $rc after $(($(date +%s) - start)) s"
  grep -E '^\||^#|^Reference|^\[bench_tpo\] [a-z]+-' "$OUT/$config.log" | tail -25
  if [ $rc -ne 0 ]; then
    status=$rc
    tail -40 "$OUT/$config.log"
  fi
  for run in "$WORK"/runs/"$config"-*; do  # each run's recipe, log and timer result, not its weights
    [ -d "$run" ] || continue
    mkdir -p "$OUT/runs/$(basename "$run")"
    cp "$run"/recipe.yaml "$run"/train.log "$run"/result.json "$OUT/runs/$(basename "$run")/" 2>/dev/null
  done
done
echo "total: $(($(date +%s) - start)) s"
exit $status
