#!/usr/bin/env bash
# DoRA against its DINO baseline on the synthetic walking tour, trained the same way (the demo's
# model, data, seed and number of steps; DINO sees as many frames per step), then measured with
# the three evaluations of dora-eval on held-out tours (experiments/make_eval_data.py).
#
#   experiments/dora_vs_dino.sh [OUT=workdirs/dora_vs_dino] [STEPS=300]
#
# Prints one table and writes OUT/results.json. EXPERIMENTS.md has the numbers of a run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workdirs/dora_vs_dino}
steps=${2:-300}
python=${PYTHON:-python}
mkdir -p "$out"

[[ -f "$out/eval_data/tour/walking_tour.mp4" ]] || \
  "$python" experiments/make_eval_data.py --out "$out/eval_data"

common=(--config configs/demo.py --config.total_steps="$steps" --config.picture_every_steps=0)
# DoRA: the demo as it is. DINO: config_base.dino_baseline of the same config (frames as images,
# two global crops, pairs of different views) with the batch in images equal to DoRA's frames.
"$python" -m dora_jax.cli.train "${common[@]}" --workdir "$out/dora"
frames=$("$python" -c "
import importlib.util
spec = importlib.util.spec_from_file_location('demo', 'configs/demo.py')
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
c = module.get_config(); print(c.batch_size * c.data.frames_per_clip)")
"$python" -m dora_jax.cli.train "${common[@]}" --workdir "$out/dino" --config.dora.enabled=False \
  --config.data.frames_per_clip=1 --config.data.frame_stride=1 --config.data.global_pre_size=0 \
  --config.data.global_crops_per_frame=2 --config.data.global_blur_prob=1.0 \
  --config.data.second_global_blur_prob=0.1 --config.data.second_global_solarize_prob=0.2 \
  --config.data.local_flip_prob=0.5 --config.batch_size="$frames"

for method in dora dino; do
  run="$out/$method"
  "$python" -m dora_jax.cli.eval knn --checkpoint "$run" --out "$run/eval" --no-progress \
    --train "$out/eval_data/knn/train" --val "$out/eval_data/knn/val" --resize-size 64 \
    --crop-size 64
  "$python" -m dora_jax.cli.eval davis --checkpoint "$run" --out "$run/eval/davis" \
    --no-progress --data "$out/eval_data/DAVIS" --short-side 64 --size-multiple 8
  "$python" -m dora_jax.cli.eval track --checkpoint "$run" --out "$run/eval" --no-progress \
    --data "$out/eval_data/tour" --short-side 64 --clips 16 --frames-per-clip 4 \
    --frame-stride 6 --num-objects 2
done

"$python" - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows = {}
for method in ("dora", "dino"):
  run = os.path.join(out, method, "eval")
  knn = json.load(open(os.path.join(run, "knn.json")))
  dav = json.load(open(os.path.join(run, "davis", "davis_metrics.json")))
  trk = json.load(open(os.path.join(run, "track.json")))
  rows[method] = {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "davis_J&F": dav["J&F"],
                  "davis_J": dav["J"], "davis_F": dav["F"], "track_iou": trk["track_iou"]}
json.dump(rows, open(os.path.join(out, "results.json"), "w"), indent=1)
keys = list(rows["dora"])
print("| method | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for method, row in rows.items():
  print(f"| {method} | " + " | ".join(f"{row[k]:.4g}" if row[k] is not None else "-"
                                      for k in keys) + " |")
EOF
