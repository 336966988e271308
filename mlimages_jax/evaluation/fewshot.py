"""Few-shot linear probes of a backbone's frozen features (transfer ability).

The method of big_vision's few-shot evaluator: for k examples per class of
a classification dataset's train split, fit a ridge regression from the
pooled features to ±1 one-hot targets in closed form, and report the
accuracy of its argmax on the test split. Features are standardised with
the statistics of the k-shot training set, and a constant column (100)
stands in for an almost unregularised bias. Means over `seeds` (which
examples are the k shots).

Bounded cost, whatever the dataset:

- Train split: every process reads its shard in order and keeps at most
  `pool_per_class` examples per class; reading stops once every process's
  pool is full (or its shard ends). The shots of every seed are drawn from
  the gathered pool. Pools are concatenated in process order and each
  class truncated to `pool_per_class`; process shards are contiguous
  ranges of the split, so as long as process 0's shard fills its pool the
  pool is the first `pool_per_class` examples of each class, whatever the
  number of processes.
- Test split: its first `num_test_examples` (-1: all), read like the
  evaluator reads a split (each process its shard, padded, masked).
- Memory: (pool_per_class x classes + test examples) x feature width x 4
  bytes per dataset, one dataset at a time; the regression (float64, on
  the host) solves a min(n, d+1)-sized system per (seed, shots).

Multi-host: the forward pass is the caller's pmapped feature function, so
every process runs the same number of batches (a collective decides when
the pools are full); the features of all processes are gathered before the
regression, so every process computes the same accuracies.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from mlimages_jax.inputs import pipeline

BIAS_CONSTANT = 100.0
STD_EPSILON = 1e-5  # Constant (e.g. dead ReLU) features must not divide by 0.

# uint8 images [devices, per_device, H, W, 3] -> features [devices,
# per_device, F] (pmapped over the local devices: every process calls it).
FeatureFn = Callable[[np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """A TFDS classification dataset (`label` feature) and its two splits."""
  dataset: str
  train_split: str = "train"
  test_split: str = "test"

  @property
  def name(self) -> str:
    """Metric-name friendly: cifar100, oxford_iiit_pet, ml_images_synthetic."""
    return self.dataset.split(":")[0].replace("/", "_")


def ridge_weights(x: np.ndarray, targets: np.ndarray, l2_reg: float
                  ) -> np.ndarray:
  """argmin_W |xW - targets|^2 + l2_reg |W|^2, in closed form (float64).

  Solves the smaller of the primal (d x d) and dual (n x n) systems.
  """
  x = np.asarray(x, np.float64)
  n, d = x.shape
  if n >= d:
    return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
  return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)


def _design(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  x = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray,
                   x_test: np.ndarray, y_test: np.ndarray, num_classes: int,
                   l2_reg: float) -> float:
  """Test accuracy of the ridge probe fitted on (x_train, y_train)."""
  mean = x_train.mean(axis=0)
  std = x_train.std(axis=0) + STD_EPSILON
  targets = 2.0 * np.eye(num_classes)[y_train] - 1.0
  w = ridge_weights(_design(x_train, mean, std), targets, l2_reg)
  # _design(x_test) @ w without building the standardised test matrix.
  scale = w[:-1] / std[:, None]
  scores = (np.asarray(x_test, np.float64) @ scale
            + (BIAS_CONSTANT * w[-1] - mean @ scale))
  return float(np.mean(np.argmax(scores, axis=1) == y_test))


def sample_shots(labels: np.ndarray, shots: int, seed: int,
                 num_classes: int) -> np.ndarray:
  """Indices of `shots` examples of each class (all of a smaller class)."""
  rng = np.random.default_rng(seed)
  return np.concatenate([
      rng.permutation(np.flatnonzero(labels == c))[:shots]
      for c in range(num_classes)])


def _all_processes(value: bool) -> bool:
  if jax.process_count() == 1:
    return value
  return bool(multihost_utils.process_allgather(np.int32(value)).all())


def _gather(features: np.ndarray, labels: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  """Rows of every process, in process order (shapes may differ)."""
  if jax.process_count() == 1:
    return features, labels
  counts = multihost_utils.process_allgather(np.int64(len(labels)))
  rows = int(counts.max())
  padded_x = np.zeros((rows, features.shape[1]), np.float32)
  padded_y = np.zeros((rows,), np.int32)
  padded_x[:len(labels)], padded_y[:len(labels)] = features, labels
  all_x, all_y = multihost_utils.process_allgather((padded_x, padded_y))
  return (np.concatenate([x[:n] for x, n in zip(all_x, counts)]),
          np.concatenate([y[:n] for y, n in zip(all_y, counts)]))


def _truncate_classes(labels: np.ndarray, limit: int) -> np.ndarray:
  """Mask keeping the first `limit` rows of each class."""
  keep = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    keep[np.flatnonzero(labels == c)[:limit]] = True
  return keep


class FewshotEvaluator:
  """Few-shot probe accuracies of a feature function on several datasets.

  Results are ``{f"{task.name}_{k}shot": mean accuracy over seeds}``.
  """

  def __init__(self, tasks: Sequence[Task], *, shots: Sequence[int] = (1, 5,
               10, 25), seeds: Sequence[int] = (0, 1, 2),
               l2_reg: float = 1024.0, batch_size: int = 256,
               pool_per_class: int = 50, num_test_examples: int = 10_000,
               data_dir: str | None = None, progress: bool = False):
    if not tasks:
      raise ValueError("no few-shot datasets given")
    if not shots or min(shots) < 1 or max(shots) > pool_per_class:
      raise ValueError(f"shots {tuple(shots)} must be in 1..pool_per_class "
                       f"({pool_per_class})")
    if not seeds:
      raise ValueError("no few-shot seeds given")
    if batch_size % jax.device_count():
      raise ValueError(f"few-shot batch size {batch_size} is not divisible "
                       f"by the {jax.device_count()} devices")
    self.tasks = tuple(tasks)
    self.shots = tuple(int(k) for k in shots)
    self.seeds = tuple(int(s) for s in seeds)
    self.l2_reg = float(l2_reg)
    self.batch_size = batch_size
    self.pool_per_class = pool_per_class
    self.num_test_examples = num_test_examples
    self.data_dir = data_dir
    self.progress = progress

  def _features(self, features_fn: FeatureFn, task: Task, split: str,
                image_size: int, pool: bool
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, num_classes) of a split, gathered from every process.

    With `pool`, each process keeps `pool_per_class` rows per class and the
    pass stops once every process's pool is full.
    """
    iterator = pipeline.create_input_iterator(
        dataset=task.dataset, data_dir=self.data_dir, split=split,
        global_batch_size=self.batch_size, image_size=image_size,
        mode="eval", label_mode="single", seed=0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count())
    num_classes = iterator.num_classes
    num_batches = iterator.num_batches
    if not pool and self.num_test_examples > 0:
      num_batches = min(num_batches, math.ceil(self.num_test_examples
                                               / self.batch_size))
    counts = np.zeros(num_classes, np.int64)
    features, labels = [], []
    bar = tqdm(total=num_batches, unit="batch", disable=not self.progress,
               desc=f"{task.name} {split}")
    for _ in range(num_batches):
      batch = next(iterator)
      out = np.asarray(features_fn(batch["image"]))
      x = out.reshape(-1, out.shape[-1])
      y = batch["labels"].reshape(-1).astype(np.int32)
      keep = batch["mask"].reshape(-1) > 0
      if pool:
        for i in np.flatnonzero(keep):
          keep[i] = counts[y[i]] < self.pool_per_class
          counts[y[i]] += keep[i]
      features.append(x[keep].astype(np.float32))
      labels.append(y[keep])
      bar.update()
      if pool and _all_processes(bool((counts >= self.pool_per_class).all())):
        break
    bar.close()
    x, y = _gather(np.concatenate(features), np.concatenate(labels))
    if pool:
      keep = _truncate_classes(y, self.pool_per_class)
      x, y = x[keep], y[keep]
    return x, y, num_classes

  def run(self, features_fn: FeatureFn, image_size: int
          ) -> dict[str, float]:
    """Accuracies of every (dataset, shots), means over the seeds.

    Every process must call this (the forward pass and the gathers are
    collective); all get the same results.
    """
    results = {}
    for task in self.tasks:
      x_pool, y_pool, num_classes = self._features(
          features_fn, task, task.train_split, image_size, pool=True)
      x_test, y_test, _ = self._features(
          features_fn, task, task.test_split, image_size, pool=False)
      for k in self.shots:
        accuracies = []
        for seed in self.seeds:
          chosen = sample_shots(y_pool, k, seed, num_classes)
          accuracies.append(probe_accuracy(
              x_pool[chosen], y_pool[chosen], x_test, y_test, num_classes,
              self.l2_reg))
        results[f"{task.name}_{k}shot"] = float(np.mean(accuracies))
    return results


