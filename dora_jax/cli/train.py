r"""`dora-train`: trains DoRA (or the DINO baseline) as a config describes.

  dora-train --config configs/demo.py --workdir workdirs/demo
  dora-train --config configs/dora_vits16_wtours.py:data=/data/wt_venice --workdir /ckpt/venice \
      --config.total_steps=8

Every config key can be overridden with --config.KEY=VALUE (an unknown key is an error). Running
the same command again in the same work folder resumes from its latest checkpoint.

On a multi-host Cloud TPU pod or a GPU cluster, pass --distributed (or set DORA_DISTRIBUTED=1) on
every host: `jax.distributed.initialize()` finds the other hosts from the environment (TPU
metadata, SLURM) or from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.

A failure is one line on stderr (`dora-train: error: ...`) and a non-zero exit status: 2 for bad
input (flags, config, a work folder in use or of another model), 1 when the run fails (a NaN loss,
a full disk, damaged checkpoints), 130 on Ctrl-C. Unexpected failures append their traceback, and
the warnings and errors logged before them, to WORKDIR/dora-train.log; --verbose (or
DORA_DEBUG=1) prints the traceback instead.
"""
import collections
import logging as logging_std
import os
import sys
import threading
import time
import traceback

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/X.py[:ARG].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, metrics and pictures; the same folder resumes.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("DORA_DISTRIBUTED", "") not in ("", "0", "false"),
    "Call jax.distributed.initialize() first (multi-host runs); default from $DORA_DISTRIBUTED.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", os.environ.get("DORA_DEBUG", "") not in ("", "0", "false"),
    "On failure print the full traceback, and the errors libraries log; default from $DORA_DEBUG.")
flags.mark_flags_as_required(["config", "workdir"])
# dora-finetune parses the same flags: it sets these to name itself and its config keys.
PROGRAM = "dora-train"
CONFIG_KEYS_FILE = "dora_jax/config_base.py"

LOG_FILE = "dora-train.log"  # In the work folder: the tracebacks of unexpected failures.


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # dora_jax/


def _from_library(record: logging_std.LogRecord) -> bool:
  """Whether a library (orbax, jax, asyncio, ...) logged `record`, rather than dora_jax."""
  return not os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep)


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of libraries (orbax logs every save in detail); warnings stay.

  Their errors go to the log file only (unless --verbose): each one ends in an exception that
  reaches `_main`, which says what failed in one line.
  """

  def filter(self, record: logging_std.LogRecord) -> bool:
    if not _from_library(record):
      return True
    return record.levelno == logging_std.WARNING or (
        record.levelno > logging_std.WARNING and _VERBOSE.value)


class _Recorder(logging_std.Handler):
  """Keeps the last warnings and errors (any source) and our INFO lines, for the log file."""

  def __init__(self, capacity: int = 2000):
    super().__init__(logging_std.INFO)
    self.setFormatter(logging_std.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    self.lines = collections.deque(maxlen=capacity)
    self.stray_errors = 0  # Exceptions of background threads and of collected coroutines.

  def emit(self, record: logging_std.LogRecord) -> None:
    if record.levelno >= logging_std.WARNING or not _from_library(record):
      self.lines.append(self.format(record))


_RECORDER = _Recorder()


def _record_stray_errors() -> None:
  """Errors in background threads and in garbage-collected coroutines (orbax, tensorstore) go to
  the log file, not to stderr: the failure they belong to is reported in one line."""

  def record(heading, exc_type, exc_value, exc_traceback):
    _RECORDER.stray_errors += 1
    _RECORDER.lines.append(heading + "\n" + "".join(
        traceback.format_exception(exc_type, exc_value, exc_traceback)))

  def thread_error(args):
    record(f"Exception in thread {getattr(args.thread, 'name', '?')}:", args.exc_type,
           args.exc_value, args.exc_traceback)

  def unraisable(args):
    record(f"{args.err_msg or 'Exception ignored in'}: {args.object!r}", args.exc_type,
           args.exc_value, args.exc_traceback)

  threading.excepthook = thread_error
  sys.unraisablehook = unraisable


def _write_log(error: BaseException | None) -> str | None:
  """Appends the recorded lines and `error`'s traceback to WORKDIR/dora-train.log; its path."""
  workdir = flags.FLAGS["workdir"].value
  if not workdir or not os.path.isdir(workdir):
    return None
  name = LOG_FILE
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_count() > 1:  # The processes of a run share the folder.
    name = LOG_FILE.replace(".log", f".process_{jax.process_index()}.log")
  path = os.path.join(os.path.abspath(workdir), name)
  try:
    with open(path, "a") as f:
      f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
      # A copy: background threads (orbax's) may still be logging while this runs.
      f.writelines(line + "\n" for line in _RECORDER.lines.copy())
      if error is not None:
        f.write("".join(traceback.format_exception(error)))
  except OSError:  # A full disk, say: the one line on stderr is what is left.
    return None
  return path


