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
