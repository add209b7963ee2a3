"""dora-train's failures a user can cause: one line on stderr, a non-zero status, no traceback.

Each test runs `python -m dora_jax.cli.train` as a process. The full-disk test mounts a small tmpfs
under the work folder in a user namespace (`unshare`), where the system allows it.
"""
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from dora_jax.cli import train as main
from dora_jax import checkpoint
from dora_jax.checkpoint import lock as workdir_lock
from dora_jax.trainer import preflight
from dora_jax.cli import runner
from dora_runs import DEMO_CONFIG, ROOT, demo_config, demo_flags


def _run(args, env, timeout=300):
  """(return code, stderr) of dora-train with `args`."""
  process = subprocess.run([sys.executable, "-m", "dora_jax.cli.train"] + args, cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
  return process.returncode, process.stderr


def _errors(stderr):
  """The error lines: ours, absl's ERROR records (E1128 12:00:00...), and tracebacks."""
  return [line for line in stderr.splitlines()
          if line.startswith("dora-train: error:") or re.match(r"E\d{4} ", line)
          or line.startswith("Traceback")]


@pytest.fixture
def config_file(tmp_path):
  def write(text):
    path = tmp_path / "my_config.py"
    path.write_text(text)
    return str(path)
  return write


@pytest.mark.parametrize("text,expected", [
    ("def get_config(arg=None)\n  return None\n", "line 1: SyntaxError: expected ':'"),
    ("import ml_collections\n\ndef get_config(arg=None):\n  raise RuntimeError('no data here')\n",
     "line 4: RuntimeError: no data here"),
    ("def get_config(arg=None):\n  return {'batch_size': 8}\n",
     ": get_config() returned a dict, expected an ml_collections.ConfigDict."),
])
def test_unreadable_config_file(config_file, env, tmp_path, text, expected):
  path = config_file(text)
  returncode, stderr = _run(["--config", path, "--workdir", str(tmp_path / "run")], env)
  assert returncode == 2
  assert _errors(stderr) == [_errors(stderr)[0]] and _errors(stderr)[0].startswith(
      "dora-train: error: ") and _errors(stderr)[0].endswith(expected), stderr[-2000:]
  assert path in stderr
  assert not os.path.exists(tmp_path / "run")


def test_batch_size_zero_asks_for_a_positive_multiple(data_dir):
  config = demo_config(data_dir, batch_size=0)
  with pytest.raises(preflight.ConfigError) as error:
    preflight.check_config(config)
  assert str(error.value) == ("config batch_size=0: must be a positive multiple of the 4 devices "
                              "(e.g. --config.batch_size=4).")


def test_work_folder_in_use(data_dir, env, tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.WorkdirLock(workdir, command="dora-train"):
    returncode, stderr = _run(["--config", DEMO_CONFIG, "--workdir", workdir]
                              + demo_flags(data_dir), env)
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]  # Nothing written beside it.
  assert returncode == 2
  assert _errors(stderr) == [
      f"dora-train: error: --workdir {workdir} is in use by dora-train (pid {os.getpid()} on "
      f"{socket.gethostname()}, since {_errors(stderr)[0].split(', since ')[1]}"]
  assert _errors(stderr)[0].endswith(": wait for it to end, stop it, or choose another --workdir.")


def _can_mount_tmpfs(tmp_path):
  if shutil.which("unshare") is None:
    return False
  target = tmp_path / "probe"
  target.mkdir()
  probe = subprocess.run(
      ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
       f"mount -t tmpfs -o size=64k tmpfs {target}"], capture_output=True)
  target.rmdir()
  return probe.returncode == 0


