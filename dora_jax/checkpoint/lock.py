"""One run per work folder: a lock file that names its holder, with a heartbeat.

  with lock.WorkdirLock("/ckpt/venice", command="dora-train"):
    ...  # A second WorkdirLock on the folder raises WorkdirLockedError meanwhile.

WORKDIR/dora.lock holds the holder's host, pid and command (JSON). It is created exclusively
(O_EXCL, atomic on local file systems and NFS), its modification time is refreshed every
`HEARTBEAT_SECONDS` by a thread of the holder, and it is removed on release. A lock is stale,
and is taken over with a warning, when its holder is gone:
  - on this machine (same host name, boot and pid namespace): its pid no longer runs, or now
    belongs to another process (its start time differs);
  - anywhere (another host of a shared file system): its heartbeat is older than
    `STALE_AFTER_SECONDS` (a live holder refreshes it; clocks may differ by a minute or two).

`run_lock` is the form for a (multi-host) run: process 0 holds the lock, the others learn from it
whether they may go on.
"""
import contextlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from dora_jax import paths

LOCK_FILE = "dora.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
_TAKEOVER_SUFFIX = ".takeover"  # Held while a stale lock is replaced (only one process may).


class WorkdirLockedError(RuntimeError):
  """The work folder is in use by another live process."""


