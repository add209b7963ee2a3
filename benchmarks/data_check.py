r"""The start-up data check (`source.check_data`): seconds for a thousand shards.

  python benchmarks/data_check.py [--workdir /tmp/dora_check_bench] [--shards 1000]
                                  [--records 1000] [--rounds 5]

Writes --shards shards of --records tiny records each (cached in --workdir; the check reads only
file sizes and the offset indexes, so the records' size does not matter, their count does: the
index has one line per record) and a manifest, then times `check_data` over all of them: the
first call (the indexes possibly not in the page cache yet) and the median of --rounds more.
Also times `FrameStore` over the same data (what the pipeline builds next: the same reads).
Not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from dora_jax.data import source
from dora_jax.data import tfrecord


def write_data(folder: str, num_shards: int, num_records: int) -> list[dict]:
  """`num_shards` shards of one video (made once), their manifest entry."""
  os.makedirs(folder, exist_ok=True)
  shards = []
  for k in range(num_shards):
    name = f"bench-{k:05d}.tfrecord"
    path = os.path.join(folder, name)
    if not os.path.exists(path + tfrecord.INDEX_SUFFIX):
      framed = [tfrecord.frame_record(f"{k}/{r}".encode()) for r in range(num_records)]
      with open(path, "wb") as f:
        f.write(b"".join(framed))
      sizes = np.array([len(x) for x in framed], np.int64)
      tfrecord.write_index(path + tfrecord.INDEX_SUFFIX, np.cumsum(sizes) - sizes, sizes)
    shards.append({"file": name, "num_records": num_records})
  video = {"id": "bench", "complete": True, "height": 48, "width": 64,
           "num_frames": num_shards * num_records, "shards": shards}
  with open(os.path.join(folder, source.MANIFEST), "w") as f:
    json.dump({"format": "dora_jax.frames/1", "videos": [video]}, f)
  return [video]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/dora_check_bench")
  parser.add_argument("--shards", type=int, default=1000)
  parser.add_argument("--records", type=int, default=1000)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  folder = os.path.join(args.workdir, f"{args.shards}x{args.records}")
  videos = write_data(folder, args.shards, args.records)
  times = []
  for _ in range(args.rounds + 1):
    start = time.perf_counter()
    source.check_data(folder, videos)
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  source.FrameStore(folder, videos)
  store = time.perf_counter() - start
  print(f"{args.shards} shards x {args.records} records: check_data first call {times[0]:.3f} s, "
        f"median of {args.rounds} more {statistics.median(times[1:]):.3f} s; "
        f"FrameStore {store:.3f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
