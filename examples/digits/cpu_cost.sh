#!/bin/bash
# CPU seconds per training iteration of the consistency methods at the digits recipe (batch 32, one thread):
# (user + system CPU time of a 40-iteration run - that of a 10-iteration run) / 30, so set-up and saving cancel.
#   bash examples/digits/cpu_cost.sh [ect] [sct] [act] [ct]      (default: all four)
set -euo pipefail
T=examples/digits/checkpoints/teacher
D=${DIGITS_DATA:-/work/digits_artifacts/data}/train
COMMON="--pretrained_teacher_model_name_or_path $T --train_data_dir $D --train_batch_size 32 --learning_rate 1e-4
  --optimizer radam --adam_weight_decay 0 --report_to none --seed 0 --checkpointing_steps 1000"
declare -A FLAGS=(
  [ect]="training/train_sct.py --method ect --dropout 0 --use_ema --ema_decay 0.999"
  [sct]="training/train_sct.py --method sct --dropout 0 --use_ema --ema_decay 0.999"
  [act]="training/train_act.py --adam_beta1 0 --adam_beta2 0.99"
  [ct]="training/train_act.py --adam_beta1 0 --adam_beta2 0.99 --adversarial_weight 0"
)
OUT=$(mktemp -d)
for m in "${@:-ect sct act ct}"; do
  for m1 in $m; do
    for n in 10 40; do
      /usr/bin/time -f "%U %S" -o "$OUT/$m1.$n" env OMP_NUM_THREADS=1 python ${FLAGS[$m1]} $COMMON \
        --output_dir "$OUT/run_${m1}_$n" --max_train_steps $n > "$OUT/$m1.$n.log" 2>&1
    done
    python - "$OUT/$m1.10" "$OUT/$m1.40" "$m1" <<'PY'
import sys
short, long = (sum(map(float, open(p).read().split())) for p in sys.argv[1:3])
print(f"{sys.argv[3]}: {(long - short) / 30:.3f} CPU s / iteration")
PY
  done
done
rm -rf "$OUT"