def _proc_field(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def _process_start(pid: int) -> str | None:
  """When process `pid` started (clock ticks since boot; Linux), to tell a reused pid apart."""
  stat = _proc_field(f"/proc/{pid}/stat")
  if stat is None:
    return None
  return stat.rsplit(")", 1)[-1].split()[19]  # Field 22; the name in () may hold spaces.


def _machine() -> dict:
  """What makes pids comparable: the host name, its boot, and the pid namespace (containers)."""
  try:
    namespace = str(os.stat("/proc/self/ns/pid").st_ino)
  except OSError:
    namespace = None
  return {"host": socket.gethostname(), "boot": _proc_field("/proc/sys/kernel/random/boot_id"),
          "pid_namespace": namespace}


def _pid_runs(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def _holder_is_gone(holder: dict, age: float, stale_after: float) -> str | None:
  """Why the lock of `holder` (its heartbeat `age` seconds old) is stale; None while it is held."""
  if age > stale_after:
    return f"its heartbeat is {age:.0f} s old"
  machine = _machine()
  pid = holder.get("pid")
  if not isinstance(pid, int) or any(holder.get(key) != value for key, value in machine.items()):
    return None  # Another machine (or an unreadable lock): only the heartbeat tells.
  if not _pid_runs(pid):
    return f"process {pid} is gone"
  start = _process_start(pid)
  if holder.get("start") is not None and start is not None and start != holder["start"]:
    return f"process {pid} is gone (its pid now belongs to another process)"
  return None


def describe(holder: dict) -> str:
  """'dora-train (pid 123 on host-a, since 2024-05-01 12:00:00)' for a lock's contents."""
  if not holder:
    return "a process that is still writing the lock file"
  since = holder.get("since")
  when = time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
  return (f"{holder.get('command', 'a process')} (pid {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')}{when})")


class WorkdirLock:
  """Holds WORKDIR/dora.lock while the `with` block (or acquire .. release) runs.

  Creates the work folder if needed, and removes it on release if it is then empty (a run that
  stops on bad input leaves nothing behind).
  """

  def __init__(self, workdir: str, *, command: str, heartbeat_seconds: float = HEARTBEAT_SECONDS,
               stale_after_seconds: float = STALE_AFTER_SECONDS):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._command = command
    self._heartbeat_seconds = heartbeat_seconds
    self._stale_after = stale_after_seconds
    self._token = uuid.uuid4().hex
    self._created_workdir = False
    self._stop = threading.Event()
    self._thread = None

  def _read(self, path: str) -> tuple[dict, float] | None:
    """(holder, heartbeat age in seconds) of a lock file; None when there is none."""
    try:
      with open(path) as f:
        text = f.read()
      age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
    except ValueError:
      holder = {}  # Being written, or garbled: the heartbeat decides.
    return (holder if isinstance(holder, dict) else {}), age

  def _create(self, path: str, contents: str) -> bool:
    """Creates `path` exclusively with `contents`; False if it exists."""
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(contents)
      f.flush()
      os.fsync(f.fileno())
    return True

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, or raises WorkdirLockedError naming the folder and its holder."""
    if not os.path.isdir(self.workdir):
      os.makedirs(self.workdir)
      self._created_workdir = True
    pid = os.getpid()
    contents = json.dumps(dict(_machine(), pid=pid, start=_process_start(pid),
                               command=self._command, since=time.time(), token=self._token))
    try:
      for _ in range(3):  # A holder that releases meanwhile lets the next attempt through.
        if self._create(self.path, contents):
          break
        found = self._read(self.path)
        if found is None:
          continue
        holder, age = found
        reason = _holder_is_gone(holder, age, self._stale_after)
        if reason is None:
          raise WorkdirLockedError(
              f"--workdir {self.workdir} is in use by {describe(holder)}: wait for it to end, "
              f"stop it, or choose another --workdir.")
        if self._take_over(holder, contents):
          logging.warning("Took over the stale lock %s of %s: %s.", self.path, describe(holder),
                          reason)
          break
      else:
        raise WorkdirLockedError(f"--workdir {self.workdir}: could not take {self.path}, which "
                                 "other processes keep taking: run one command at a time.")
    except BaseException:
      self._remove_created_workdir()
      raise
    self._thread = threading.Thread(target=self._beat, name="dora-workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _take_over(self, stale: dict, contents: str) -> bool:
    """Replaces the stale lock of `stale` by ours, unless another process got there first."""
    takeover = self.path + _TAKEOVER_SUFFIX
    if not self._create(takeover, self._token):
      found = self._read(takeover)
      if found is not None and found[1] < max(60.0, 2 * self._heartbeat_seconds):
        raise WorkdirLockedError(
            f"--workdir {self.workdir} is being taken over by another process: let it run, or "
            "choose another --workdir.")
      with contextlib.suppress(FileNotFoundError):  # Left by a process that died taking over.
        os.remove(takeover)
      return False
    try:
      found = self._read(self.path)
      if found is not None and found[0].get("token") != stale.get("token"):
        return False  # The lock changed hands meanwhile: look again.
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      return self._create(self.path, contents)
    finally:
      os.remove(takeover)

  def _holds(self) -> bool:
    found = self._read(self.path)
    return found is not None and found[0].get("token") == self._token

  def _beat(self) -> None:
    """Refreshes the heartbeat; warns once if the lock was taken from us (we were stalled)."""
    while not self._stop.wait(self._heartbeat_seconds):
      try:
        if not self._holds():
          logging.error("The lock %s is no longer ours (this process stalled for more than %d s "
                        "and another took the work folder over).", self.path, self._stale_after)
          return
        os.utime(self.path)
      except OSError as e:  # A shared file system that hiccups: try again at the next beat.
        logging.warning("Could not refresh the lock %s: %s", self.path, e)

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    if self._holds():
      os.remove(self.path)
    self._remove_created_workdir()

  def _remove_created_workdir(self) -> None:
    if self._created_workdir:
      with contextlib.suppress(OSError):  # Not empty: the run wrote something; keep it.
        os.rmdir(self.workdir)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


@contextlib.contextmanager
def run_lock(workdir: str, *, command: str):
  """The lock of a run on one or several processes: process 0 holds it for all of them.

  Every process calls this; a refusal raises WorkdirLockedError on every process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if paths.is_remote(workdir):
    # Cloud storage has no exclusive create through epath: the user keeps one run per folder.
    logging.warning("--workdir %s is a cloud URL: it is not locked against a second run.", workdir)
    yield
    return
  if jax.process_count() == 1:
    with WorkdirLock(workdir, command=command):
      yield
    return
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, command=command).acquire()
    except Exception as e:  # pylint: disable=broad-except
      error = e  # Raised after the others know, so that none of them waits for process 0.
  held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
  if error is not None:
    raise error
  if not held:
    raise WorkdirLockedError(f"--workdir {os.path.abspath(workdir)}: process 0 could not lock it "
                             "(its output says why).")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
