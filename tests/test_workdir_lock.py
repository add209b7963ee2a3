"""The work-folder lock: one holder at a time, stale locks (dead pid, silent host) taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dora_jax.checkpoint import lock as workdir_lock


def _write_lock(workdir, age_seconds=0.0, **holder):
  """A lock file as another process would have left it, its heartbeat `age_seconds` old."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lock.LOCK_FILE)
  with open(path, "w") as f:
    json.dump(dict({"command": "dora-train", "since": time.time() - age_seconds,
                    "token": "theirs"}, **holder), f)
  beat = time.time() - age_seconds
  os.utime(path, (beat, beat))
  return path


def _this_machine(**overrides):
  return dict(workdir_lock._machine(), **overrides)


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _holder(workdir):
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
    return json.load(f)


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lock.WorkdirLock(workdir, command="dora-train"):
    assert _holder(workdir)["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
      workdir_lock.WorkdirLock(workdir, command="dora-finetune").acquire()
    message = str(error.value)
    assert "\n" not in message
    assert workdir in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert "dora-train" in message
  # Released: the lock file is gone, and so is the folder it created (nothing else was written).
  assert not os.path.exists(workdir)
  with workdir_lock.WorkdirLock(workdir, command="dora-train"):
    pass


def test_release_keeps_a_folder_that_holds_something(tmp_path):
  workdir = tmp_path / "run"
  with workdir_lock.WorkdirLock(str(workdir), command="dora-train"):
    (workdir / "config.json").write_text("{}")
  assert os.listdir(workdir) == ["config.json"]


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  pid = _dead_pid()
  _write_lock(workdir, **_this_machine(pid=pid))
  with workdir_lock.WorkdirLock(workdir, command="dora-train"):
    assert _holder(workdir)["pid"] == os.getpid()
  assert f"process {pid} is gone" in caplog.text and "Took over the stale lock" in caplog.text


def test_lock_of_a_reused_pid_is_taken_over(tmp_path):
  """Our own (live) pid, but a start time that is not ours: the pid was reused after a crash."""
  if workdir_lock._process_start(os.getpid()) is None:
    pytest.skip("no /proc: process start times are unknown here")
  workdir = str(tmp_path / "run")
  _write_lock(workdir, **_this_machine(pid=os.getpid(), start="1"))
  with workdir_lock.WorkdirLock(workdir, command="dora-train"):
    assert _holder(workdir)["token"] != "theirs"


def test_live_process_on_this_machine_keeps_its_lock(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(workdir, **_this_machine(pid=holder.pid,
                                         start=workdir_lock._process_start(holder.pid)))
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid}"):
      workdir_lock.WorkdirLock(workdir, command="dora-train").acquire()
  finally:
    holder.kill()
    holder.wait()
  assert _holder(workdir)["token"] == "theirs"  # Untouched.


def test_lock_of_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  # A live holder on another machine of a shared file system: its pid means nothing here.
  _write_lock(workdir, age_seconds=20, host="node-17", boot="other", pid_namespace="1", pid=1)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on node-17"):
    workdir_lock.WorkdirLock(workdir, command="dora-train").acquire()
  # The same holder, silent for longer than STALE_AFTER_SECONDS: gone.
  _write_lock(workdir, age_seconds=workdir_lock.STALE_AFTER_SECONDS + 60, host="node-17",
              boot="other", pid_namespace="1", pid=1)
  with workdir_lock.WorkdirLock(workdir, command="dora-train"):
    assert _holder(workdir)["host"] == socket.gethostname()
  assert "its heartbeat is" in caplog.text


def test_holder_refreshes_its_heartbeat(tmp_path):
  workdir = str(tmp_path / "run")
  lock = workdir_lock.WorkdirLock(workdir, command="dora-train", heartbeat_seconds=0.05)
  with lock:
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.time() + 10
    while os.stat(lock.path).st_mtime < time.time() - 100 and time.time() < deadline:
      time.sleep(0.02)
    assert os.stat(lock.path).st_mtime > time.time() - 100


def test_takeover_in_progress_by_another_process_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  _write_lock(workdir, **_this_machine(pid=_dead_pid()))
  takeover = os.path.join(workdir, workdir_lock.LOCK_FILE + workdir_lock._TAKEOVER_SUFFIX)
  with open(takeover, "w") as f:
    f.write("someone")
  with pytest.raises(workdir_lock.WorkdirLockedError, match="being taken over"):
    workdir_lock.WorkdirLock(workdir, command="dora-train").acquire()
  # A takeover file left by a process that died while taking over does not block forever.
  old = time.time() - 3600
  os.utime(takeover, (old, old))
  with workdir_lock.WorkdirLock(workdir, command="dora-train"):
    assert not os.path.exists(takeover)
