"""A linear probe on frozen features: multinomial logistic regression, fitted to convergence.

Beside DINO's k-NN, the linear classifier is the other standard read-out of a frozen encoder. On a
small labelled set (the synthetic object views, a few thousand crops) the features fit in memory,
so the probe is fitted full-batch with L-BFGS on standardised features (mean and standard
deviation from the training set), with a fixed L2 penalty, as scikit-learn's
LogisticRegression(C=1/(n * l2)) would: one deterministic answer per feature set, no learning rate
or epoch count to tune per encoder.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_L2 = 1e-3  # Penalty on the weights (not the bias) per training example's mean loss.
DEFAULT_ITERATIONS = 300  # L-BFGS iterations (converged well before on sets of this size).


def _check(name: str, features: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(f"{name}: expected features (n, d) and labels (n,); got {features.shape} and "
                     f"{labels.shape}.")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} labels must be in [0, {num_classes}); got {labels.min()}.."
                     f"{labels.max()}.")


@functools.partial(jax.jit, static_argnames=("num_classes", "iterations"))
def fit_probe(features: jax.Array, labels: jax.Array, *, num_classes: int, l2: float,
         iterations: int) -> tuple[jax.Array, jax.Array]:
  """Weights (d, C) and bias (C,) minimising mean cross-entropy + l2/2 |W|^2 over (n, d) features."""
  one_hot = jax.nn.one_hot(labels, num_classes)

  def loss(params):
    weights, bias = params
    logits = jnp.dot(features, weights, precision=jax.lax.Precision.HIGHEST) + bias
    data = -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1))
    return data + 0.5 * l2 * jnp.sum(weights**2)

  params = (jnp.zeros((features.shape[1], num_classes), jnp.float32),
            jnp.zeros((num_classes,), jnp.float32))
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=iterations)
  return params


def linear_probe(train_features, train_labels, test_features, test_labels, *, num_classes: int,
                 l2: float = DEFAULT_L2, iterations: int = DEFAULT_ITERATIONS) -> dict[str, float]:
  """Fits the probe on the training features and scores it on the test features.

  Args:
    train_features: (n, d) float; train_labels: (n,) ints in [0, num_classes).
    test_features: (m, d) float; test_labels: (m,).
    num_classes: C.
    l2: the weights' L2 penalty (features standardised first, so one value suits any encoder).
    iterations: L-BFGS iterations.

  Returns:
    {'top1': percent of test examples classified correctly, 'train_top1': the same on the
     training set (how separable the classes are), 'l2', 'iterations'}.
  """
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  _check("train", train_features, train_labels, num_classes)
  _check("test", test_features, test_labels, num_classes)
  if train_features.shape[1] != test_features.shape[1]:
    raise ValueError(f"train features have {train_features.shape[1]} dimensions, test features "
                     f"{test_features.shape[1]}.")
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + 1e-6
  standardise = lambda x: (x - mean) / std
  weights, bias = fit_probe(jnp.asarray(standardise(train_features)), jnp.asarray(train_labels),
                       num_classes=num_classes, l2=l2, iterations=iterations)

  def accuracy(features, labels):
    logits = np.asarray(standardise(features) @ np.asarray(weights) + np.asarray(bias))
    return float(100.0 * np.mean(np.argmax(logits, axis=-1) == labels))

  return {"top1": accuracy(test_features, test_labels),
          "train_top1": accuracy(train_features, train_labels), "l2": float(l2),
          "iterations": int(iterations)}
