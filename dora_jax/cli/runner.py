r"""The command line around a training run, shared by dora-train and dora-finetune.

  --config FILE[:ARG]   the config file; every key can be overridden with --config.KEY=VALUE (an
                        unknown key is an error naming the program's base config file).
  --workdir DIR         checkpoints, metrics, the log file; the same folder resumes (a local path
                        or a cloud URL).
  --distributed         `jax.distributed.initialize()` first, on every host of a multi-host run
                        (default from $DORA_DISTRIBUTED): the other hosts come from the
                        environment (TPU metadata, SLURM) or from JAX_COORDINATOR_ADDRESS,
                        JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  --verbose             tracebacks on stderr (default from $DORA_DEBUG).

A failure is one line on stderr (`PROGRAM: error: ...`) and a non-zero exit status: 2 for bad
input (flags, config, a work folder in use or of another model), 1 when the run fails (a NaN loss,
a full disk, damaged checkpoints), 130 on Ctrl-C. Unexpected failures append their traceback, and
the warnings and errors logged before them, to WORKDIR/PROGRAM.log (`Program.log_file`).

Nothing here imports jax at module level: `jax.distributed` must start before anything touches
the devices, so the program's run is imported by its `run` callable, after it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging as logging_std
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from dora_jax import paths

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


@dataclasses.dataclass(frozen=True)
class Program:
  """One console script: its name, its config keys, its run.

  Attributes:
    name: the command ("dora-train"): the prefix of its errors and the log file's name.
    config_keys_file: where its config keys are listed, named by unknown-key errors.
    run: `(config, workdir) -> results`; imports the program's modules itself (after
      jax.distributed starts).
    report: `results -> text` printed by process 0 after a run ("" prints nothing).
    replaced_key: `old dotted key -> the key that replaced it` (None: not a removed key), so an
      old key in an override or a config file is an error that names the new one.
  """
  name: str
  config_keys_file: str
  run: Callable[[ml_collections.ConfigDict, str], Any]
  report: Callable[[Any], str] | None = None
  replaced_key: Callable[[str], str | None] | None = None

  @property
  def log_file(self) -> str:
    """In the work folder: the tracebacks of unexpected failures."""
    return f"{self.name}.log"


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


def write_log(program: Program, error: BaseException | None) -> str | None:
  """Appends the recorded lines and `error`'s traceback to WORKDIR/PROGRAM.log; its path (None
  when there is no work folder yet, or it cannot be written)."""
  workdir = flags.FLAGS["workdir"].value
  if not workdir:
    return None
  name = program.log_file
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_count() > 1:  # The processes of a run share the folder.
    name = name.replace(".log", f".process_{jax.process_index()}.log")
  path = paths.join(paths.absolute(workdir), name)
  # A copy: background threads (orbax's) may still be logging while this runs.
  text = "".join([f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n"]
                 + [line + "\n" for line in _RECORDER.lines.copy()]
                 + ([] if error is None else traceback.format_exception(error)))
  try:
    if not paths.isdir(workdir):
      return None
    paths.append_text(path, text)
  except OSError:  # A full disk, say: the one line on stderr is what is left.
    return None
  return path


def fail(program: Program, message: str, code: int) -> None:
  """`PROGRAM: error: message` on stderr; exits with `code`."""
  print(f"{program.name}: error: {message}", file=sys.stderr)
  sys.exit(code)


def fail_with_log(program: Program, message: str, error: BaseException, code: int) -> None:
  """One line; the traceback goes to the log file, or to stderr with --verbose."""
  if _VERBOSE.value:
    traceback.print_exception(error)
    fail(program, message, code)
  log = write_log(program, error)
  fail(program, message + (f" (details: {log})" if log else ""), code)


# ---- Flags. ----


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


def _parse_flags(program: Program, argv: list[str]) -> list[str]:
  """absl's parsing, with one-line errors for bad flags, overrides and config files."""
  try:
    remaining = flags.FLAGS(argv)
    config = _CONFIG.value
    config.keys()  # Loading a missing config file fails lazily: make it fail here.
  except Exception as e:  # pylint: disable=broad-except
    fail(program, _parse_error(program, e, argv), 2)
  if not isinstance(config, ml_collections.ConfigDict):
    fail(program, f"--config {_config_filename(argv)}: get_config() returned a "
         f"{type(config).__name__}, expected an ml_collections.ConfigDict.", 2)
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


