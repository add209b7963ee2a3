r"""Collapse indicators of encoders' features on one image folder: are the images told apart?

  python experiments/feature_stats.py --images OUT/data/views/val ENCODER [ENCODER ...]

For each encoder (a run folder or an exported one), on every image of the folder: the [CLS]
output and the mean patch token, each L2-normalised. Printed per encoder and feature:
  mean_cos        the mean cosine similarity of two different images (1: every image the same)
  effective_rank  exp(entropy of the normalised singular values) of the centred features, out of
                  the width (1: one direction carries everything)
  top_direction   the share of the centred features' variance along their first direction
A collapsed encoder maps every image to nearly one point (mean_cos near 1, a small effective
rank), whatever the k-NN or the probe then reads from it.
"""
import argparse
import json
import sys

import numpy as np

from dora_jax.data import images as images_lib
from dora_jax.evaluation import features as features_lib
from dora_jax.pretrained import load_backbone


def stats(features: np.ndarray) -> dict[str, float]:
  """The indicators of (n, d) features (n >= 2)."""
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  gram = unit @ unit.T
  n = len(unit)
  mean_cos = (gram.sum() - np.trace(gram)) / (n * (n - 1))
  centred = unit - unit.mean(axis=0)
  singular = np.linalg.svd(centred, compute_uv=False)
  share = singular / singular.sum()
  share = share[share > 0]
  variance = singular**2 / np.sum(singular**2)
  return {"mean_cos": float(mean_cos),
          "effective_rank": float(np.exp(-np.sum(share * np.log(share)))),
          "top_direction": float(variance[0])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("encoders", nargs="+")
  parser.add_argument("--images", required=True, help="An image folder (ROOT/CLASS/IMAGE).")
  parser.add_argument("--size", type=int, default=64, help="Resize and centre-crop side.")
  parser.add_argument("--json", help="Also write the numbers here.")
  args = parser.parse_args()
  source = images_lib.open_source(args.images)
  report = {}
  for path in args.encoders:
    encoder = features_lib.Encoder(load_backbone(path), ("cls", "tokens"))
    pixels = np.stack([images_lib.eval_view(source[i]["image"], resize_size=args.size,
                                            crop_size=args.size) for i in range(len(source))])
    cls, tokens = [], []
    for start in range(0, len(pixels), 128):
      out = encoder(pixels[start:start + 128])
      cls.append(np.asarray(out["cls"], np.float64))
      tokens.append(np.asarray(out["tokens"], np.float64).mean(axis=1))
    report[path] = {"cls": stats(np.concatenate(cls)),
                    "mean_token": stats(np.concatenate(tokens))}
    row = report[path]
    print(f"{path}: " + "; ".join(
        f"{feature} " + ", ".join(f"{k} {v:.3f}" for k, v in row[feature].items())
        for feature in row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
