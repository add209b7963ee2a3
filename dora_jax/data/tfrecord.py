"""TFRecord files without TensorFlow: framing, CRC32C, offset indexes and frame Examples.

A TFRecord file is a sequence of records, each framed as

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

(little endian; masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2**32), the format
that `tf.data.TFRecordDataset` reads and `tf.io.TFRecordWriter` writes. Both CRCs are checked on
every read here, and a length against the bytes there before anything is read, so a flipped bit
or a file cut short is a `CorruptRecordError` naming the file, record and byte, never a silently
wrong frame nor an allocation of what a damaged length claims.

Beside each shard `NAME.tfrecord` sits `NAME.tfrecord.idx`, one text line "offset size" per
record (size including the 16 framing bytes), the format of NVIDIA DALI's `tfrecord2idx`, so any
record can be read with one `pread`. An index is checked against its shard's size when read: its
records must follow each other from byte 0 to the end of the file.

Each record of our shards is a `tf.train.Example` for one frame (the protos that
tensorflow-datasets ships, so no TensorFlow at run time) with the features of `FRAME_FEATURES`.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Iterator

import crc32c as crc32c_lib
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from dora_jax import paths

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked CRC of the length bytes.
_FOOTER = struct.Struct("<I")  # masked CRC of the data.
FRAMING_BYTES = _HEADER.size + _FOOTER.size  # 16
INDEX_SUFFIX = ".idx"
REPAIR = "re-run dora-convert with --verify"  # What to do about a damaged shard or index.
# Longest index line: two 20-digit numbers, a space and a newline.
_MAX_INDEX_LINE = 42

# Feature keys of one frame record, and their tf.train.Feature kind.
FRAME_FEATURES = {
    "video_id": "bytes",  # Manifest id of the video.
    "frame_index": "int64",  # Index of the frame in the decoded source stream (0-based).
    "timestamp": "float",  # Presentation time of the frame in the source, seconds.
    "image/encoded": "bytes",  # JPEG bytes.
    "image/format": "bytes",  # b"jpeg".
    "image/height": "int64",  # Stored height in pixels.
    "image/width": "int64",  # Stored width in pixels.
}


class CorruptRecordError(ValueError):
  """A TFRecord file or offset index that does not check out (framing, CRCs, sizes).

  Raised with what is wrong, naming the file, record and byte (`problem`); the message adds
  what to do. It pickles (grain workers send it to the trainer) with its one argument.
  """

  @property
  def problem(self) -> str:
    return self.args[0]

  def __str__(self) -> str:
    return f"{self.problem}; {REPAIR}"


def masked_crc(data: bytes) -> int:
  """The masked CRC32C that TFRecord framing stores for `data`."""
  crc = crc32c_lib.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """`data` framed as one TFRecord (length, CRCs)."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def _read_header(path: str, index: int, offset: int, header: bytes) -> int:
  """The data length in the record header `header`, once the length's own CRC checks out."""
  if len(header) < _HEADER.size:
    raise CorruptRecordError(
        f"TFRecord '{path}' is cut short: record {index} at byte {offset} has "
        f"{len(header)} of {_HEADER.size} header bytes")
  length, length_crc = _HEADER.unpack_from(header)
  if masked_crc(header[:8]) != length_crc:
    raise CorruptRecordError(
        f"TFRecord '{path}': bad length CRC in record {index} at byte {offset} (file corrupt)")
  return length


def _check_fits(path: str, index: int, offset: int, length: int, available: int) -> None:
  """Checks that a record of data `length` fits in the `available` bytes from its `offset`.

  Done before reading the data: a damaged length is an error, never an allocation of up to
  2**64 bytes.
  """
  if length + FRAMING_BYTES > available:
    raise CorruptRecordError(
        f"TFRecord '{path}' is cut short: record {index} at byte {offset} needs "
        f"{length + FRAMING_BYTES} bytes, {available} are left")


