r"""DoRA, its DINO baseline and the untrained encoder, several seeds, on held-out synthetic data.

  python experiments/dora_vs_dino.py --out workdirs/experiment [--seeds 0 1 2] [--steps 3000]
      [--object-tour --pretrain-frames 3000] [--controls | --controls-only]

1. Data (experiments/make_eval_data.py, in OUT/data; with --object-tour in OUT/data_objects):
   the pretraining tour (six object kinds; --object-tour: object instances that enter and leave
   in front of many background photos) as shards, and evaluation sets from other tours and
   other object instances: object views for k-NN and the linear probe (also by the photo behind
   them, for the background probe), an ADE20K-layout set (seg), a VOC-layout set (discover),
   DAVIS-layout sequences and a tour with masks (track).
2. Per seed: DoRA and DINO trained by `dora-train` with configs/experiment.py (one recipe; the
   config's docstring lists what differs), and the same ViT as initialised with that seed
   (`dora-export --init`), never trained.
3. Every encoder through the same `dora-eval` commands: k-NN top-1 and linear-probe top-1 on the
   object views ([CLS]), seg mIoU (linear readout on patch tokens), DAVIS J&F, LOST CorLoc,
   tracking IoU, and the background probe (the linear probe of [CLS] for the photo behind the
   object: what an encoder holds instead of the object's kind).
4. --finetune: per seed, the fine-tuning demo's comparison (configs/finetune_demo.py: a linear
   probe trained with dora-finetune on the DoRA encoder, then on the same ViT randomly
   initialised) on the object views.
5. --controls (--controls-only: without steps 2-4), per seed, on the same held-out views:
   positive: the DINO arm's recipe pretrained on clean views of other object instances
     (make_eval_data.py --pretrain-views, converted by `dora-convert IMAGE_FOLDER`), k-NN,
     probe and background probe, against the untrained ViT's;
   supervised: the same ViT trained from a random init with the kind labels
     (configs/experiment_supervised.py), its validation top-1.
6. experiments/results/: results.json (every run; "controls": the controls' runs and summary),
   results.md (mean +- std per arm, then per control), results.png (one panel per evaluation,
   error bars: the standard deviation over seeds). A part this command does not run (the arms
   under --controls-only, the controls without --controls) is kept from the results.json there.

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
SUPERVISED_CONFIG = os.path.join(ROOT, "configs", "experiment_supervised.py")
# Evaluation: (result key, label for tables); the values are stored as measured.
METRICS = (("knn_top1", "k-NN top-1 (%)"), ("probe_top1", "linear probe top-1 (%)"),
           ("seg_miou", "seg mIoU (%)"), ("davis_jf", "DAVIS J&F"), ("corloc", "CorLoc (%)"),
           ("track_iou", "tracking IoU"), ("background_probe_top1", "background probe top-1 (%)"))
# The controls: the untrained ViT, the positive control, the supervised bound.
CONTROLS = ("untrained", "positive", "supervised")
CONTROL_METRICS = (("knn_top1", "k-NN top-1 (%)"), ("probe_top1", "linear probe top-1 (%)"),
                   ("background_knn_top1", "background k-NN top-1 (%)"),
                   ("background_probe_top1", "background probe top-1 (%)"),
                   ("supervised_top1", "supervised val top-1 (%)"))
IMAGE_SIZE = 64  # The encoders' training resolution (configs/experiment.py); evaluations use it.
SEG_ITERATIONS = 500  # The readout's training steps (of 16 crops): a few epochs of the small set.
VIEWS_BY_BACKGROUND = "views_by_background"  # make_eval_data.py's views labelled by the photo.


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


def knn_and_probe(runner: Runner, encoder: str, views: str, out: str) -> tuple[float, float]:
  """(k-NN top-1, linear probe top-1) of `encoder`'s [CLS] on the image folder VIEWS/{train,val}."""
  report = os.path.join(out, "knn.json")
  runner.run([sys.executable, "-m", "dora_jax.cli.eval", "knn", "--checkpoint", encoder,
              "--no-progress", "--out", out, "--train", os.path.join(views, "train"),
              "--val", os.path.join(views, "val"), "--resize-size", str(IMAGE_SIZE),
              "--crop-size", str(IMAGE_SIZE), "--linear-probe"], done=report)
  knn = _read(report)
  return knn["top1"], knn["linear_top1"]


