r"""Evaluation kernels at real sizes: the k-NN memory bank (DAVIS: davis_propagation.py).

  python benchmarks/evaluation.py [--train 100000] [--queries 2048] [--dim 384]

k-NN: `knn_votes` of --queries random test features against --train random training features
(ViT-S width 384, 1000 classes), test batches of 256 against chunks of 65536; reports the
seconds per 1000 queries after a compiling warm-up (ImageNet: 1.28 M train, 50 k val features).
Not a test: timings depend on the machine; record them with the machine.
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

from dora_jax.evaluation import knn


def bench_knn(num_train: int, num_queries: int, dim: int) -> float:
  rng = np.random.default_rng(0)
  train = rng.normal(size=(num_train, dim)).astype(np.float32)
  labels = rng.integers(0, 1000, size=num_train)
  queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
  knn.knn_votes(train, labels, queries[:256], num_classes=1000)  # Compiles.
  start = time.perf_counter()
  knn.knn_votes(train, labels, queries, num_classes=1000)
  return (time.perf_counter() - start) / num_queries * 1000


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--train", type=int, default=100_000)
  parser.add_argument("--queries", type=int, default=2048)
  parser.add_argument("--dim", type=int, default=384)
  args = parser.parse_args()
  print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}")
  seconds = bench_knn(args.train, args.queries, args.dim)
  print(f"k-NN: {args.train} train x {args.queries} queries, D={args.dim}: "
        f"{seconds:.3f} s per 1000 queries")


if __name__ == "__main__":
  main()
