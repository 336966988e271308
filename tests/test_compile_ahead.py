"""Tests for train/compile_ahead.py: the smoke model compiled for a v5e:2x2
slice by libtpu, on the CPU, and the largest-batch search."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import pytest

from configs import pretrain
from mlimages_jax.train import compile_ahead

NUM_CLASSES = 45  # ml_images/synthetic, the smoke config's dataset.

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (the test extra pins it): it is what "
           "compiles for TPU topologies")


def _program(batch: int, hbm: int) -> compile_ahead.Program:
  return compile_ahead.Program(
      name="train", batch=batch, argument_bytes=hbm, output_bytes=0,
      alias_bytes=0, temp_bytes=0, code_bytes=0, flops=batch * 1e9,
      bytes_accessed=batch * 1e6, optimal_seconds=None)


def _search(memory, capacity: int, tries: int = 3):
  """`largest_batch` over a memory model; returns (batch, compiles)."""
  def compile_at(batch):
    if memory(batch) > 2 * capacity:  # XLA refuses what is far too big.
      raise compile_ahead.DoesNotFitError(str(batch))
    return _program(batch, memory(batch))
  program, compiles = compile_ahead.largest_batch(
      compile_at, capacity, [compile_at(8), compile_at(16)], tries=tries)
  return program.batch, compiles


def test_largest_batch_is_the_linear_prediction_in_one_compile():
  batch, compiles = _search(lambda b: 1000 + 100 * b, capacity=1000 + 100 *
                            203)
  assert batch == 200  # 203 rounded down to a multiple of 8.
  assert compiles == [(200, 1000 + 100 * 200)]


def test_largest_batch_steps_down_when_memory_grows_faster_than_linear():
  def memory(b):
    return 1000 + 100 * b + b * b
  capacity = 100_000
  batch, compiles = _search(memory, capacity)
  assert memory(batch) <= capacity
  assert [b for b, m in compiles if m is None or m > capacity]  # Stepped.
  # Never above a batch that did not fit, and the best of what fitted.
  assert batch == max(b for b, m in compiles if m is not None and
                      m <= capacity)


def test_largest_batch_is_monotone_in_capacity():
  def memory(b):
    return 5000 + 64 * b + b * b // 4
  batches = [_search(memory, capacity)[0]
             for capacity in (20_000, 40_000, 80_000, 160_000)]
  assert batches == sorted(batches) and batches[0] < batches[-1]
  for capacity, batch in zip((20_000, 40_000, 80_000, 160_000), batches):
    assert memory(batch) <= capacity


def test_roofline_is_the_lower_of_compute_and_bandwidth_bounds():
  chip = compile_ahead.CHIPS["TPU v5 lite"]
  program = dataclasses.replace(_program(10, 0), flops=10 * 40e9,
                                bytes_accessed=10 * 100e6)
  assert program.roofline(chip) == pytest.approx(min(197e12 / 40e9,
                                                     819e9 / 100e6))


@needs_libtpu
def test_topologies_of_each_generation_have_their_chip():
  # v4 and v5p: one device per chip (megacore), as on real slices.
  for topology, name in (("v4:2x2x1", "v4"), ("v5e:2x2", "v5e"),
                         ("v5p:2x2x1", "v5p"), ("v6e:2x2", "v6e")):
    devices = compile_ahead.topology_devices(topology)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    assert compile_ahead.chip_of(devices).name == name
  with pytest.raises(ValueError, match="v5e:3x3"):
    compile_ahead.topology_devices("v5e:3x3")


def test_report_prints_xla_estimate_only_where_valid():
  chip = compile_ahead.CHIPS["TPU v5 lite"]
  valid = dataclasses.replace(_program(16, 3 * 2**30), optimal_seconds=0.01)
  report = compile_ahead.Report(
      topology="v5e:2x2", chips=4, chip=chip, requested_batch=16,
      train=valid,
      eval=dataclasses.replace(valid, name="eval"), largest_batch=32,
      largest=_program(32, 6 * 2**30),
      compiles=((16, 3 * 2**30), (32, 6 * 2**30), (64, None)))
  text = report.format()
  assert "HBM 3.00 of 16 GiB" in text
  assert "1.00 GFLOP and 1.0 MB of HBM traffic per image" in text
  assert "XLA's estimate 1,600 img/s" in text  # 16 images in 0.01 s.
  assert "XLA's estimate n/a" in text  # `largest`: no valid estimate.
  assert "largest train batch per chip that fits: 32 (compiled 16: 3.00 " \
         "GiB, 32: 6.00 GiB, 64: does not fit)" in text
  refused = dataclasses.replace(report, requested_batch=64, train=None)
  assert ("train step, 64 images per chip: does not fit (XLA refused it"
          in refused.format())


def _compiler(memory, capacity: int):
  """A `compile_at` over a memory model, refusing what is far too big, and
  the batches it was asked for."""
  asked = []

  def compile_at(batch):
    asked.append(batch)
    if memory(batch) > 2 * capacity:
      raise compile_ahead.DoesNotFitError(str(batch))
    return _program(batch, memory(batch))
  return compile_at, asked


def test_search_starts_from_the_batch_and_its_half_when_it_fits():
  compile_at, asked = _compiler(lambda b: 1000 + 100 * b, 100_000)
  requested, fitting, compiles = compile_ahead.starting_points(
      compile_at, 100_000, 64)
  assert asked == [64, 32] and requested.batch == 64
  assert [p.batch for p in fitting] == [64, 32]
  assert compiles == [(64, 7400), (32, 4200)]


@pytest.mark.parametrize("requested_batch", [1536, 768])  # Refused; over.
def test_search_halves_a_batch_too_big_and_never_tries_above_it(
    requested_batch):
  def memory(b):  # Faster than linear: the line through 192 and 384
    return 1000 + 100 * b + b * b // 10  # predicts 800, above 768.
  capacity = 120_000  # 700 per chip fits, 768 does not.
  compile_at, _ = _compiler(memory, capacity)
  requested, fitting, start = compile_ahead.starting_points(
      compile_at, capacity, requested_batch)
  assert requested is None or requested.hbm_bytes > capacity
  assert [p.batch for p in fitting] == [384, 192]
  too_big = min((b, m) for b, m in start if m is None or m > capacity)
  assert too_big == (768, memory(768))
  largest, searched = compile_ahead.largest_batch(compile_at, capacity,
                                                  fitting, too_big=too_big)
  assert 680 <= largest.batch < 768 and memory(largest.batch) <= capacity
  assert all(b < 768 for b, _ in searched)  # Never at or above it again.


def test_search_when_only_one_image_per_chip_fits():
  compile_at, _ = _compiler(lambda b: 900 * b, 1000)
  requested, fitting, start = compile_ahead.starting_points(
      compile_at, 1000, 8)
  assert [p.batch for p in fitting] == [1] and requested is None
  assert compile_ahead.largest_batch(compile_at, 1000, fitting)[0].batch == 1
  with pytest.raises(compile_ahead.DoesNotFitError, match="not even one"):
    compile_ahead.starting_points(*_compiler(lambda b: 1500 * b, 1000)[:1],
                                  1000, 8)


@needs_libtpu
@pytest.mark.slow
def test_smoke_steps_compile_for_v5e_with_consistent_figures():
  config = pretrain.get_config("smoke")
  compiler = compile_ahead.StepCompiler(
      config, NUM_CLASSES, compile_ahead.topology_devices("v5e:2x2"))
  chip = compile_ahead.CHIPS["TPU v5 lite"]
  train = compiler.train(128)
  state_bytes = sum(x.size * x.dtype.itemsize // 4
                    for x in jax.tree.leaves(compiler.state))
  # The state (params, BN statistics, momentum) is an argument, donated.
  assert train.argument_bytes >= state_bytes
  assert train.alias_bytes >= 0.9 * state_bytes
  assert 0 < train.hbm_bytes < chip.hbm_bytes
  # The same step compiled for this CPU counts about the same FLOPs per
  # image (not per global batch: 4 chips).
  cpu = compile_ahead.StepCompiler(config, NUM_CLASSES,
                                jax.local_devices()[:1]).train(128)
  assert train.flops_per_image == pytest.approx(cpu.flops_per_image,
                                                rel=0.5)
  evaluation = compiler.eval(128)
  assert 0 < evaluation.hbm_bytes < train.hbm_bytes
  # Forward only: about a third of a training step's FLOPs.
  assert 0.15 < evaluation.flops_per_image / train.flops_per_image < 0.6