def background_probe(runner: Runner, encoder: str, data: str, out: str) -> dict:
  """The k-NN and the probe of the photo behind each object view (None: the data predates it)."""
  views = os.path.join(data, VIEWS_BY_BACKGROUND)
  if not os.path.isdir(views):
    print(f"no {views}: the background probe needs make_eval_data.py's data of today (make it "
          "again in a new --out)", flush=True)
    return {"background_knn_top1": None, "background_probe_top1": None}
  knn, probe = knn_and_probe(runner, encoder, views, os.path.join(out, "background"))
  return {"background_knn_top1": knn, "background_probe_top1": probe}


def evaluate(runner: Runner, encoder: str, data: str, out: str, seed: int) -> dict:
  """Every evaluation of one encoder; returns the numbers of results.json's row."""
  cli = [sys.executable, "-m", "dora_jax.cli.eval"]
  common = ["--checkpoint", encoder, "--no-progress"]
  knn_top1, probe_top1 = knn_and_probe(runner, encoder, os.path.join(data, "views"),
                                       os.path.join(out, "knn"))
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
  seg = _read(os.path.join(seg_out, "seg_metrics.json"))
  davis = _read(os.path.join(davis_out, "davis_metrics.json"))
  discover = _read(os.path.join(discover_out, "discover.json"))
  track = _read(os.path.join(track_out, "track.json"))
  return {"knn_top1": knn_top1, "probe_top1": probe_top1, "seg_miou": seg["mIoU"],
          "seg_aacc": seg["aAcc"], "davis_jf": davis["J&F"], "corloc": discover["CorLoc"],
          "track_iou": track["track_iou"], **background_probe(runner, encoder, data, out)}


def untrained_encoder(runner: Runner, out: str, shards: str, steps: int, seed: int) -> str:
  """The random arm: the experiment's ViT as initialised with `seed` (`dora-export --init`)."""
  encoder = os.path.join(out, "runs", f"random_s{seed}")
  os.makedirs(os.path.dirname(encoder), exist_ok=True)  # dora-export writes into a folder.
  runner.run([sys.executable, "-m", "dora_jax.cli.export", "--init",
              f"{CONFIG}:method=dora,data={shards},steps={steps}", "--seed", str(seed),
              "--out", encoder], done=encoder)
  return encoder


def pretrain(runner: Runner, encoder: str, method: str, shards: str, steps: int,
             seed: int) -> float:
  """`dora-train` with configs/experiment.py into `encoder`; its wall seconds (0: done before)."""
  config = f"{CONFIG}:method={method},data={shards},steps={steps}"
  seconds = runner.run([sys.executable, "-m", "dora_jax.cli.train", "--config", config,
                        f"--config.seed={seed}", "--workdir", encoder],
                       done=os.path.join(encoder, "done"))
  open(os.path.join(encoder, "done"), "w").close()
  return seconds


def control_shards(runner: Runner, out: str, instances: int) -> str:
  """The positive control's pretraining images: `instances` object instances per kind (other
  than the evaluation's), 8 clean views each, as shards of 64-px images (`dora-convert`)."""
  control = os.path.join(out, "control_data")
  runner.run([sys.executable, "experiments/make_eval_data.py", "--out", control,
              "--pretrain-frames", "0", "--pretrain-views", str(instances), "--no-eval-sets"],
             done=os.path.join(control, "done"))
  shards = os.path.join(control, "shards")
  runner.run([sys.executable, "-m", "dora_jax.cli.convert",
              os.path.join(control, "pretrain_views"), "--out", shards, "--short-side",
              str(IMAGE_SIZE)], done=os.path.join(control, "shards.done"))
  open(os.path.join(control, "shards.done"), "w").close()
  return shards


