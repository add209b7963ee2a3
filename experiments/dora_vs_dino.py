r"""DoRA, its DINO baseline and the untrained encoder, several seeds, on held-out synthetic data.

  python experiments/dora_vs_dino.py --out workdirs/experiment [--seeds 0 1 2] [--steps 3000]

1. Data (experiments/make_eval_data.py): the pretraining tour (six object kinds) as shards, and
   evaluation sets from other tours and other object instances: object views for k-NN and the
   linear probe, an ADE20K-layout set (seg), a VOC-layout set (discover), DAVIS-layout sequences
   and a tour with masks (track).
2. Per seed: DoRA and DINO trained by `dora-train` with configs/experiment.py (one recipe; the
   config's docstring lists what differs), and the same ViT as initialised with that seed
   (`dora-export --init`), never trained.
3. Every encoder through the same `dora-eval` commands: k-NN top-1 and linear-probe top-1 on the
   object views ([CLS]), seg mIoU (linear readout on patch tokens), DAVIS J&F, LOST CorLoc,
   tracking IoU.
4. --finetune: per seed, the fine-tuning demo's comparison (configs/finetune_demo.py: a linear
   probe trained with dora-finetune on the DoRA encoder, then on the same ViT randomly
   initialised) on the object views.
5. experiments/results/: results.json (every run), results.md (mean +- std per arm), results.png
   (one panel per evaluation, error bars: the standard deviation over seeds).

Runs resume: a finished training or evaluation (its report file exists) is not run again, so the
same command after an interruption finishes the rest. Commands and timings go to OUT/log.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("dora", "dino", "random")
CONFIG = os.path.join(ROOT, "configs", "experiment.py")
# Evaluation: (result key, label for tables, scale shown); the values are stored as measured.
METRICS = (("knn_top1", "k-NN top-1 (%)"), ("probe_top1", "linear probe top-1 (%)"),
           ("seg_miou", "seg mIoU (%)"), ("davis_jf", "DAVIS J&F"), ("corloc", "CorLoc (%)"),
           ("track_iou", "tracking IoU"))
IMAGE_SIZE = 64  # The encoders' training resolution (configs/experiment.py); evaluations use it.
SEG_ITERATIONS = 500  # The readout's training steps (of 16 crops): a few epochs of the small set.


class Runner:
  """Runs commands, logging each with its wall time; skips work whose output exists."""

  def __init__(self, out: str):
    self.out = out
    self.log = open(os.path.join(out, "log.txt"), "a")

  def run(self, args: list[str], *, done: str | None = None) -> float:
    if done and os.path.exists(done):
      return 0.0
    line = " ".join(shlex.quote(a) for a in args)
    print(f"$ {line}", flush=True)
    start = time.time()
    result = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seconds = time.time() - start
    self.log.write(f"$ {line}\n{result.stdout}\n[{seconds:.1f} s, exit {result.returncode}]\n")
    self.log.flush()
    if result.returncode:
      sys.exit(f"failed (exit {result.returncode}) after {seconds:.0f} s: {line}\n"
               + result.stdout[-2000:])
    return seconds


def _read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def evaluate(runner: Runner, encoder: str, data: str, out: str, seed: int) -> dict:
  """Every evaluation of one encoder; returns the numbers of results.json's row."""
  cli = [sys.executable, "-m", "dora_jax.cli.eval"]
  common = ["--checkpoint", encoder, "--no-progress"]
  knn_out = os.path.join(out, "knn")
  runner.run(cli + ["knn"] + common + [
      "--out", knn_out, "--train", os.path.join(data, "views", "train"),
      "--val", os.path.join(data, "views", "val"), "--resize-size", str(IMAGE_SIZE),
      "--crop-size", str(IMAGE_SIZE), "--linear-probe"],
      done=os.path.join(knn_out, "knn.json"))
  seg_out = os.path.join(out, "seg")
  runner.run(cli + ["seg"] + common + [
      "--out", seg_out, "--data", os.path.join(data, "ADE"), "--image-size", str(IMAGE_SIZE),
      "--iterations", str(SEG_ITERATIONS), "--batch-size", "16", "--seed", str(seed)], done=os.path.join(seg_out, "seg_metrics.json"))
  davis_out = os.path.join(out, "davis")
  runner.run(cli + ["davis"] + common + [
      "--out", davis_out, "--data", os.path.join(data, "DAVIS"), "--short-side", str(IMAGE_SIZE),
      "--size-multiple", "8"], done=os.path.join(davis_out, "davis_metrics.json"))
  discover_out = os.path.join(out, "discover")
  runner.run(cli + ["discover"] + common + [
      "--out", discover_out, "--data", os.path.join(data, "VOC"),
      "--short-side", str(IMAGE_SIZE)], done=os.path.join(discover_out, "discover.json"))
  track_out = os.path.join(out, "track")
  runner.run(cli + ["track"] + common + [
      "--out", track_out, "--data", os.path.join(data, "tour"), "--short-side", str(IMAGE_SIZE),
      "--clips", "16", "--frames-per-clip", "4", "--frame-stride", "3", "--num-objects", "2"],
      done=os.path.join(track_out, "track.json"))
  knn = _read(os.path.join(knn_out, "knn.json"))
  seg = _read(os.path.join(seg_out, "seg_metrics.json"))
  davis = _read(os.path.join(davis_out, "davis_metrics.json"))
  discover = _read(os.path.join(discover_out, "discover.json"))
  track = _read(os.path.join(track_out, "track.json"))
  return {"knn_top1": knn["top1"], "probe_top1": knn["linear_top1"], "seg_miou": seg["mIoU"],
          "seg_aacc": seg["aAcc"], "davis_jf": davis["J&F"], "corloc": discover["CorLoc"],
          "track_iou": track["track_iou"]}


