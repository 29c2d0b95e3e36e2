#!/usr/bin/env bash
# Every CUDA path of tformer in one device call, stages in priority order, each under a time cap, each
# result written as it finishes: benchmarks/gpu_check.sh [--cpu] [--out DIR] [--budget SECONDS]
#
#   benchmarks/gpu_check.sh --wheels   (here, before the call) the cp312 wheels the GPU machine lacks -> .whl/
#   run: carry [".whl"], command "benchmarks/gpu_check.sh", timeout_s 600   (the device tool)
#   benchmarks/gpu_check.sh --cpu      the dry run on a machine without a GPU (CI runs it): same stages,
#                                      CPU sizes, the CUDA tests with TFORMER_TEST_DEVICE=cpu
#
# Output under --out (default: $OUT when set, the device tool's folder, else runs/gpu-check): summary.md
# (one row per stage: status, seconds, the stage's last line) and gpu_check.tar.gz (every stage's log and
# files). Prints the summary; exits non-zero if any stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE=gpu
DEST="${OUT:-runs/gpu-check}"
BUDGET=470  # seconds for all stages: the device tool allows 600 a call, and the machine's start comes first
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu; BUDGET=1500 ;;
    --out) DEST="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --wheels)
      # num2words is pure Python; its dependency docopt is only used by its command line, not imported
      mkdir -p .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform any -d .whl "num2words==0.5.14"
      ls -l .whl; exit $? ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
WORK="$(mktemp -d)"
SUMMARY="$DEST/summary.md"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # tformer from this tree, nothing installed
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tformer-site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tformer-site"
fi
if [ "$MODE" = cpu ]; then export TFORMER_TEST_DEVICE=cpu; DEVICE=cpu; else DEVICE=cuda; fi

START=$SECONDS
FAILED=0
{
  echo "# gpu_check ($MODE) — $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| stage | result | seconds | last line |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

# stage NAME CAP COMMAND...: run it under min(CAP, what is left of the budget), log to $WORK/NAME.log
stage() {
  local name="$1" cap="$2"; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$SECONDS status rc last
  if [ "$cap" -lt 5 ]; then
    status="NOT RUN (budget spent)"; rc=1
  else
    timeout -k 10 "$cap" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="TIMEOUT after ${cap} s" ;;
      *) status="FAILED (exit $rc)" ;;
    esac
  fi
  [ "$rc" -ne 0 ] && FAILED=1
  last="$(grep -v '^\s*$' "$WORK/$name.log" 2>/dev/null | tail -n 1 | tr '|' '/' | cut -c1-160)"
  echo "| $name | $status | $((SECONDS - t0)) | ${last:-} |" >>"$SUMMARY"
  cp "$SUMMARY" "$WORK/summary.md"
  echo "[gpu_check] $name: $status ($((SECONDS - t0)) s)"
}

stage environment 30 "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, f'{p.total_memory / 2**30:.0f} GiB', 'capability', f'{p.major}.{p.minor}', 'bf16', torch.cuda.is_bf16_supported())
elif '$MODE' == 'gpu':
    raise SystemExit('no CUDA GPU visible to torch')
import tformer; print('tformer', tformer.__version__, 'from', tformer.__file__)
"

stage cuda-tests 200 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/cuda -rs --junitxml="$WORK/cuda-tests.xml"

if [ "$MODE" = gpu ]; then
  stage demo 110 "$PY" -m tformer demo --out "$WORK/demo" --no-progress
  # GPT-2 small at batch 12 x 1024 tokens against Hugging Face on the same GPU, fp32 and bf16, MFU against
  # the measured bf16 product (no torch.compile row: its compile would take the stage's time)
  stage bench-train 120 "$PY" -m tformer bench train --device cuda --repeats 3 --no-compile \
    --out "$WORK/bench-train"
  stage bench-generate 90 "$PY" -m tformer bench generate --device cuda --batches 1,8,64 --repeats 3 \
    --out "$WORK/bench-generate"
  stage parallelism 90 "$PY" -m tformer experiment parallelism --size medium --out "$WORK/parallelism"
else
  stage demo 300 "$PY" -m tformer demo --quick --out "$WORK/demo" --no-progress
  stage bench-train 200 "$PY" -m tformer bench train --device cpu --shapes baby --precisions fp32 \
    --repeats 1 --steps 2 --loss-steps 2 --no-compile --out "$WORK/bench-train"
  stage bench-generate 200 "$PY" -m tformer bench generate --device cpu --batches 1 --precisions fp32 \
    --repeats 1 --new-tokens 4 --prompt-len 4 --out "$WORK/bench-generate"
  stage parallelism 200 "$PY" -m tformer experiment parallelism --size quick --threads 1 \
    --out "$WORK/parallelism"
fi

echo >>"$SUMMARY"
echo "All stages: $((SECONDS - START)) s of a $BUDGET s budget; logs and files in gpu_check.tar.gz." >>"$SUMMARY"
cp "$SUMMARY" "$WORK/summary.md"
tar -czf "$DEST/gpu_check.tar.gz" -C "$WORK" . || FAILED=1
cat "$SUMMARY"
rm -rf "$WORK"
exit $FAILED
