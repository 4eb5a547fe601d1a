#!/usr/bin/env bash
# The GPU checks of one short device session (README, "ZOPrO update: memory and time" and "Tests"):
# the update benchmark at 105.8M and at the 1.5B Llama-3.2-1B shape, then the test suite on the GPU.
# Writes its logs and JSON under $OUT (default results/device). Run from the repository root with
# the pinned packages importable (.venv/bin/python, or python3 with the wheels on PYTHONPATH):
#     PY=.venv/bin/python bash benchmarks/device_check.sh
set -u
OUT=${OUT:-results/device}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, trl, peft, pandas; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'pandas', pandas.__version__)"
timeout "${BENCH_S:-150}" $PY benchmarks/zopro_update.py --reps 5 --out "$OUT/zopro_default.json" \
    > "$OUT/zopro_default.log" 2>&1; echo "default-size benchmark rc $?"
timeout "${BENCH_1B_S:-200}" $PY benchmarks/zopro_update.py --size 1b --batch 16 --prompt-len 256 --completion-len 256 \
    --reps 3 --out "$OUT/zopro_1b.json" > "$OUT/zopro_1b.log" 2>&1; echo "1.5B benchmark rc $?"
grep -hE "^(model|update|interleaved|zo|fo)" "$OUT/zopro_default.log" "$OUT/zopro_1b.log"
timeout "${TESTS_S:-270}" $PY -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:--n 8} --durations=15 > "$OUT/pytest.log" 2>&1
echo "pytest rc $?"; tail -n 40 "$OUT/pytest.log"
