#!/usr/bin/env bash
# The BCGD two-stage flow for ResNet-20 W1A4 on CIFAR-10: float pre-training, then BinaryConnect (STE)
# and BCGD from the same float checkpoint. Prints the best val/acc1 of each run.
#
#   DATA=../shared/data/cifar10-jpeg.zip EPOCHS=200 QEPOCHS=200 bash scripts/reproduce_bcgd_resnet20.sh
#
# EPOCHS/QEPOCHS shorten the float/quantized stages (the LR schedule is then cosine over the shortened
# run instead of the recipe's steps at 80/140). EXTRA adds flags to every run (e.g. GPU speed switches).
set -euo pipefail
DATA=${DATA:-data/cifar10}
EPOCHS=${EPOCHS:-200}
QEPOCHS=${QEPOCHS:-$EPOCHS}
LOGS=${LOGS:-logs}
QLIGHT=${QLIGHT:-qlight}
read -r -a EXTRA <<< "${EXTRA:-}"

common=(--config configs/logger/csv_only.yaml --trainer.logger.init_args.save_dir "$LOGS" --data.root "$DATA" "${EXTRA[@]}")
schedule() {  # cosine over a shortened run; the full recipe keeps MultiStepLR at 80/140
  if [ "$1" != 200 ]; then
    echo --model.lr_scheduler torch.optim.lr_scheduler.CosineAnnealingLR --model.lr_scheduler.T_max "$1"
  fi
}

$QLIGHT fit --config configs/cifar10/resnet20_float.yaml "${common[@]}" --trainer.max_epochs "$EPOCHS" $(schedule "$EPOCHS")
float_ckpt=$(ls -t "$LOGS"/cifar10-resnet20-float/float-resnet20-s0/version_*/checkpoints/last.ckpt | head -1)

for method in ste bcgd; do
  $QLIGHT fit --config "configs/cifar10/resnet20_${method}_w1a4.yaml" "${common[@]}" \
    --model.init_from "$float_ckpt" --trainer.max_epochs "$QEPOCHS" $(schedule "$QEPOCHS")
done

python - "$LOGS" <<'EOF'
import csv, glob, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/cifar10-resnet20-*/*/version_*/metrics.csv")):
    rows = [r for r in csv.DictReader(open(path)) if r.get("val/acc1")]
    if rows:
        best = max(float(r["val/acc1"]) for r in rows)
        print(f"{path}: epochs {len(rows)}, best val/acc1 {best:.4f}, last {float(rows[-1]['val/acc1']):.4f}")
EOF
