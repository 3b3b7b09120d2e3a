#!/usr/bin/env bash
# make demo: synthetic Cityscapes -> train a teacher -> distil a student with DIST -> train the same
# student without a teacher -> print both students' val mIoU -> draw demo_out/summary.png (the three runs'
# curves and a few val images: image | ground truth | teacher | DIST student | baseline). Everything is trained from scratch
# (no pretrained weights here). On 2 CPU cores it takes about 4-6 minutes; with a GPU it uses the GPU.
#
# Knobs (environment): DEMO_DIR (output, default demo_out), DEMO_TEACHER_ITERS, DEMO_STUDENT_ITERS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-demo_out}
TEACHER_ITERS=${DEMO_TEACHER_ITERS:-300}
STUDENT_ITERS=${DEMO_STUDENT_ITERS:-200}
DATA=$OUT/data
export PYTHONUNBUFFERED=1

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
  # compile off: the demo's runs are too short for compilation to pay off.
  SPEED=(--device cuda --no-compile --workers 4)
else
  DEVICE=cpu
  # Loading in the main process: a loader process would compete with the compute threads.
  SPEED=(--device cpu --workers 0)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
fi
# Tiny images, batch 8; the recipe's flags otherwise (poly lr, SGD 0.9, wd 5e-4, lambda_kd 1).
COMMON=(--data "$DATA" --crop-size 64 128 --batch-size 8 --lr 0.05 --log-iter 25 --save-per-iters 100000
        "${SPEED[@]}")
TEACHER=(deeplabv3 resnet18)
STUDENT=(psp_mobile mobilenetv2)

start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start )) s] $*"; }
# Keep the log lines (not the per-class tables); with pipefail a failing train.py still fails the demo.
show_progress() { grep --line-buffered -E "^.{20}(it |validation|done)" || true; }

rm -rf "$OUT"
stamp "device: $DEVICE; writing synthetic Cityscapes (160 train / 40 val, 64x128) to $DATA"
$PY -m fastdist.data.synthetic "$DATA" --train 160 --val 40 --size 64 128 --workers 2

stamp "1/3 teacher ${TEACHER[*]} alone (--teacher-model none), $TEACHER_ITERS iterations"
$PY train.py --teacher-model none --student-model "${TEACHER[0]}" --student-backbone "${TEACHER[1]}" \
  --max-iterations "$TEACHER_ITERS" --val-per-iters "$TEACHER_ITERS" --save-dir "$OUT/teacher" "${COMMON[@]}" \
  | show_progress
TEACHER_CKPT=$OUT/teacher/${TEACHER[0]}_${TEACHER[1]}_citys_best_model.pth

stamp "2/3 student ${STUDENT[*]} distilled from the teacher with DIST, $STUDENT_ITERS iterations"
$PY train.py --teacher-model "${TEACHER[0]}" --teacher-backbone "${TEACHER[1]}" --teacher-pretrained "$TEACHER_CKPT" \
  --student-model "${STUDENT[0]}" --student-backbone "${STUDENT[1]}" --max-iterations "$STUDENT_ITERS" \
  --val-per-iters "$STUDENT_ITERS" --save-dir "$OUT/dist_student" "${COMMON[@]}" \
  | show_progress

stamp "3/3 student ${STUDENT[*]} alone (baseline), $STUDENT_ITERS iterations"
$PY train.py --teacher-model none --student-model "${STUDENT[0]}" --student-backbone "${STUDENT[1]}" \
  --max-iterations "$STUDENT_ITERS" --val-per-iters "$STUDENT_ITERS" --save-dir "$OUT/baseline_student" \
  "${COMMON[@]}" | show_progress

stamp "done"
$PY - "$OUT" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
rows = [("teacher", "teacher"), ("DIST student", "dist_student"), ("baseline student", "baseline_student")]
print(f"\n{'run':<18} {'model':<26} {'val mIoU %':>10} {'pixAcc %':>9}")
for name, folder in rows:
    config = json.loads((out / folder / "config.json").read_text())
    vals = [json.loads(line) for line in (out / folder / "metrics.jsonl").read_text().splitlines()]
    val = [v for v in vals if v["kind"] == "val"][-1]
    model = f"{config['student_model']}/{config['student_backbone']}"
    print(f"{name:<18} {model:<26} {100 * val['mIoU']:>10.2f} {100 * val['pixAcc']:>9.2f}")
print(f"\n(synthetic data, from scratch, {seconds} s in total; logs and checkpoints under {out}/)")
EOF
$PY -m fastdist.plot "$OUT/teacher" "$OUT/dist_student" "$OUT/baseline_student" \
  --labels teacher "DIST student" baseline --data "$DATA" --examples 3 -o "$OUT/summary.png"
