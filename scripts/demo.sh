#!/usr/bin/env bash
# `make demo`: the main job on a built-in default, small enough for a laptop.
#  1. TPU-style TFRecords from the shared ImageNet sample JPEGs (or generated images),
#  2. `horovodrun -np 2 resnet_main.py --mode=train_and_eval` on a small ResNet,
#  3. a ChestX-ray14 fine-tune of the checkpoint it just wrote (when chexnet is present),
#     then `chexnet predict` on three sample X-rays (probabilities + Grad-CAM overlays).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
NP=${NP:-2}
SAMPLE=../shared/data/imagenet
# horovodrun imports TensorFlow itself (to check its build): its stderr goes through the
# filter that hides TF's start-up lines (the ranks and our other programs do that themselves).
QUIET=(python -m hooks.stderr_filter)

mkdir -p "$OUT"
if [ ! -d "$OUT/tfrecords" ]; then
  if [ -d "$SAMPLE/images" ]; then
    SRC="$SAMPLE/images"; SYNSETS="$SAMPLE/synsets.txt"
  else
    echo "[demo] no shared ImageNet sample: generating 40 images"
    python -m imagenet.sample_images --output_dir="$OUT/generated"
    SRC="$OUT/generated/images"; SYNSETS="$OUT/generated/synsets.txt"
  fi
  for split in train validation; do
    python -m imagenet.build_tfrecords --input_dir="$SRC" --output_dir="$OUT/tfrecords" \
      --split=$split --synsets_file="$SYNSETS" --num_shards=2
  done
fi

rm -rf "$OUT/resnet"
"${QUIET[@]}" horovodrun -np "$NP" --gloo python resnet_main.py --mode=train_and_eval \
  --data_dir="$OUT/tfrecords" --model_dir="$OUT/resnet" --resnet_depth=18 \
  --image_size=64 --train_batch_size=16 --eval_batch_size=16 --train_steps=20 \
  --iterations_per_loop=10 --steps_per_eval=10 --num_train_images=40 \
  --base_learning_rate=0.4 --warmup_epochs=1 --log_every_n_steps=5
# (validation records come from the same 42 sample images: this shows the pipeline runs
# and the network fits them, not ImageNet accuracy)

X=../shared/data/chestxray14
if [ -d "$X/images" ]; then
  # The 50 sample X-rays are split by patient 60/20/20 (they all come from the test fold of
  # the published split, so the published lists cannot be used on them). Defaults that train:
  # Adam at CheXNet's 1e-3 (not the checkpoint's SGD rate), the whole X-ray resized to
  # --image_size, batch-norm statistics recomputed before each evaluation and checkpoint.
  rm -rf "$OUT/chexnet"
  "${QUIET[@]}" horovodrun -np "$NP" --gloo python -m chexnet train --csv="$X/Data_Entry_2017.csv.gz" \
    --image_dir="$X/images" --only_present_images --split_fractions=0.6,0.2,0.2 \
    --backbone=resnet18 --image_size=64 --train_batch_size=8 --eval_batch_size=8 \
    --train_epochs=2 --pretrained_model_dir="$OUT/resnet" --init_checkpoint=best \
    --cache=memory --model_dir="$OUT/chexnet" --report_dir="$OUT/chexnet/report"
  # Three X-rays through the best checkpoint: probabilities and Grad-CAM overlays.
  python -m chexnet predict --checkpoint="$OUT/chexnet" --heatmap_dir="$OUT/chexnet/gradcam" \
    "$X/images/00000075_000.png" "$X/images/00000284_000.png" "$X/images/00000493_000.png"
else
  echo "[demo] no ChestX-ray14 sample at $X: skipping the fine-tune"
fi
echo "[demo] done: outputs in $OUT/"
