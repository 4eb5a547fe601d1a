#!/usr/bin/env bash
# The GPU checks of one short device session (README, "ZOPrO update: memory and time", "GPU-size
# embedded study" and "Tests"). Any of these parts, in this order:
#   study  the GPU-size embedded study (config/examples/gpu-embedded.yaml), in the background so that
#          the tests run beside it; a rerun on the same machine resumes it (--rerun-incomplete);
#   tests  the test suite on the GPU (FIRST_TESTS first, with tracebacks; PYTEST_ARGS, default -q), one
#          torch thread a worker, TEST_WORKERS workers (default 8);
#   bench  the update benchmark at 105.8M and at the 1.5B Llama-3.2-1B shape.
# Everything stops by DEADLINE_S seconds after the start. Logs, JSON, the study's tables and a
# tarball of its results go to $OUT (default results/device). Run from the repository root with the
# pinned packages importable (.venv/bin/python, or python3 with the wheels on PYTHONPATH):
#     PY=.venv/bin/python DEADLINE_S=560 bash benchmarks/device_check.sh study tests
set -u
OUT=${OUT:-results/device}
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-3600}
START=$(date +%s)
left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
has() { [[ " $PARTS " == *" $1 "* ]]; }
PARTS="$*"
mkdir -p "$OUT" results
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, trl, peft, pandas; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'pandas', pandas.__version__)"

if has study; then
    (
        t0=$(date +%s)
        timeout -s INT -k 20 $(($(left) - 25)) $PY -m snakemake --cores "${STUDY_CORES:-8}" --rerun-incomplete \
            results/compare/plots results/base_eval/evaluation_summary.csv --configfile config/examples/gpu-embedded.yaml > "$OUT/study.log" 2>&1
        rc=$?
        echo "study rc $rc after $(($(date +%s) - t0)) s ($(date -u +%T))" >> results/gpu_study_calls.txt
    ) &
    STUDY_PID=$!
fi

if has tests; then
    export OMP_NUM_THREADS=1
    if [ -n "${FIRST_TESTS:-}" ]; then
        timeout $(($(left) - 60)) $PY -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" --tb=short -rfE \
            $FIRST_TESTS > "$OUT/pytest_first.log" 2>&1
        echo "first tests rc $?"; tail -n 5 "$OUT/pytest_first.log"
    fi
    timeout $(($(left) - 40)) $PY -m pytest ${PYTEST_ARGS:--q} -p no:cacheprovider -n "${TEST_WORKERS:-8}" --tb=short \
        -rfE --durations=20 > "$OUT/pytest.log" 2>&1
    echo "pytest rc $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -n 30
    unset OMP_NUM_THREADS
fi

if has bench; then
    timeout $(($(left) / 2)) $PY benchmarks/zopro_update.py --reps 5 --out "$OUT/zopro_default.json" \
        > "$OUT/zopro_default.log" 2>&1; echo "default-size benchmark rc $?"
    timeout $(($(left) - 30)) $PY benchmarks/zopro_update.py --size 1b --batch 16 --prompt-len 256 \
        --completion-len 256 --reps 3 --out "$OUT/zopro_1b.json" > "$OUT/zopro_1b.log" 2>&1
    echo "1.5B benchmark rc $?"
    grep -hE "^(model|update|interleaved|zo|fo)" "$OUT/zopro_default.log" "$OUT/zopro_1b.log"
fi

if has study; then
    wait "$STUDY_PID"
    cat results/gpu_study_calls.txt; tail -n 25 "$OUT/study.log"
    $PY benchmarks/summarise_run.py . > "$OUT/study_tables.md" 2>&1; echo "summary rc $?"
    cat "$OUT/study_tables.md"
    tar czf "$OUT/study_results.tgz" results/gpu_study_calls.txt results/benchmarks logs \
        $(ls results/*/evaluation.csv results/*/evaluation_summary.csv results/compare/*.csv 2>/dev/null)
fi