def evaluate_checkpoint(model: Any, evaluator: FewshotEvaluator,
                        image_size: int | None = None) -> dict[str, Any]:
  """Probes of a `predict.LoadedModel`, with the time they took."""
  start = time.perf_counter()
  size = image_size or model.image_size
  results = evaluator.run(lambda images: model.forward_sharded(images)[1],
                          size)
  return {"step": model.metadata["step"], "image_size": size,
          "accuracy": results,
          "seconds": round(time.perf_counter() - start, 3)}


def tasks_from_config(datasets: Sequence[Sequence[str]]) -> list[Task]:
  """(tfds name, train split, test split) triples -> tasks."""
  tasks = []
  for entry in datasets:
    if isinstance(entry, str) or len(entry) != 3:
      raise ValueError(f"few-shot dataset {entry!r} must be (tfds name, "
                       "train split, test split)")
    tasks.append(Task(*map(str, entry)))
  return tasks


def from_config(fewshot: Mapping[str, Any], data_dir: str | None
                ) -> FewshotEvaluator:
  """The evaluator of a training config's `fewshot` group."""
  return FewshotEvaluator(
      tasks_from_config(fewshot["datasets"]), shots=fewshot["shots"],
      seeds=fewshot["seeds"], l2_reg=fewshot["l2_reg"],
      batch_size=fewshot["batch_size"],
      pool_per_class=fewshot["pool_per_class"],
      num_test_examples=fewshot["num_test_examples"],
      data_dir=fewshot["data_dir"] or data_dir)
