"""The linear probe: the optimum of its objective, checked in float64; separable data separated."""
import jax.numpy as jnp
import numpy as np

from dora_jax.evaluation import probe


def test_fit_reaches_the_optimum_of_the_regularised_objective():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((120, 5))
  labels = rng.integers(0, 3, 120)
  l2 = 0.05
  weights, bias = probe.fit_probe(jnp.asarray(features, jnp.float32), jnp.asarray(labels),
                                  num_classes=3, l2=l2, iterations=200)
  weights, bias = np.asarray(weights, np.float64), np.asarray(bias, np.float64)
  # Gradient of mean cross-entropy + l2/2 |W|^2 in float64 at the returned point: zero.
  logits = features @ weights + bias
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  error = (probs - np.eye(3)[labels]) / len(labels)
  np.testing.assert_allclose(features.T @ error + l2 * weights, 0, atol=2e-5)
  np.testing.assert_allclose(error.sum(0), 0, atol=2e-5)


def test_separable_classes_are_separated_and_noise_is_not():
  rng = np.random.default_rng(1)
  centres = 4 * rng.standard_normal((4, 16))
  def sample(n):
    labels = rng.integers(0, 4, n)
    return centres[labels] + rng.standard_normal((n, 16)), labels
  (train, train_labels), (test, test_labels) = sample(200), sample(100)
  result = probe.linear_probe(train, train_labels, test, test_labels, num_classes=4)
  assert result["top1"] >= 95 and result["train_top1"] >= 95
  noise = probe.linear_probe(rng.standard_normal((200, 16)), train_labels,
                             rng.standard_normal((400, 16)), rng.integers(0, 4, 400),
                             num_classes=4)
  assert noise["top1"] < 40  # Chance is 25 %.


def test_knn_report_carries_the_probe(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dora_jax.data import images as image_sources  # pylint: disable=g-import-not-at-top
  from dora_jax.evaluation import knn  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for split, count in (("train", 12), ("val", 6)):
    for label, colour in enumerate(((200, 30, 30), (30, 30, 200), (30, 200, 30))):
      folder = tmp_path / split / f"class{label}"
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (16, 16, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
  backbone = lambda images: {"cls": jnp.concatenate(  # A colour descriptor: separable.
      [images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=-1)}
  report = knn.evaluate_knn(backbone, image_sources.open_source(str(tmp_path / "train")),
                            image_sources.open_source(str(tmp_path / "val")), k=5,
                            resize_size=16, crop_size=16, progress=False, linear_probe=True)
  assert report["linear_top1"] == 100.0 and report["top1"] == 100.0
  assert "linear_top1" not in knn.evaluate_knn(
      backbone, image_sources.open_source(str(tmp_path / "train")),
      image_sources.open_source(str(tmp_path / "val")), k=5, resize_size=16, crop_size=16,
      progress=False)