def finetune(runner: Runner, encoder: str, data: str, out: str, seed: int) -> dict:
  """dora-finetune's demo comparison on the object views: pretrained vs random backbone."""
  report = os.path.join(out, "comparison.json")
  runner.run([sys.executable, "-m", "dora_jax.cli.finetune", "--config",
              f"configs/finetune_demo.py:backbone={encoder}", f"--config.seed={seed}",
              "--config.data.demo=False",
              f"--config.data.train={os.path.join(data, 'views', 'train')}",
              f"--config.data.val={os.path.join(data, 'views', 'val')}", "--workdir", out],
             done=report)
  comparison = _read(report)
  return {name: 100.0 * comparison[name]["val_accuracy"] for name in ("pretrained", "random")}


def summarise(runs: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
  """arm -> metric -> (mean, sample standard deviation, number of seeds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  table = {}
  for arm in ARMS:
    rows = [r for r in runs if r["arm"] == arm]
    table[arm] = {}
    for key, _ in METRICS:
      values = np.array([r[key] for r in rows if r.get(key) is not None], np.float64)
      if len(values):
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        table[arm][key] = (float(values.mean()), std, len(values))
  return table


def markdown(table) -> str:
  lines = ["| arm | " + " | ".join(label for _, label in METRICS) + " |",
           "|---" * (len(METRICS) + 1) + "|"]
  for arm, row in table.items():
    cells = []
    for key, _ in METRICS:
      if key in row:
        mean, std, _ = row[key]
        digits = 3 if key in ("davis_jf", "track_iou") else 1
        cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
      else:
        cells.append("-")
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def chart(table, runs: list[dict], path: str) -> None:
  """One panel per evaluation: each arm's mean with the seeds' standard deviation, and the seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colours = {"dora": "#d62728", "dino": "#1f77b4", "random": "#7f7f7f"}
  fig, axes = plt.subplots(1, len(METRICS), figsize=(3.0 * len(METRICS), 3.2))
  for ax, (key, label) in zip(axes, METRICS):
    for x, arm in enumerate(ARMS):
      if key not in table[arm]:
        continue
      mean, std, _ = table[arm][key]
      ax.bar(x, mean, yerr=std, color=colours[arm], alpha=0.75, capsize=4)
      seeds = [r[key] for r in runs if r["arm"] == arm and r.get(key) is not None]
      ax.scatter([x] * len(seeds), seeds, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(ARMS)), ARMS)
    ax.set_title(label, fontsize=10)
  fig.suptitle("DoRA vs DINO vs untrained ViT (mean ± std over seeds; dots: seeds)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="workdirs/experiment", help="Work folder (resumable).")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=3000, help="Train steps of both methods.")
  parser.add_argument("--finetune", action="store_true",
                      help="Also run the fine-tuning demo's comparison for every DoRA seed.")
  parser.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"),
                      help="Where results.json, results.md and results.png go.")
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  runner = Runner(out)
  start = time.time()
  load = os.getloadavg()

  data = os.path.join(out, "data")
  timings = {"data": runner.run([sys.executable, "experiments/make_eval_data.py", "--out", data],
                                done=os.path.join(data, "done"))}
  shards = os.path.join(data, "pretrain", "shards")
  runs = []
  for seed in args.seeds:
    for arm in ARMS:
      name = f"{arm}_s{seed}"
      encoder = os.path.join(out, "runs", name)
      method = "dora" if arm == "random" else arm
      config = f"{CONFIG}:method={method},data={shards},steps={args.steps}"
      if arm == "random":
        seconds = runner.run([sys.executable, "-m", "dora_jax.cli.export", "--init", config,
                              "--seed", str(seed), "--out", encoder], done=encoder)
      else:
        seconds = runner.run([sys.executable, "-m", "dora_jax.cli.train", "--config", config,
                              f"--config.seed={seed}", "--workdir", encoder],
                             done=os.path.join(encoder, "done"))
        open(os.path.join(encoder, "done"), "w").close()
      timings[f"train {name}"] = seconds
      eval_start = time.time()
      row = evaluate(runner, encoder, data, os.path.join(out, "eval", name), seed)
      timings[f"eval {name}"] = time.time() - eval_start
      runs.append({"arm": arm, "seed": seed, **row})
      print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None),
            flush=True)

  finetuned = []
  if args.finetune:
    for seed in args.seeds:
      name = f"dora_s{seed}"
      top1 = finetune(runner, os.path.join(out, "runs", name), data,
                      os.path.join(out, "finetune", name), seed)
      finetuned.append({"seed": seed, **top1})
      print(f"fine-tuning demo, seed {seed}: linear probe top-1 {top1['pretrained']:.1f}% on "
            f"the DoRA encoder, {top1['random']:.1f}% on the random one", flush=True)

  table = summarise(runs)
  os.makedirs(args.results, exist_ok=True)
  wall = time.time() - start
  with open(os.path.join(args.results, "results.json"), "w") as f:
    json.dump({"runs": runs, "finetune_demo": finetuned,
               "summary": {arm: {k: {"mean": m, "std": s, "n": n} for k, (m, s, n) in row.items()}
                           for arm, row in table.items()},
               "steps": args.steps, "seeds": args.seeds, "wall_seconds": round(wall, 1),
               "load_average_at_start": [round(x, 2) for x in load],
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
               "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
               "command": " ".join(shlex.quote(a) for a in sys.argv)}, f, indent=1)
  with open(os.path.join(args.results, "results.md"), "w") as f:
    f.write(markdown(table))
  chart(table, runs, os.path.join(args.results, "results.png"))
  print(markdown(table))
  print(f"wall time {wall / 60:.1f} min; results in {args.results}")


if __name__ == "__main__":
  main()
