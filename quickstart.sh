#!/usr/bin/env bash
# Quick start on the embedded synthetic data (no download): a small teacher, a plain student and an
# IEP student, each with the authors' recipe shortened. Outputs go to runs/quickstart/.
# Override the output folder with OUT=..., the epochs with EPOCHS=... (main phase) and INIT=... (IEP).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/quickstart}
EPOCHS=${EPOCHS:-8}
INIT=${INIT:-2}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# float32 (the authors' arithmetic) so the numbers match the README on any CPU; --precision auto
# would pick mixed_bfloat16 on a CPU with native bfloat16 (faster, slightly different numbers).
common=(--dataset=synthetic --precision=float32 --batch_size=64 --val_batch_size=200 --log_every=50
        --teacher_arch=WResNet-10-2 --student_arch=WResNet-10-1)

echo "== 1/3 teacher WResNet-10-2 (plain training)"
python train_w_distill.py "${common[@]}" --Distillation=None --main_scope=Teacher \
    --train_epoch="$EPOCHS" --train_dir="$OUT/teacher"

echo "== 2/3 student WResNet-10-1 (plain training, the baseline)"
python train_w_distill.py "${common[@]}" --Distillation=None --main_scope=Student \
    --train_epoch="$EPOCHS" --train_dir="$OUT/student"

echo "== 3/3 student WResNet-10-1 with IEP from the teacher (1x1 conv+BN adapters: the widths differ)"
python train_w_distill.py "${common[@]}" --Distillation=IEP --main_scope=Student \
    --teacher_params="$OUT/teacher/train_params.mat" --init_epoch="$INIT" \
    --train_epoch="$EPOCHS" --train_dir="$OUT/iep"

python - "$OUT" <<'PY'
import sys
import scipy.io as sio
out = sys.argv[1]
for run in ("teacher", "student", "iep"):
    log = sio.loadmat(f"{out}/{run}/log.mat")
    print(f"{run:8s} final validation accuracy {float(log['validation_acc'].ravel()[-1]):6.2f} %")
print(f"TensorBoard: tensorboard --logdir {out}")
print(f"Parameters: {out}/<run>/train_params.mat   Accuracy logs: {out}/<run>/log.mat")
PY