def supervised(runner: Runner, backbone: str, data: str, out: str, seed: int,
               epochs: int) -> float:
  """The supervised bound: validation top-1 (%) of the ViT of `backbone`'s shape trained from a
  random init with the kind labels of the object views."""
  report = os.path.join(out, "results.json")
  runner.run([sys.executable, "-m", "dora_jax.cli.finetune", "--config",
              f"{SUPERVISED_CONFIG}:backbone={backbone},"
              f"train={os.path.join(data, 'views', 'train')},"
              f"val={os.path.join(data, 'views', 'val')},epochs={epochs}",
              f"--config.seed={seed}", "--workdir", out], done=report)
  return 100.0 * _read(report)["val_accuracy"]


def run_controls(runner: Runner, args: argparse.Namespace, out: str, data: str,
                 shards: str) -> list[dict]:
  """Every control for every seed: results.json's "controls" rows."""
  positive_shards = control_shards(runner, out, args.control_instances)
  rows = []
  for seed in args.seeds:
    untrained = untrained_encoder(runner, out, shards, args.steps, seed)
    positive = os.path.join(out, "runs", f"positive_s{seed}")
    pretrain(runner, positive, "dino", positive_shards, args.steps, seed)
    # The untrained ViT's evaluations are the random arm's (the same folders: run once).
    for name, encoder, folder in (("untrained", untrained, "random"),
                                  ("positive", positive, "positive")):
      evaluation = os.path.join(out, "eval", f"{folder}_s{seed}")
      knn_top1, probe_top1 = knn_and_probe(runner, encoder, os.path.join(data, "views"),
                                           os.path.join(evaluation, "knn"))
      rows.append({"control": name, "seed": seed, "knn_top1": knn_top1,
                   "probe_top1": probe_top1,
                   **background_probe(runner, encoder, data, evaluation)})
    rows.append({"control": "supervised", "seed": seed, "supervised_top1": supervised(
        runner, untrained, data, os.path.join(out, "controls", f"supervised_s{seed}"), seed,
        args.supervised_epochs)})
    print("controls, seed " + str(seed) + ": " + "; ".join(
        f"{row['control']} " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                         if k not in ("control", "seed") and v is not None)
        for row in rows if row["seed"] == seed), flush=True)
  return rows


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