def _check_record(path: str, index: int, offset: int, blob: bytes, size: int | None) -> bytes:
  """The data of the framed record `blob` read at `offset`, after checking length and CRCs.

  `blob` is what was read for the record: its index `size` bytes, or (`size` None, when walking
  the framing) the record as its length field says.
  """
  length = _read_header(path, index, offset, blob[:_HEADER.size])
  if size is not None and length + FRAMING_BYTES != size:
    raise CorruptRecordError(
        f"TFRecord '{path}': record {index} at byte {offset} holds {length} bytes but its index "
        f"'{path}{INDEX_SUFFIX}' says {size - FRAMING_BYTES}")
  _check_fits(path, index, offset, length, len(blob))
  data = blob[_HEADER.size:_HEADER.size + length]
  (data_crc,) = _FOOTER.unpack_from(blob, _HEADER.size + length)
  if masked_crc(data) != data_crc:
    raise CorruptRecordError(
        f"TFRecord '{path}': bad data CRC in record {index} at byte {offset} (file corrupt)")
  return data


class TFRecordWriter:
  """Writes framed records to `path` and, on `close`, the offset index `path.idx`.

  Use as a context manager. Records are appended; `offsets` and `sizes` describe them.
  """

  def __init__(self, path: str, index_path: str | None = None):
    self.path = path
    self.index_path = index_path if index_path is not None else path + INDEX_SUFFIX
    self._file = open(path, "wb")
    self._position = 0
    self.offsets: list[int] = []
    self.sizes: list[int] = []

  def write(self, data: bytes) -> None:
    framed = frame_record(data)
    self._file.write(framed)
    self.offsets.append(self._position)
    self.sizes.append(len(framed))
    self._position += len(framed)

  def close(self) -> None:
    if self._file.closed:
      return
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    write_index(self.index_path, self.offsets, self.sizes)

  def __enter__(self) -> "TFRecordWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_index(index_path: str, offsets, sizes) -> None:
  """Writes the offset index (under a temporary name, renamed when complete)."""
  with open(index_path + ".tmp", "w") as f:
    f.writelines(f"{o} {s}\n" for o, s in zip(offsets, sizes))
  os.replace(index_path + ".tmp", index_path)


def iter_records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file in order (any writer, TensorFlow's included), CRC-checked.

  A file cut short at a record boundary reads as the records before the cut: only an index or a
  record count can tell.
  """
  with open(path, "rb") as f:
    file_size = os.fstat(f.fileno()).st_size
    offset, index = 0, 0
    while True:
      header = f.read(_HEADER.size)
      if not header:
        return
      length = _read_header(path, index, offset, header)
      _check_fits(path, index, offset, length, file_size - offset)
      blob = header + f.read(length + _FOOTER.size)
      yield _check_record(path, index, offset, blob, None)
      offset += len(blob)
      index += 1


def build_index(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, sizes) of the records of `path`, found by walking the framing (CRCs checked)."""
  offsets, sizes, offset = [], [], 0
  for data in iter_records(path):
    offsets.append(offset)
    sizes.append(len(data) + FRAMING_BYTES)
    offset += sizes[-1]
  return np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)


