#!/usr/bin/env bash
# The GPU checks of one short device session (README, "ZOPrO update: memory and time", "GPU-size
# embedded study" and "Tests"). Any of these parts, run in the order given:
#   bench  the update benchmark at 105.8M and at the 1.5B Llama-3.2-1B shape (give it the GPU alone:
#          name it before the others);
#   tests  the test suite on the GPU on TEST_WORKERS (default 8) workers, one torch thread each, one
#          test at a time to a worker (--dist load), the slow ones (tiny trainings, Snakemake end to
#          end) first (tests/conftest.py); PYTEST_ARGS (default -q) goes to pytest;
#   study  the GPU-size embedded study (config/examples/gpu-embedded.yaml) in the background, beside
#          the parts named after it, until the deadline; a rerun on the same machine resumes it;
#   precision  benchmarks/precision.py (README, "Precision": what a bf16 base does to log-probs, the
#          PPO-clip ratio, KL estimates and reward scores, against fp32 on the GPU).
# Everything stops by DEADLINE_S seconds after the start. Logs, JSON, the study's tables and a
# tarball of its results go to $OUT (default results/device). Run from the repository root with the
# pinned packages importable (.venv/bin/python, or python3 with the wheels on PYTHONPATH):
#     PY=.venv/bin/python DEADLINE_S=560 bash benchmarks/device_check.sh bench tests
set -u
OUT=${OUT:-results/device}
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-3600}
START=$(date +%s)
left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
mkdir -p "$OUT" results
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, trl, peft, pandas; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'pandas', pandas.__version__)"

STUDY_PID=
run_study() {
    (
        t0=$(date +%s)
        timeout -s INT -k 20 $(($(left) - 25)) $PY -m snakemake --cores "${STUDY_CORES:-8}" --rerun-incomplete \
            results/compare/plots results/base_eval/evaluation_summary.csv --configfile config/examples/gpu-embedded.yaml > "$OUT/study.log" 2>&1
        rc=$?
        echo "study rc $rc after $(($(date +%s) - t0)) s ($(date -u +%T))" >> results/gpu_study_calls.txt
    ) &
    STUDY_PID=$!
}

run_tests() {
    OMP_NUM_THREADS=1 timeout $(($(left) - 40)) $PY -m pytest ${PYTEST_ARGS:--q} -p no:cacheprovider \
        -n "${TEST_WORKERS:-8}" --dist load --tb=short -rfE --durations=30 > "$OUT/pytest.log" 2>&1
    echo "pytest rc $? at $(($(date +%s) - START)) s"
    grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup)" "$OUT/pytest.log" | tail -n 45
}

run_bench() {
    timeout $(($(left) / 3)) $PY benchmarks/zopro_update.py --reps 5 --out "$OUT/zopro_default.json" \
        > "$OUT/zopro_default.log" 2>&1; echo "default-size benchmark rc $? at $(($(date +%s) - START)) s"
    timeout $(($(left) - 30)) $PY benchmarks/zopro_update.py --size 1b --batch 16 --prompt-len 256 \
        --completion-len 256 --reps 3 --out "$OUT/zopro_1b.json" > "$OUT/zopro_1b.log" 2>&1
    echo "1.5B benchmark rc $? at $(($(date +%s) - START)) s"
    grep -hE "^(model|update|interleaved|zo|fo)" "$OUT/zopro_default.log" "$OUT/zopro_1b.log"
}

run_precision() {
    timeout $(($(left) - 30)) $PY benchmarks/precision.py > "$OUT/precision.log" 2>&1
    echo "precision benchmark rc $? at $(($(date +%s) - START)) s"; tail -n 30 "$OUT/precision.log"
}

for part in "$@"; do
    case $part in
        bench) run_bench ;;
        tests) run_tests ;;
        study) run_study ;;
        precision) run_precision ;;
        *) echo "unknown part: $part (bench, tests, study, precision)" >&2; exit 2 ;;
    esac
done

if [ -n "$STUDY_PID" ]; then
    wait "$STUDY_PID"
    cat results/gpu_study_calls.txt; tail -n 25 "$OUT/study.log"
    $PY benchmarks/summarise_run.py . > "$OUT/study_tables.md" 2>&1; echo "summary rc $?"
    cat "$OUT/study_tables.md"
    tar czf "$OUT/study_results.tgz" results/gpu_study_calls.txt results/benchmarks logs \
        $(ls results/*/evaluation.csv results/*/evaluation_summary.csv results/compare/*.csv 2>/dev/null)
fi
