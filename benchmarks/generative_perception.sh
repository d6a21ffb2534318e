#!/bin/bash
# Perception runs read by `benchmarks/generative.py --only perception`: one PushT-image diffusion policy,
# trained for STEPS steps with the given encoder overrides, then evaluated on EPISODES held-out seeds.
# The training command's `time` report (CPU seconds) goes to runs/perception_NAME.log.
#   benchmarks/generative_perception.sh NAME STEPS EPISODES [policy overrides...]
# e.g. benchmarks/generative_perception.sh resnet 3000 50 train.cpu_bf16=true
#      benchmarks/generative_perception.sh dit_sample_frozen 3000 50 train.cpu_bf16=true \
#        'policy.encoder={"crop_shape": [84, 84], "image_backbone": {"type": "dit", "init": "runs/gen/pusht_dit_x0", "freeze": true}}'
# (the names that `benchmarks/generative.py --only perception` tabulates: its PERCEPTION_RUNS)
set -e
NAME=$1; STEPS=$2; EPISODES=$3; shift 3
PY=${PYTHON:-python}
OUT=runs/gen/policy_$NAME
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=1
{
time $PY -m diffpolicy.cli train --task pusht_image --out "$OUT" --no-progress data.path=runs/gen/pusht_image.zarr \
  train.steps="$STEPS" train.batch_size=32 train.log_every=10 train.num_threads=1 train.checkpoint_every="$STEPS" \
  optim.lr=3e-4 optim.warmup_steps=10 eval.episodes=0 "$@"
time $PY -m diffpolicy.cli eval --checkpoint "$OUT" --episodes "$EPISODES" --n-envs 25 --no-progress
} > "runs/perception_$NAME.log" 2>&1
