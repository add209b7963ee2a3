"""experiments/dora_vs_dino.py's summary: mean and sample spread per arm, the table, the chart."""
import importlib.util
import os

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
