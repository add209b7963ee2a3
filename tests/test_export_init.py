"""dora-export --init: a config's encoder as the trainer initialises it, for random baselines."""
import os

from flax import nnx
import jax
import numpy as np

from dora_jax import config_base
from dora_jax import pretrained
from dora_jax.cli import export as export_main
from dora_jax.trainer import plan as plan_lib
from dora_jax.trainer import step as train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def _params(backbone):
  return {"/".join(map(str, path)): np.asarray(value)
          for path, value in nnx.to_flat_state(nnx.state(backbone, nnx.Param))}


def test_init_export_is_the_runs_step_zero_teacher(tmp_path, capsys):
  for seed in (0, 1):
    assert export_main.main(["--init", DEMO, "--seed", str(seed),
                             "--out", str(tmp_path / f"s{seed}")]) == 0
  exported = [_params(pretrained.load_backbone(str(tmp_path / f"s{seed}"))) for seed in (0, 1)]
  # The reference: the trainer's initial state built eagerly (not through the command's jit).
  config = config_base.load_config_file(DEMO)
  graphdef, state = train_step.init_train_state(
      config, plan_lib.TrainPlan.from_config(config), rng=jax.random.PRNGKey(0))
  reference = _params(train_step.teacher_backbone(graphdef, state))
  assert exported[0].keys() == reference.keys()
  for name, value in reference.items():
    np.testing.assert_allclose(exported[0][name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  # Another seed is another encoder.
  assert any(not np.allclose(exported[0][n], exported[1][n]) for n in reference
             if reference[n].size > 1)


def test_init_errors_are_one_line(tmp_path, capsys):
  assert export_main.main(["--init", str(tmp_path / "none.py"), "--out", str(tmp_path / "a")]) == 2
  assert "none.py does not exist" in capsys.readouterr().err
  assert export_main.main(["--init", DEMO, "--variant", "S/16", "--out", str(tmp_path / "b")]) == 2
  assert "do not go with --init" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