def _fail(message: str, code: int) -> None:
  print(f"{PROGRAM}: error: {message}", file=sys.stderr)
  sys.exit(code)


def _fail_with_log(message: str, error: BaseException, code: int) -> None:
  """One line; the traceback goes to the log file, or to stderr with --verbose."""
  if _VERBOSE.value:
    traceback.print_exception(error)
    _fail(message, code)
  log = _write_log(error)
  _fail(message + (f" (details: {log})" if log else ""), code)


def _config_file_error(error: BaseException, filename: str) -> str | None:
  """'FILE line N: Type: message' when the config file's own code (or syntax) raised `error`."""
  path = os.path.abspath(filename)
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, SyntaxError) and error.filename and os.path.abspath(
        error.filename) == path:
      return f"{filename} line {error.lineno}: SyntaxError: {error.msg}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(frame.filename) == path]
    if frames:
      lines = str(error).strip().splitlines()
      return (f"{filename} line {frames[-1].lineno}: {type(error).__name__}"
              + (f": {lines[0]}" if lines else ""))
    error = error.__cause__ or error.__context__
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with one-line errors for bad flags, overrides and config files."""
  try:
    remaining = flags.FLAGS(argv)
    config = _CONFIG.value
    config.keys()  # Loading a missing config file fails lazily: make it fail here.
  except Exception as e:  # pylint: disable=broad-except
    _fail(_parse_error(e, argv), 2)
  if not isinstance(config, ml_collections.ConfigDict):
    _fail(f"--config {_config_filename(argv)}: get_config() returned a {type(config).__name__}, "
          "expected an ml_collections.ConfigDict.", 2)
  return remaining


def _config_filename(argv: list[str]) -> str:
  """The --config file (without its :ARG), also when parsing the flags failed."""
  value = ""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value.split(":", 1)[0]


def _parse_error(error: Exception, argv: list[str]) -> str:
  """The one line for what absl, ml_collections or the config file raised while parsing."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if isinstance(error, flags.Error):
    # A config file whose get_config raises ValueError comes with its traceback: keep the flag
    # and the error line.
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
  if isinstance(error, OSError):
    return f"cannot load --config {_config_filename(argv)}: {lines[-1]}"
  problem = _config_file_error(error, _config_filename(argv))
  if problem is not None:
    return f"cannot load --config {problem}"
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections says "'base_lrr'\nDid you mean "base_lr"...": name the flag that has it.
    lines = str(error).strip("'\"").replace("\\n", "\n").split("\n")
    key = lines[0].strip("'\"\\")
    culprits = [arg.split("=")[0] for arg in argv if arg.startswith("--config.") and key in arg]
    hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
    return (f"unknown config key {key!r} in {', '.join(culprits) or 'the --config overrides'}"
            f"{hint}; see {CONFIG_KEYS_FILE} for the keys.")
  if isinstance(error, ValueError):  # From get_config(arg), e.g. an unknown argument.
    return lines[0]
  return type(error).__name__ + (f": {lines[0]}" if lines else "")


def _main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; config keys are set with --config.KEY=VALUE.", 2)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging_std.getLogger().addHandler(_RECORDER)
  if not _VERBOSE.value:
    _record_stray_errors()
  import jax  # pylint: disable=g-import-not-at-top

  if _DISTRIBUTED.value:
    # Cluster environments (TPU metadata, SLURM, Open MPI, k8s) are detected by jax; elsewhere
    # (e.g. several processes on one machine) say it with these variables.
    counts = {name: int(os.environ[variable]) for name, variable in (
        ("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
              if variable in os.environ}
    jax.distributed.initialize(**counts)
  # Imported after jax.distributed: nothing may touch the devices before it.
  from dora_jax.trainer import checkpoints  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import preflight  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import train  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import lock as workdir_lock  # pylint: disable=g-import-not-at-top

  logging.info("JAX %s: process %d of %d, %d devices (%d local).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if _RECORDER.stray_errors:  # Errors that did not stop the run: say where they are.
      log = _write_log(None)
      print(f"dora-train: warning: {_RECORDER.stray_errors} errors in background threads"
            + (f", written to {log}" if log else ""), file=sys.stderr)
  except (preflight.ConfigError, checkpoints.CheckpointMismatchError,
          workdir_lock.WorkdirLockedError) as e:
    _fail(str(e), 2)  # Found before anything was written.
  except train.NonFiniteLossError as e:
    _fail(str(e), 1)
  except (checkpoints.CheckpointSaveError, checkpoints.CheckpointDamagedError) as e:
    _fail_with_log(str(e), e, 1)
  except KeyboardInterrupt as e:
    _fail_with_log("interrupted (Ctrl-C); run the same command again to resume from the last "
                   "checkpoint.", e, 130)
  except Exception as e:  # pylint: disable=broad-except
    # A bug, or a failure of the machine (memory, disk, network): one line, the rest in the log.
    lines = str(e).strip().splitlines()
    _fail_with_log(f"{type(e).__name__}" + (f": {lines[0]}" if lines else ""), e, 1)


def main() -> None:
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
