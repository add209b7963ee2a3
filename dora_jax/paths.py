"""Local paths and cloud URLs (gs://, s3://, ...) alike, through etils.epath.

Work folders and data folders may be URLs on a TPU pod. Everything the project reads or writes
outside orbax (which handles URLs itself) goes through these helpers, never through `os.path` or
`open` on a path that may be a URL. Nothing here imports jax: grain's workers use it.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL of a remote file system (not a local path nor file://)."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute; a URL as it is."""
  text = os.fspath(path)
  return text if is_remote(text) else os.path.abspath(text)


def join(path: str | os.PathLike, *names: str) -> str:
  return os.fspath(epath.Path(path).joinpath(*names))


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def size(path: str | os.PathLike) -> int:
  """The file's size in bytes. Raises FileNotFoundError."""
  if not is_remote(path):
    return os.path.getsize(path)
  candidate = epath.Path(path)
  if not candidate.exists():
    raise FileNotFoundError(os.fspath(path))
  return candidate.stat().length


def read_bytes(path: str | os.PathLike) -> bytes:
  """The file's bytes. Raises FileNotFoundError."""
  candidate = epath.Path(path)
  if is_remote(path) and not candidate.exists():
    raise FileNotFoundError(os.fspath(path))
  return candidate.read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes the whole file so that readers never see half of it.

  Locally through a temporary name and a rename; a cloud object appears whole when its upload
  ends.
  """
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
  """Adds `text` at the end of the file (made if missing); a cloud object is rewritten whole."""
  if is_remote(path):
    before = read_text(path) if exists(path) else ""
    epath.Path(path).write_text(before + text)
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(text)


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
  """`length` bytes of a (remote) file from `offset`: one ranged read."""
  with epath.Path(path).open("rb") as f:
    f.seek(offset)
    return f.read(length)