_FULL_DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size=64m tmpfs "$CHECKPOINTS"
"$PYTHON" -m dora_jax.cli.train "$@" --config.total_steps=4 > /dev/null 2> "$OUT/first.err"
echo $? > "$OUT/first.rc"
used=$(df -k --output=used "$CHECKPOINTS" | tail -n 1)
mount -o remount,size=$((used * 3 / 2))k "$CHECKPOINTS"  # Room for half a checkpoint more.
"$PYTHON" -m dora_jax.cli.train "$@" --config.total_steps=8 > /dev/null 2> "$OUT/full.err"
echo $? > "$OUT/full.rc"
ls "$CHECKPOINTS" > "$OUT/full.ls"
mount -o remount,size=64m "$CHECKPOINTS"  # Space freed.
"$PYTHON" -m dora_jax.cli.train "$@" --config.total_steps=8 > /dev/null 2> "$OUT/again.err"
echo $? > "$OUT/again.rc"
ls "$CHECKPOINTS" > "$OUT/again.ls"
"""


def test_full_disk_during_a_save(data_dir, env, tmp_path):
  """The disk holds checkpoint 4 and half as much again: 8 does not fit. One line; 4 resumes.

  The tmpfs is sized from checkpoint 4 as this machine writes it (its size varies with the
  platform and the library versions: a fixed size let checkpoint 8 fit on another machine).
  """
  if not _can_mount_tmpfs(tmp_path):
    pytest.skip("cannot mount a tmpfs here (no unprivileged user namespaces)")
  workdir = tmp_path / "run"
  checkpoint_dir = workdir / checkpoint.CHECKPOINT_DIR
  checkpoint_dir.mkdir(parents=True)
  args = ["--config", DEMO_CONFIG, "--workdir", str(workdir)] + demo_flags(
      data_dir, checkpoint_every_steps=4, picture_every_steps=0)
  script_env = dict(env, CHECKPOINTS=str(checkpoint_dir), OUT=str(tmp_path), PYTHON=sys.executable)
  subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                  _FULL_DISK_SCRIPT, "sh"] + args, cwd=ROOT, env=script_env, check=True,
                 timeout=900)
  read = lambda name: (tmp_path / name).read_text()
  log = workdir / main.PROGRAM.log_file
  assert read("first.rc").strip() == "0", read("first.err")[-3000:]
  assert read("full.rc").strip() == "1", read("full.err")[-3000:]
  assert _errors(read("full.err")) == [
      f"dora-train: error: saving checkpoint 8 to {checkpoint_dir} failed: No space left on "
      "device; the last complete checkpoint is step 4. Free some space and run the same command "
      f"again to resume. (details: {log})"], read("full.err")[-3000:]
  assert "4" in read("full.ls").split()
  # The log holds what the line leaves out: orbax's errors and the traceback.
  assert "Traceback" in log.read_text() and "No space left on device" in log.read_text()
  # With space again, the same command resumes from checkpoint 4, which is intact.
  assert read("again.rc").strip() == "0", read("again.err")[-3000:]
  assert f"Resuming from {checkpoint_dir}/4" in read("again.err")
  assert _errors(read("again.err")) == [] and "is damaged" not in read("again.err")
  assert read("again.ls").split() == ["4", "8"]


def _raise_deep():
  raise MemoryError("out of host memory while decoding")


def test_unexpected_failure_is_one_line_with_the_traceback_in_the_log(tmp_path, capsys,
                                                                       monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(flags.FLAGS["workdir"], "value", str(tmp_path))
  monkeypatch.setattr(flags.FLAGS["verbose"], "value", False)
  try:
    _raise_deep()
  except MemoryError as e:
    error = e
  with pytest.raises(SystemExit) as exit_:
    runner.fail_with_log(main.PROGRAM, "MemoryError: out of host memory while decoding", error,
                         1)
  assert exit_.value.code == 1
  log = tmp_path / main.PROGRAM.log_file
  assert capsys.readouterr().err == ("dora-train: error: MemoryError: out of host memory while "
                                     f"decoding (details: {log})\n")
  assert "in _raise_deep" in log.read_text() and "Traceback" in log.read_text()
  # --verbose (or DORA_DEBUG=1): the traceback on stderr, then the same line.
  monkeypatch.setattr(flags.FLAGS["verbose"], "value", True)
  with pytest.raises(SystemExit):
    runner.fail_with_log(main.PROGRAM, "MemoryError: out of host memory while decoding", error,
                         1)
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and "in _raise_deep" in err
  assert err.splitlines()[-1] == "dora-train: error: MemoryError: out of host memory while decoding"


def test_an_old_eval_key_names_the_new_one(config_file, env, tmp_path):
  """The flat `eval.*` keys became `evals.NAME.*` (the registry): an override or a config file
  that still sets one is an error naming its replacement."""
  returncode, stderr = _run(["--config", DEMO_CONFIG, "--workdir", str(tmp_path / "run"),
                             "--config.eval.knn_train=/data/train"], env)
  assert returncode == 2 and _errors(stderr) == [
      "dora-train: error: --config.eval.knn_train: config key eval.knn_train was replaced by "
      "evals.knn.train; see dora_jax/config_base.py for the keys."], stderr[-2000:]
  path = config_file("from dora_jax import config_base\n\n\ndef get_config(arg=None):\n"
                     "  c = config_base.get_base_config()\n  c.eval.seg_data = '/ade'\n"
                     "  return c\n")
  returncode, stderr = _run(["--config", path, "--workdir", str(tmp_path / "run")], env)
  assert returncode == 2 and _errors(stderr) == [
      f"dora-train: error: {path} line 6: config key eval.seg_data was replaced by "
      "evals.seg.data; see dora_jax/config_base.py for the keys."], stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")