def summarise(runs: list[dict], *, group: str = "arm", names=ARMS, metrics=METRICS
              ) -> dict[str, dict[str, tuple[float, float, int]]]:
  """name (an arm, or a control with group="control") -> metric -> (mean, sample standard
  deviation, number of seeds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  table = {}
  for name in names:
    rows = [r for r in runs if r[group] == name]
    table[name] = {}
    for key, _ in metrics:
      values = np.array([r[key] for r in rows if r.get(key) is not None], np.float64)
      if len(values):
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        table[name][key] = (float(values.mean()), std, len(values))
  return table


def positive_margin(controls: dict) -> dict[str, float]:
  """What the positive control adds to the untrained ViT: the difference of their means (points)
  for each metric both have."""
  positive, untrained = controls.get("positive", {}), controls.get("untrained", {})
  return {key: positive[key][0] - untrained[key][0] for key in positive if key in untrained}


def as_json(table) -> dict:
  return {name: {key: {"mean": m, "std": s, "n": n} for key, (m, s, n) in row.items()}
          for name, row in table.items()}


def markdown(table, *, first: str = "arm", metrics=METRICS) -> str:
  lines = [f"| {first} | " + " | ".join(label for _, label in metrics) + " |",
           "|---" * (len(metrics) + 1) + "|"]
  for arm, row in table.items():
    cells = []
    for key, _ in metrics:
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


def controls_report(rows: list[dict], args: argparse.Namespace) -> dict:
  """results.json's "controls": the rows, their summary and the positive control's margin."""
  table = summarise(rows, group="control", names=CONTROLS, metrics=CONTROL_METRICS)
  return {"runs": rows, "summary": as_json(table),
          "positive_minus_untrained": positive_margin(table), "steps": args.steps,
          "seeds": args.seeds, "instances_per_kind": args.control_instances,
          "supervised_epochs": args.supervised_epochs}


def results_markdown(results: dict) -> str:
  """results.md: the arms' table, then the controls' (either may be missing)."""
  parts = []
  if results.get("runs"):
    parts.append(markdown(summarise(results["runs"])))
  if results.get("controls"):
    controls = results["controls"]
    table = summarise(controls["runs"], group="control", names=CONTROLS, metrics=CONTROL_METRICS)
    margin = ", ".join(f"{label} {controls['positive_minus_untrained'][key]:+.1f}"
                       for key, label in CONTROL_METRICS
                       if key in controls["positive_minus_untrained"])
    parts.append(f"Controls ({controls['steps']} steps; positive minus untrained: {margin})\n\n"
                 + markdown(table, first="control", metrics=CONTROL_METRICS))
  return "\n".join(parts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="workdirs/experiment", help="Work folder (resumable).")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=3000,
                      help="Train steps of both methods (and of the positive control).")
  parser.add_argument("--object-tour", action="store_true",
                      help="Pretrain on, and evaluate with tours of, make_eval_data.py's object "
                      "tour (data in OUT/data_objects).")
  parser.add_argument("--pretrain-frames", type=int, default=600,
                      help="Frames of the pretraining tour (make_eval_data.py).")
  parser.add_argument("--finetune", action="store_true",
                      help="Also run the fine-tuning demo's comparison for every DoRA seed.")
  parser.add_argument("--controls", action="store_true",
                      help="Also run the controls (positive, untrained, supervised) per seed.")
  parser.add_argument("--controls-only", action="store_true",
                      help="Run only the controls (the arms' results are kept from results.json).")
  parser.add_argument("--control-instances", type=int, default=200,
                      help="Object instances per kind in the positive control's pretraining "
                      "views (8 views each; 200: 9,600 images).")
  parser.add_argument("--supervised-epochs", type=int, default=100,
                      help="Epochs of the supervised bound over the training views.")
  parser.add_argument("--results", default=os.path.join(ROOT, "experiments", "results"),
                      help="Where results.json, results.md and results.png go.")
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  runner = Runner(out)
  start = time.time()
  load = os.getloadavg()

  data = os.path.join(out, "data_objects" if args.object_tour else "data")
  timings = {"data": runner.run(
      [sys.executable, "experiments/make_eval_data.py", "--out", data, "--pretrain-frames",
       str(args.pretrain_frames)] + (["--object-tour"] if args.object_tour else []),
      done=os.path.join(data, "done"))}
  shards = os.path.join(data, "pretrain", "shards")
  results_path = os.path.join(args.results, "results.json")
  results = _read(results_path) if os.path.exists(results_path) else {}
  if not args.controls_only:
    runs = []
    for seed in args.seeds:
      for arm in ARMS:
        name = f"{arm}_s{seed}"
        encoder = os.path.join(out, "runs", name)
        if arm == "random":
          train_start = time.time()
          untrained_encoder(runner, out, shards, args.steps, seed)
          timings[f"train {name}"] = time.time() - train_start
        else:
          timings[f"train {name}"] = pretrain(runner, encoder, arm, shards, args.steps, seed)
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
    results.update({"runs": runs, "finetune_demo": finetuned,
                    "summary": as_json(summarise(runs)), "steps": args.steps,
                    "seeds": args.seeds, "data": os.path.basename(data)})

  if args.controls or args.controls_only:
    controls_start = time.time()
    results["controls"] = controls_report(run_controls(runner, args, out, data, shards), args)
    timings["controls"] = time.time() - controls_start

  os.makedirs(args.results, exist_ok=True)
  wall = time.time() - start
  results.update({"wall_seconds": round(wall, 1),
                  "load_average_at_start": [round(x, 2) for x in load],
                  "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                  "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
                  "command": " ".join(shlex.quote(a) for a in sys.argv)})
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)
  report = results_markdown(results)
  with open(os.path.join(args.results, "results.md"), "w") as f:
    f.write(report)
  if results.get("runs"):
    chart(summarise(results["runs"]), results["runs"], os.path.join(args.results, "results.png"))
  print(report)
  print(f"wall time {wall / 60:.1f} min; results in {args.results}")


if __name__ == "__main__":
  main()
