"""DINO's weighted k-NN: against a NumPy float64 brute force, and hand-computed cases."""
import numpy as np
import pytest

from dora_jax.evaluation import knn


def brute_force_votes(train, train_labels, test, k, temperature, num_classes):
  """float64, one test feature at a time: full sort of the cosine similarities."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  votes = np.zeros((len(test), num_classes))
  for i, query in enumerate(test):
    similarity = train @ query
    nearest = np.argsort(-similarity)[:k]
    for j in nearest:
      votes[i, train_labels[j]] += np.exp(similarity[j] / temperature)
  return votes


def accuracy(votes, labels, top):
  ranked = np.argsort(-votes, axis=1, kind="stable")
  return (100 * np.mean(ranked[:, 0] == labels),
          100 * np.mean((ranked[:, :top] == labels[:, None]).any(axis=1)))


@pytest.mark.parametrize("k", [7, 500])  # 500 > M: every training feature votes.
def test_votes_and_accuracy_match_brute_force(k):
  rng = np.random.default_rng(0)
  num_classes, dim = 6, 8
  train = rng.normal(size=(203, dim)).astype(np.float32)
  train_labels = rng.integers(0, num_classes, size=203)
  test = rng.normal(size=(37, dim)).astype(np.float32)
  test_labels = rng.integers(0, num_classes, size=37)
  # Chunks of 64 (the last one padded) and test batches of 16 (the last one padded).
  kwargs = dict(k=k, temperature=0.07, num_classes=num_classes, batch_size=16, chunk_size=64)
  votes = knn.knn_votes(train, train_labels, test, **kwargs)
  expected = brute_force_votes(train.astype(np.float64), train_labels, test.astype(np.float64),
                               k, 0.07, num_classes)
  np.testing.assert_allclose(votes, expected, rtol=2e-4)
  top1, top5 = knn.knn_classifier(train, train_labels, test, test_labels, **kwargs)
  assert (top1, top5) == pytest.approx(accuracy(expected, test_labels, min(5, k)))
  assert 0 < top1 < top5 < 100


def test_separable_clusters_are_classified_perfectly():
  rng = np.random.default_rng(1)
  centres = 10 * np.eye(4, 16)
  train_labels = np.repeat(np.arange(4), 25)
  test_labels = np.tile(np.arange(4), 10)
  train = centres[train_labels] + rng.normal(size=(100, 16))
  test = centres[test_labels] + rng.normal(size=(40, 16))
  assert knn.knn_classifier(train, train_labels, test, test_labels, num_classes=4,
                            batch_size=8, chunk_size=32) == (100.0, 100.0)
  # Test labels that disagree with the clusters: every prediction is wrong.
  top1, _ = knn.knn_classifier(train, train_labels, test, (test_labels + 1) % 4, num_classes=4)
  assert top1 == 0.0


def test_the_temperature_weights_the_votes():
  """Two class-0 neighbours at cosine 0.8, one class-1 neighbour at cosine 1 (k = 3).

  T = 0.1: class 1 gets exp(10) = 22026 > class 0's 2 exp(8) = 5962. T = 1: exp(1) = 2.72 <
  2 exp(0.8) = 4.45, the majority wins."""
  train = np.array([[0.8, 0.6], [0.8, -0.6], [1.0, 0.0], [-1.0, 0.0]])
  train_labels = np.array([0, 0, 1, 2])
  test = np.array([[2.0, 0.0]])  # Unnormalised on purpose.
  votes = knn.knn_votes(train, train_labels, test, k=3, temperature=0.1, num_classes=3)
  np.testing.assert_allclose(votes, [[2 * np.exp(8.0), np.exp(10.0), 0.0]], rtol=1e-5)
  for temperature, winner in ((0.1, 1), (1.0, 0)):
    top1, top5 = knn.knn_classifier(train, train_labels, test, [winner], k=3,
                                    temperature=temperature, num_classes=3)
    assert (top1, top5) == (100.0, 100.0)


def test_bad_labels_are_refused():
  features = np.ones((3, 2))
  with pytest.raises(ValueError, match=r"train_labels must lie in \[0, num_classes=2\)"):
    knn.knn_classifier(features, [0, 1, 2], features, [0, 0, 0], num_classes=2)
  with pytest.raises(ValueError, match="test_features must be"):
    knn.knn_votes(features, [0, 1, 1], np.ones((2, 5)), num_classes=2)
