"""experiments/dora_vs_dino.py's summary: mean and sample spread per arm and per control, the
tables, the chart; results.json kept across --controls-only; the supervised bound's config."""
import importlib.util
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _driver():
  spec = importlib.util.spec_from_file_location(
      "dora_vs_dino", os.path.join(ROOT, "experiments", "dora_vs_dino.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_summary_table_and_chart(tmp_path):
  driver = _driver()
  rng = np.random.default_rng(0)
  runs = [{"arm": arm, "seed": seed, **{key: float(rng.uniform(0, 100)) for key, _ in
                                        driver.METRICS}}
          for arm in driver.ARMS for seed in range(3)]
  runs[0]["corloc"] = None  # A missing number is left out, not counted as zero.
  table = driver.summarise(runs)
  for arm in driver.ARMS:
    for key, _ in driver.METRICS:
      values = [r[key] for r in runs if r["arm"] == arm and r[key] is not None]
      mean, std, count = table[arm][key]
      assert count == len(values)
      np.testing.assert_allclose(mean, np.mean(values))
      np.testing.assert_allclose(std, np.std(values, ddof=1))
  lines = driver.markdown(table).splitlines()
  assert len(lines) == 2 + len(driver.ARMS)
  mean, std, _ = table["dino"]["knn_top1"]
  assert f"{mean:.1f} ± {std:.1f}" in lines[3]
  path = tmp_path / "chart.png"
  driver.chart(table, runs, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collapse_indicators():
  spec = importlib.util.spec_from_file_location(
      "feature_stats", os.path.join(ROOT, "experiments", "feature_stats.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rng = np.random.default_rng(0)
  # Every image at (nearly) one point: cosine 1, one direction carries the spread.
  direction = rng.standard_normal(16)
  collapsed = module.stats(direction + 1e-3 * np.outer(rng.standard_normal(50), rng.standard_normal(16)))
  assert collapsed["mean_cos"] > 0.99 and collapsed["top_direction"] > 0.99
  # The 16 basis vectors: pairwise cosine 0; centred, 15 equal directions.
  basis = module.stats(np.eye(16))
  np.testing.assert_allclose(basis["mean_cos"], 0.0, atol=1e-12)
  np.testing.assert_allclose(basis["effective_rank"], 15.0, rtol=1e-9)
  np.testing.assert_allclose(basis["top_direction"], 1 / 15, rtol=1e-9)


def _control_rows(driver, rng):
  rows = []
  for seed in range(3):
    for name in ("untrained", "positive"):
      rows.append({"control": name, "seed": seed,
                   **{key: float(rng.uniform(0, 100)) for key, _ in driver.CONTROL_METRICS
                      if key != "supervised_top1"}})
    rows.append({"control": "supervised", "seed": seed, "supervised_top1": float(
        rng.uniform(0, 100))})
  return rows


def test_controls_summary_margin_and_table():
  driver = _driver()
  rows = _control_rows(driver, np.random.default_rng(1))
  table = driver.summarise(rows, group="control", names=driver.CONTROLS,
                           metrics=driver.CONTROL_METRICS)
  positive = [r["knn_top1"] for r in rows if r["control"] == "positive"]
  untrained = [r["knn_top1"] for r in rows if r["control"] == "untrained"]
  np.testing.assert_allclose(table["positive"]["knn_top1"][:2],
                             (np.mean(positive), np.std(positive, ddof=1)))
  assert "knn_top1" not in table["supervised"] and table["supervised"]["supervised_top1"][2] == 3
  margin = driver.positive_margin(table)
  np.testing.assert_allclose(margin["knn_top1"], np.mean(positive) - np.mean(untrained))
  assert set(margin) == {"knn_top1", "probe_top1", "background_knn_top1",
                         "background_probe_top1"}  # Supervised has no untrained counterpart.
  lines = driver.markdown(table, first="control", metrics=driver.CONTROL_METRICS).splitlines()
  assert lines[0].startswith("| control |") and len(lines) == 2 + len(driver.CONTROLS)
  mean, std, _ = table["supervised"]["supervised_top1"]
  assert lines[-1].startswith("| supervised |") and lines[-1].endswith(
      f"| - | - | - | - | {mean:.1f} ± {std:.1f} |")


def test_controls_only_keeps_the_arms(tmp_path, monkeypatch):
  """--controls-only adds "controls" to results.json and results.md and keeps the arms' runs."""
  driver = _driver()
  rng = np.random.default_rng(2)
  arms = [{"arm": arm, "seed": 0, **{key: float(rng.uniform(0, 100)) for key, _ in
                                     driver.METRICS}} for arm in driver.ARMS]
  results = tmp_path / "results"
  results.mkdir()
  (results / "results.json").write_text(json.dumps({"runs": arms, "steps": 7}))
  out = tmp_path / "work"
  (out / "data").mkdir(parents=True)
  (out / "data" / "done").write_text("")  # The data step is done: nothing runs.
  rows = _control_rows(driver, rng)
  calls = []

  def fake_controls(runner, args, out_dir, data, shards):
    calls.append((args.seeds, data, shards))
    return rows

  monkeypatch.setattr(driver, "run_controls", fake_controls)
  monkeypatch.setattr(sys, "argv", ["dora_vs_dino.py", "--out", str(out), "--controls-only",
                                    "--seeds", "0", "1", "2", "--results", str(results)])
  driver.main()
  assert calls == [([0, 1, 2], str(out / "data"), str(out / "data" / "pretrain" / "shards"))]
  saved = json.loads((results / "results.json").read_text())
  assert saved["runs"] == arms and saved["steps"] == 7  # The arms are kept as they were.
  assert saved["controls"]["runs"] == rows
  positive = np.mean([r["probe_top1"] for r in rows if r["control"] == "positive"])
  untrained = np.mean([r["probe_top1"] for r in rows if r["control"] == "untrained"])
  np.testing.assert_allclose(saved["controls"]["positive_minus_untrained"]["probe_top1"],
                             positive - untrained)
  report = (results / "results.md").read_text()
  assert "| arm |" in report and "| control |" in report
  assert f"linear probe top-1 (%) {positive - untrained:+.1f}" in report


def test_supervised_config_documents_its_command_and_uses_base_keys():
  from dora_jax.finetune import config_base  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
      "experiment_supervised", os.path.join(ROOT, "configs", "experiment_supervised.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "dora-finetune --config configs/experiment_supervised.py" in module.__doc__
  config = module.get_config("backbone=/b,train=/t,val=/v,epochs=3")
  assert (config.mode, config.backbone.init, config.backbone.path) == ("full", "random", "/b")
  assert (config.data.train, config.data.val, config.epochs) == ("/t", "/v", 3)

  def keys(c, prefix=""):
    return set().union(*[keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
                         for k, v in c.items()])

  assert keys(config) == keys(config_base.get_base_config())


def test_make_eval_data_keeps_the_davis_objects_of_the_first_frame():
  spec = importlib.util.spec_from_file_location(
      "make_eval_data", os.path.join(ROOT, "experiments", "make_eval_data.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  masks = np.zeros((3, 2, 4), np.uint16)
  masks[0] = [[0, 7, 7, 3], [0, 0, 300, 0]]  # Objects 3, 7 and 300 in the first frame.
  masks[1] = [[5, 7, 0, 3], [0, 0, 300, 1]]  # 5 enters, 1 (gone before frame 0) shows again.
  masks[2] = [[5, 5, 0, 0], [0, 0, 0, 0]]
  relabelled = module._first_frame_objects(masks)
  assert relabelled.dtype == np.uint8
  np.testing.assert_array_equal(relabelled[0], [[0, 2, 2, 1], [0, 0, 3, 0]])
  np.testing.assert_array_equal(relabelled[1], [[0, 2, 0, 1], [0, 0, 3, 0]])
  assert not relabelled[2].any()