def read_index(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, sizes) of the shard `path` from its index file `path.idx`, checked against it.

  Only the file sizes are looked at, no record: the index must list records that follow each
  other from byte 0 to the end of the shard, each at least the framing long.

  Raises:
    FileNotFoundError: the shard or its index is missing.
    CorruptRecordError: the index is not such a list (binary, garbled, cut short, stale).
  """
  index_path = path + INDEX_SUFFIX
  try:
    file_size = paths.size(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"shard '{path}' is missing; {REPAIR}") from None
  try:
    index_size = paths.size(index_path)
    if index_size > (file_size // FRAMING_BYTES + 1) * _MAX_INDEX_LINE:
      raise CorruptRecordError(
          f"offset index '{index_path}' has {index_size} bytes, too many for the "
          f"{file_size} bytes of its shard")
    words = paths.read_bytes(index_path).split()
  except FileNotFoundError:
    raise FileNotFoundError(
        f"offset index '{index_path}' of shard '{path}' is missing; {REPAIR}") from None
  table = None
  if len(words) % 2 == 0:
    try:
      table = np.array(words, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):  # Not decimal integers, or ones too large.
      pass
  if table is None:
    raise CorruptRecordError(
        f"offset index '{index_path}' is not lines of 'offset size' (garbled or binary)")
  offsets, sizes = table[:, 0].copy(), table[:, 1].copy()
  # Bounded by the file first, so that offset + size cannot overflow.
  bad = np.flatnonzero((sizes < FRAMING_BYTES) | (sizes > file_size) | (offsets < 0) |
                       (offsets > file_size))
  ends = offsets + sizes
  if not len(bad):  # Each record starts where the one before ends.
    bad = np.flatnonzero(offsets != np.concatenate([[0], ends[:-1]]))
  if len(bad):
    i = int(bad[0])
    raise CorruptRecordError(
        f"offset index '{index_path}' is damaged at record {i} (listed at byte {offsets[i]}, "
        f"{sizes[i]} bytes) for a {file_size}-byte shard")
  end = int(ends[-1]) if len(ends) else 0
  if end != file_size:
    raise CorruptRecordError(
        f"shard '{path}' has {file_size} bytes, but its index '{index_path}' lists "
        f"{len(offsets)} records ending at byte {end} (shard cut short, or index stale)")
  return offsets, sizes


class ShardReader:
  """Random access to the records of one shard through its offset index.

  Thread-safe (`os.pread`; a cloud URL gets one ranged read per record) and picklable: the file
  is (re)opened lazily in each process. With `num_records` (the count the manifest lists), an index listing another count is an error:
  framing has no record numbers, so only the count tells a lost or extra index line.
  """

  def __init__(self, path: str, num_records: int | None = None):
    self.path = path
    self._offsets, self._sizes = read_index(path)  # Checked against the shard's size.
    if num_records is not None and len(self._offsets) != num_records:
      raise CorruptRecordError(
          f"shard '{path}': its index '{path}{INDEX_SUFFIX}' lists {len(self._offsets)} records, "
          f"the manifest {num_records}")
    self._fd: int | None = None
    self._pid: int | None = None

  def __len__(self) -> int:
    return len(self._offsets)

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_fd"] = None
    state["_pid"] = None
    return state

  def _descriptor(self) -> int:
    if self._fd is None or self._pid != os.getpid():
      try:
        self._fd = os.open(self.path, os.O_RDONLY)
      except FileNotFoundError:
        raise FileNotFoundError(f"shard '{self.path}' is missing; {REPAIR}") from None
      self._pid = os.getpid()
    return self._fd

  def read(self, index: int) -> bytes:
    """The data of record `index` (CRC-checked)."""
    if not 0 <= index < len(self._offsets):
      raise IndexError(f"record {index} out of range for shard '{self.path}' ({len(self)} records)")
    offset, size = int(self._offsets[index]), int(self._sizes[index])
    # At most the index's size, which read_index bounded by the file's.
    if paths.is_remote(self.path):
      blob = paths.read_range(self.path, offset, size)
    else:
      blob = os.pread(self._descriptor(), size, offset)
    return _check_record(self.path, index, offset, blob, size)

  def close(self) -> None:
    if self._fd is not None and self._pid == os.getpid():
      os.close(self._fd)
    self._fd = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def encode_frame(*, video_id: str, frame_index: int, timestamp: float, jpeg: bytes, height: int,
                 width: int) -> bytes:
  """A serialised tf.train.Example for one frame (the features of `FRAME_FEATURES`)."""
  example = tf_example_pb2.Example()
  feature = example.features.feature
  feature["video_id"].bytes_list.value.append(video_id.encode("utf-8"))
  feature["frame_index"].int64_list.value.append(int(frame_index))
  feature["timestamp"].float_list.value.append(float(timestamp))
  feature["image/encoded"].bytes_list.value.append(jpeg)
  feature["image/format"].bytes_list.value.append(b"jpeg")
  feature["image/height"].int64_list.value.append(int(height))
  feature["image/width"].int64_list.value.append(int(width))
  # Deterministic: map fields in key order, not in the order of a per-process hash.
  return example.SerializeToString(deterministic=True)


def decode_frame(data: bytes, *, path: str = "?") -> dict[str, Any]:
  """The features of a frame record as Python values (`video_id` str, `image/encoded` bytes)."""
  example = tf_example_pb2.Example()
  try:
    example.ParseFromString(data)
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptRecordError(f"record in '{path}' is not a tf.train.Example: {e}") from None
  feature = example.features.feature
  out = {}
  for key, kind in FRAME_FEATURES.items():
    if key not in feature:
      raise CorruptRecordError(f"record in '{path}' lacks feature '{key}' (not a dora-convert "
                               "shard)")
    values = getattr(feature[key], f"{kind}_list").value
    out[key] = values[0]
  out["video_id"] = out["video_id"].decode("utf-8")
  return out
