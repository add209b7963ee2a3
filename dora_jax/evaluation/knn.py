"""DINO's weighted k-nearest-neighbour classifier on frozen features.

Every test feature finds its k most similar training features (cosine similarity of L2-normalised
features); neighbour j votes for its label with weight exp(similarity_j / temperature); the class
with the largest summed vote is the prediction (top-1), and top-5 asks whether the label is among
the five largest sums (Wu et al. 2018, as DINO's eval_knn.py evaluates: k=20, T=0.07).

The training features stay on one device as (chunks, chunk_size, D); each jitted call scores one
batch of test features against every chunk in turn (`lax.scan`) and keeps a running top-k, so
memory grows with batch_size x chunk_size, not with the number of training features: a million
training features of a ViT-S (384 floats each, 1.5 GB) fit beside a 256 x 65536 similarity block.

Shapes: M training features, Q test features, D width, C classes, b test batch, c chunk size.
"""
from __future__ import annotations

import argparse
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.data import images as images_lib
from dora_jax.evaluation import features as features_lib
from dora_jax.evaluation import probe as probe_lib
from dora_jax.evaluation import registry

# The evaluator's settings (config.evals.NAME keys, dora-eval knn's flags): DINO's values.
DEFAULTS = {
    "train": "",  # The memory bank: an image folder (ROOT/CLASS/IMAGE) or tfds:NAME:SPLIT.
    "val": "",  # The images it classifies (the same classes), same forms.
    "tfds_data_dir": "",  # data_dir of tfds sources ("": tfds's default).
    "k": 20,  # Neighbours that vote (DINO: 20).
    "temperature": 0.07,  # Vote weight exp(cosine / temperature) (DINO: 0.07).
    "batch_size": 256,  # Images per step over all local devices.
    "resize_size": 256,  # Shorter side after the resize (DINO: 256)...
    "crop_size": 224,  # ...then this centre crop (DINO: 224).
    "linear_probe": False,  # Also fit a linear probe on the same features (linear_top1).
}
REPORT_FILE = "knn.json"
SCORES = ("top1", "top5", "linear_top1")
ERRORS = (images_lib.SourceError,)
DESCRIPTION = "DINO's weighted k-NN accuracy on [CLS] features."


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _batch_votes(test: jax.Array, train_chunks: jax.Array, label_chunks: jax.Array,
                 valid_chunks: jax.Array, *, k: int, temperature: jax.Array,
                 num_classes: int) -> jax.Array:
  """Summed neighbour votes of one test batch.

  Args:
    test: (b, D) L2-normalised test features.
    train_chunks: (n, c, D) L2-normalised training features, zero-padded at the end.
    label_chunks: (n, c) int32 their labels.
    valid_chunks: (n, c) bool, False on the padding.
    k: neighbours that vote.
    temperature: scalar, the votes' temperature.
    num_classes: C.

  Returns:
    votes: (b, C) float32, sum over the k nearest training features of exp(sim / T) one-hot.
  """
  batch = test.shape[0]

  def merge(running, chunk):
    features, labels, valid = chunk
    sims = jnp.einsum("bd,cd->bc", test, features, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(valid[None, :], sims, -jnp.inf)
    # The k best so far and this chunk's c candidates: the k best of both are the k best yet.
    all_sims = jnp.concatenate([running[0], sims], axis=1)
    all_labels = jnp.concatenate([running[1], jnp.broadcast_to(labels, sims.shape)], axis=1)
    best, index = jax.lax.top_k(all_sims, k)
    return (best, jnp.take_along_axis(all_labels, index, axis=1)), None

  start = (jnp.full((batch, k), -jnp.inf, jnp.float32), jnp.zeros((batch, k), jnp.int32))
  (sims, labels), _ = jax.lax.scan(merge, start, (train_chunks, label_chunks, valid_chunks))
  # -inf (fewer than k training features) gives weight exp(-inf) = 0.
  weights = jnp.exp(sims / temperature)
  return jnp.einsum("bk,bkc->bc", weights, jax.nn.one_hot(labels, num_classes, dtype=jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def _check(name: str, features: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f"{name}_features must be (n, D) and {name}_labels (n,); got "
                     f"{features.shape} and {labels.shape}.")
  if features.shape[0] == 0:
    raise ValueError(f"{name}_features is empty: the k-NN needs at least one {name} example.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"{name}_labels must lie in [0, num_classes={num_classes}); got values in "
                     f"[{labels.min()}, {labels.max()}].")


def knn_votes(train_features, train_labels, test_features, *, k: int = DEFAULTS["k"],
              temperature: float = DEFAULTS["temperature"], num_classes: int,
              batch_size: int = 256, chunk_size: int = 65536) -> np.ndarray:
  """The summed votes of DINO's weighted k-NN for every test feature.

  Args:
    train_features: (M, D) features of the labelled memory bank (normalised here).
    train_labels: (M,) integer labels in [0, num_classes).
    test_features: (Q, D) features to classify (normalised here).
    k: neighbours that vote (DINO: 20); with k > M all M vote.
    temperature: vote weight exp(similarity / temperature) (DINO: 0.07).
    num_classes: C.
    batch_size: test features per jitted call (the last batch is padded: one compile).
    chunk_size: training features scored at once.

  Returns:
    votes: (Q, C) float32.
  """
  train_features = np.asarray(train_features, np.float32)
  train_labels = np.asarray(train_labels).astype(np.int64)
  test_features = np.asarray(test_features, np.float32)
  _check("train", train_features, train_labels, num_classes)
  if test_features.ndim != 2 or test_features.shape[1] != train_features.shape[1]:
    raise ValueError(f"test_features must be (n, D={train_features.shape[1]}); got "
                     f"{test_features.shape}.")
  if k < 1 or temperature <= 0 or batch_size < 1 or chunk_size < 1:
    raise ValueError(f"need k >= 1, temperature > 0, batch_size >= 1 and chunk_size >= 1; got "
                     f"k={k}, temperature={temperature}, batch_size={batch_size}, "
                     f"chunk_size={chunk_size}.")
  num_train = train_features.shape[0]
  chunk_size = min(chunk_size, num_train)
  num_chunks = -(-num_train // chunk_size)
  pad = num_chunks * chunk_size - num_train
  shape = (num_chunks, chunk_size)
  train_chunks = _l2_normalize(jnp.asarray(
      np.pad(train_features, ((0, pad), (0, 0))))).reshape(shape + (-1,))
  label_chunks = jnp.asarray(np.pad(train_labels, (0, pad)).astype(np.int32).reshape(shape))
  valid_chunks = jnp.asarray((np.arange(num_chunks * chunk_size) < num_train).reshape(shape))
  k = min(k, num_train)

  votes = []
  for start in range(0, test_features.shape[0], batch_size):
    batch = test_features[start:start + batch_size]
    padded = np.pad(batch, ((0, batch_size - batch.shape[0]), (0, 0)))
    out = _batch_votes(_l2_normalize(jnp.asarray(padded)), train_chunks, label_chunks,
                       valid_chunks, k=k, temperature=jnp.float32(temperature),
                       num_classes=num_classes)
    votes.append(np.asarray(out)[:batch.shape[0]])
  return np.concatenate(votes)


def knn_classifier(train_features, train_labels, test_features, test_labels, *,
                   k: int = DEFAULTS["k"], temperature: float = DEFAULTS["temperature"],
                   num_classes: int, batch_size: int = 256,
                   chunk_size: int = 65536) -> tuple[float, float]:
  """DINO's weighted k-NN accuracy: (top1, top5) in percent.

  Args: as `knn_votes`, plus test_labels (Q,) integer labels in [0, num_classes). Top-5 counts the
  min(5, k, C) classes with the largest votes (DINO's eval_knn.py counts min(5, k)).
  """
  test_features = np.asarray(test_features, np.float32)
  test_labels = np.asarray(test_labels).astype(np.int64)
  _check("test", test_features, test_labels, num_classes)
  votes = knn_votes(train_features, train_labels, test_features, k=k, temperature=temperature,
                    num_classes=num_classes, batch_size=batch_size, chunk_size=chunk_size)
  # Stable sort on -votes: ties go to the lower class index, as in a stable descending sort.
  ranked = np.argsort(-votes, axis=1, kind="stable")
  correct = ranked == test_labels[:, None]
  top = min(5, k, num_classes)
  return (100.0 * float(correct[:, 0].mean()), 100.0 * float(correct[:, :top].any(axis=1).mean()))


def evaluate_knn(backbone, train_source, val_source, *, k: int = DEFAULTS["k"],
                 temperature: float = DEFAULTS["temperature"], batch_size: int = 256,
                 resize_size: int = DEFAULTS["resize_size"],
                 crop_size: int = DEFAULTS["crop_size"],
                 num_threads: int = 0, progress: bool = True, linear_probe: bool = False) -> dict:
  """The k-NN accuracy of a backbone's [CLS] features: val images classified by train images.

  Args:
    backbone: the encoder (see `features.Encoder`).
    train_source, val_source: `dora_jax.data.images` sources with the same classes.
    k, temperature: the classifier's (DINO: 20, 0.07).
    batch_size, resize_size, crop_size, num_threads, progress: see `features.extract_features`.
    linear_probe: also fit `probe.linear_probe` on the same train features and score it on the
      val features.

  Returns:
    {"top1", "top5" (percent), "k", "temperature", "num_train", "num_val", "num_classes",
     "train", "val" (the sources' names)}; with linear_probe also "linear_top1",
     "linear_train_top1" (percent) and "linear_l2".
  """
  if train_source.num_classes != val_source.num_classes:
    raise ValueError(f"{train_source.name} has {train_source.num_classes} classes but "
                     f"{val_source.name} has {val_source.num_classes}: the k-NN needs the same.")
  encoder = features_lib.Encoder(backbone, ("cls",))
  extract = functools.partial(features_lib.extract_features, encoder, batch_size=batch_size,
                              resize_size=resize_size, crop_size=crop_size,
                              num_threads=num_threads, progress=progress)
  train_features, train_labels = extract(train_source)
  val_features, val_labels = extract(val_source)
  return knn_report(train_features, train_labels, val_features, val_labels, train_source,
                    val_source, k=k, temperature=temperature, linear_probe=linear_probe)


def knn_report(train_features, train_labels, val_features, val_labels, train_source, val_source,
               *, k: int, temperature: float, linear_probe: bool) -> dict:
  """`evaluate_knn`'s report from the features (see there)."""
  top1, top5 = knn_classifier(train_features, train_labels, val_features, val_labels, k=k,
                              temperature=temperature, num_classes=train_source.num_classes)
  report = {"top1": top1, "top5": top5, "k": k, "temperature": temperature,
            "num_train": len(train_labels), "num_val": len(val_labels),
            "num_classes": train_source.num_classes, "train": train_source.name,
            "val": val_source.name}
  if linear_probe:
    fitted = probe_lib.linear_probe(train_features, train_labels, val_features, val_labels,
                                    num_classes=train_source.num_classes)
    report.update(linear_top1=fitted["top1"], linear_train_top1=fitted["train_top1"],
                  linear_l2=fitted["l2"])
  return report

# ---- The evaluator (dora_jax.evaluation.registry): `dora-eval knn`, config.evals.NAME. ----


def add_flags(parser: argparse.ArgumentParser, base) -> None:
  del base  # DINO's values, not the training config's.
  positive = registry.positive_int
  parser.add_argument("--train", required=True,
                      help="Image folder or tfds:NAME:SPLIT (memory bank).")
  parser.add_argument("--val", required=True,
                      help="Image folder or tfds:NAME:SPLIT (classified).")
  parser.add_argument("--tfds-data-dir", default="", help="data_dir of tfds sources.")
  parser.add_argument("--k", type=positive, default=DEFAULTS["k"], help="Neighbours that vote.")
  parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                      help="Vote temperature.")
  parser.add_argument("--batch-size", type=positive, default=DEFAULTS["batch_size"],
                      help="Images per step over all local devices.")
  parser.add_argument("--resize-size", type=positive, default=DEFAULTS["resize_size"],
                      help="Shorter side after the resize.")
  parser.add_argument("--crop-size", type=positive, default=DEFAULTS["crop_size"],
                      help="Centre crop side.")
  parser.add_argument("--linear-probe", action="store_true",
                      help="Also fit a linear probe (L-BFGS logistic regression) on the same "
                      "features: linear_top1 in the report.")


class Evaluator:
  """The k-NN of `DEFAULTS`' settings; see `registry` for the interface."""

  def __init__(self, values: Mapping[str, Any], *, name_of: Callable[[str], str],
               run: registry.Run | None = None):
    self.values = dict(values)
    for key in ("train", "val"):
      if not values[key]:
        raise registry.SettingError(f"{name_of(key)} is empty: the k-NN needs an image folder "
                                    "(ROOT/CLASS/IMAGE) or tfds:NAME:SPLIT.")
    registry.check_positive(values, ("k", "batch_size", "resize_size", "crop_size"), name_of)
    if not values["temperature"] > 0:
      raise registry.SettingError(f"{name_of('temperature')}={values['temperature']!r}: must be "
                                  "> 0.")
    self.train, self.val = (
        images_lib.open_source(values[key], tfds_data_dir=values["tfds_data_dir"] or None)
        for key in ("train", "val"))
    if self.train.num_classes != self.val.num_classes:
      raise images_lib.SourceError(
          f"{name_of('train')} {values['train']} has {self.train.num_classes} classes but "
          f"{name_of('val')} {values['val']} has {self.val.num_classes}.")
    # During pretraining: the (small) sets decoded and cropped once, kept in memory.
    self.preprocessed = None if run is None else tuple(
        features_lib.load_preprocessed(source, resize_size=values["resize_size"],
                                       crop_size=values["crop_size"])
        for source in (self.train, self.val))

  def check(self, size) -> None:
    del size  # Any ViT has a [CLS] token.

  def run(self, backbone, *, out_dir: str | None = None, progress: bool = False) -> dict:
    del out_dir  # The report is all.
    v = self.values
    if self.preprocessed is None:
      return evaluate_knn(backbone, self.train, self.val, k=v["k"],
                          temperature=v["temperature"], batch_size=v["batch_size"],
                          resize_size=v["resize_size"], crop_size=v["crop_size"],
                          progress=progress, linear_probe=v["linear_probe"])
    encoder = features_lib.Encoder(backbone, ("cls",))
    batch_size = encoder.padded_size(v["batch_size"])
    (train_features, train_labels), (val_features, val_labels) = [
        features_lib.embed_batches(
            encoder, features_lib.array_batches(images, labels, batch_size),
            total=len(labels), batch_size=batch_size, progress=False)
        for images, labels in self.preprocessed]
    return knn_report(train_features, train_labels, val_features, val_labels, self.train,
                      self.val, k=v["k"], temperature=v["temperature"],
                      linear_probe=v["linear_probe"])

  def summary(self, report: dict) -> str:
    probe = (f", linear probe top-1 {report['linear_top1']:.2f}%" if "linear_top1" in report
             else "")
    return (f"k-NN (k={report['k']}, T={report['temperature']}): top-1 {report['top1']:.2f}%, "
            f"top-5 {report['top5']:.2f}%{probe} ({report['num_train']} train, "
            f"{report['num_val']} val images, {report['num_classes']} classes)")
