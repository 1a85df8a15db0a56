#!/usr/bin/env bash
# Quick start on the embedded part-constellation task (generated, no download): a teacher, then a
# plain student, a KD student and an IEP student trained on 10 % of the training set, the regime
# where the paper's gains are largest. Outputs go to runs/quickstart/.
# Override the output folder with OUT=..., the student epochs with EPOCHS=... (main phase), the IEP
# module epochs with INIT=..., the teacher epochs with TEACHER_EPOCHS=... and the rate with RATE=...
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/quickstart}
EPOCHS=${EPOCHS:-30}
INIT=${INIT:-4}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-8}
RATE=${RATE:-0.1}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# float32 (the authors' arithmetic) so the numbers match the README on any CPU; --precision auto
# would pick mixed_bfloat16 on a CPU with native bfloat16 (faster, other numbers).
common=(--dataset=synthetic_parts --precision=float32 --batch_size=64 --val_batch_size=200
        --log_every=100000 --teacher_arch=WResNet-16-2 --student_arch=WResNet-10-1)
students=(--main_scope=Student --sample_rate="$RATE" --train_epoch="$EPOCHS")
teacher=(--teacher_params="$OUT/teacher/train_params.mat")

echo "== 1/4 teacher WResNet-16-2 (plain training, all 5,000 training images)"
python train_w_distill.py "${common[@]}" --Distillation=None --main_scope=Teacher \
    --train_epoch="$TEACHER_EPOCHS" --vis_every=0 --train_dir="$OUT/teacher"

echo "== 2/4 student WResNet-10-1, plain (the baseline), sample rate $RATE"
python train_w_distill.py "${common[@]}" "${students[@]}" --Distillation=None --vis_every=0 \
    --train_dir="$OUT/student"

echo "== 3/4 student WResNet-10-1 with KD (soft logits, the control), sample rate $RATE"
python train_w_distill.py "${common[@]}" "${students[@]}" --Distillation=KD "${teacher[@]}" \
    --vis_every=0 --train_dir="$OUT/kd"

echo "== 4/4 student WResNet-10-1 with IEP (1x1 conv+BN+ReLU adapters: the widths differ), sample rate $RATE"
python train_w_distill.py "${common[@]}" "${students[@]}" --Distillation=IEP "${teacher[@]}" \
    --init_epoch="$INIT" --vis_every=10 --train_dir="$OUT/iep"

python - "$OUT" <<'PY'
import sys
import scipy.io as sio
out = sys.argv[1]
for run in ("teacher", "student", "kd", "iep"):
    log = sio.loadmat(f"{out}/{run}/log.mat")
    print(f"{run:8s} final validation accuracy {float(log['validation_acc'].ravel()[-1]):6.2f} %")
print(f"TensorBoard: tensorboard --logdir {out}")
print(f"Parameters: {out}/<run>/train_params.mat   Accuracy logs: {out}/<run>/log.mat")
PY