def _replaced_key_error(program: Program, error: BaseException, argv: list[str]) -> str | None:
  """'config key eval.k was replaced by evals.knn.k' when an override or the config file's
  failing line uses a removed key."""
  if program.replaced_key is None or not isinstance(error, (AttributeError, KeyError)):
    return None
  used = [(arg.split("=", 1)[0], arg[len("--config."):].split("=", 1)[0]) for arg in argv
          if arg.startswith("--config.")]
  filename = _config_filename(argv)
  for frame in traceback.extract_tb(error.__traceback__):
    if filename and os.path.abspath(frame.filename) == os.path.abspath(filename):
      used += [(f"{filename} line {frame.lineno}", key)
               for key in re.findall(r"\.(\w+(?:\.\w+)?)", frame.line or "")]
  for where, key in used:
    new = program.replaced_key(key)
    if new is not None:
      return (f"{where}: config key {key} was replaced by {new}; see {program.config_keys_file} "
              "for the keys.")
  return None


def _parse_error(program: Program, error: Exception, argv: list[str]) -> str:
  """The one line for what absl, ml_collections or the config file raised while parsing."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if isinstance(error, flags.Error):
    # A config file whose get_config raises ValueError comes with its traceback: keep the flag
    # and the error line.
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
  if isinstance(error, OSError):
    return f"cannot load --config {_config_filename(argv)}: {lines[-1]}"
  replaced = _replaced_key_error(program, error, argv)
  if replaced is not None:
    return replaced
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
            f"{hint}; see {program.config_keys_file} for the keys.")
  if isinstance(error, ValueError):  # From get_config(arg), e.g. an unknown argument.
    return lines[0]
  return type(error).__name__ + (f": {lines[0]}" if lines else "")


# ---- The run. ----


def _main(program: Program, argv: list[str]) -> None:
  if len(argv) > 1:
    fail(program, f"unexpected arguments {argv[1:]}; config keys are set with "
         "--config.KEY=VALUE.", 2)
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
  from dora_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import loop  # pylint: disable=g-import-not-at-top
  from dora_jax.trainer import preflight  # pylint: disable=g-import-not-at-top

  logging.info("JAX %s: process %d of %d, %d devices (%d local).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count())
  try:
    results = program.run(_CONFIG.value, _WORKDIR.value)
    if _RECORDER.stray_errors:  # Errors that did not stop the run: say where they are.
      log = write_log(program, None)
      print(f"{program.name}: warning: {_RECORDER.stray_errors} errors in background threads"
            + (f", written to {log}" if log else ""), file=sys.stderr)
  except (preflight.ConfigError, checkpoint.CheckpointMismatchError,
          checkpoint.WorkdirLockedError) as e:
    fail(program, str(e), 2)  # Found before anything was written.
  except loop.NonFiniteLossError as e:
    fail(program, str(e), 1)
  except (checkpoint.CheckpointSaveError, checkpoint.CheckpointDamagedError) as e:
    fail_with_log(program, str(e), e, 1)
  except KeyboardInterrupt as e:
    fail_with_log(program, "interrupted (Ctrl-C); run the same command again to resume from the "
                  "last checkpoint.", e, 130)
  except Exception as e:  # pylint: disable=broad-except
    # A bug, or a failure of the machine (memory, disk, network): one line, the rest in the log.
    lines = str(e).strip().splitlines()
    fail_with_log(program, f"{type(e).__name__}" + (f": {lines[0]}" if lines else ""), e, 1)
  text = program.report(results) if program.report is not None else ""
  if text and jax.process_index() == 0:
    print(text)


def main(program: Program) -> None:
  """Parses the flags and runs `program`; exits with its status (0, 1, 2 or 130)."""
  app.run(functools.partial(_main, program),
          flags_parser=functools.partial(_parse_flags, program))
