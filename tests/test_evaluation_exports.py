"""`dora_jax.evaluation` exports the public evaluation functions at package level, lazily."""
import subprocess
import sys

import pytest


def test_package_level_names_are_the_modules_own():
  from dora_jax import evaluation
  from dora_jax.evaluation import davis, knn, seg, track  # pylint: disable=g-multiple-import
  from dora_jax.evaluation import (  # pylint: disable=g-multiple-import
      evaluate_davis, evaluate_knn, evaluate_seg, evaluate_tracking, knn_classifier, mean_iou)
  assert evaluate_knn is knn.evaluate_knn and knn_classifier is knn.knn_classifier
  assert evaluate_davis is davis.evaluate_davis and evaluate_tracking is track.evaluate_tracking
  assert evaluate_seg is seg.evaluate_seg and mean_iou is seg.mean_iou
  for name in evaluation.__all__:
    assert getattr(evaluation, name) is not None, name
  with pytest.raises(AttributeError, match="has no attribute 'evaluate_nothing'"):
    getattr(evaluation, "evaluate_nothing")


def test_importing_the_package_loads_no_evaluation_module():
  code = ("import sys, dora_jax.evaluation; "
          "print(sorted(m for m in sys.modules if m.startswith('dora_jax.evaluation.')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
