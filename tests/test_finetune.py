"""Fine-tuning (configs/finetune_imagenet.py): §8 schedule, backbone restore,
frozen stages, progressive resizing with exact resume, main.py end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlimages_jax.checkpoints import store
from mlimages_jax.inputs import pipeline
from mlimages_jax.train import losses
from mlimages_jax.train import config_validation
from mlimages_jax.train import distributed
from mlimages_jax.train import finetune
from mlimages_jax.train import loop
from mlimages_jax.train import optimizer as optimizer_lib
from mlimages_jax.train import schedule as schedule_lib
from mlimages_jax.train import state as state_lib
from mlimages_jax.train import steps as steps_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import finetune_imagenet  # noqa: E402
from configs import pretrain  # noqa: E402

PRETRAIN_CLASSES = 12
SINGLE_CLASSES = 6  # synthetic.NUM_SINGLE_LABEL_CLASSES


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(jax.device_get(tree))


def test_full_recipe_schedule_and_resizing_scale_with_batch():
  config = finetune_imagenet.get_config()
  config.init_checkpoint = "/runs/r101"  # The recipe fine-tunes one.
  config_validation.validate_config(config)
  lr = schedule_lib.create_learning_rate_fn(config)
  steps = [0, 149_999, 150_000, 299_999, 300_000, 450_000, 599_999]
  np.testing.assert_allclose([float(lr(s)) for s in steps],
                             [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-4, 1e-4],
                             rtol=1e-6)
  assert schedule_lib.num_train_steps(config) == 600_000
  assert [schedule_lib.image_size_at(config, s) for s in (1, 300_000, 300_001)
         ] == [224, 224, 299]
  config.batch_size = 1024  # 4x: lr x4, every step count / 4.
  lr = schedule_lib.create_learning_rate_fn(config)
  np.testing.assert_allclose([float(lr(s)) for s in (37_499, 37_500)],
                             [0.4, 0.04], rtol=1e-6)
  assert schedule_lib.num_train_steps(config) == 150_000
  assert [schedule_lib.image_size_at(config, s) for s in (75_000, 75_001)
         ] == [224, 299]
  assert (config.optimizer.weight_decay, config.optimizer.weight_decay_bn,
          config.optimizer.momentum) == (1e-4, 1e-5, 0.9)


def _abstract(model, image_size: int):
  shape = (1, image_size, image_size, 3)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros(shape), train=False))


def _random_state(config, num_classes: int, seed: int) -> state_lib.TrainState:
  """A full train state of random NumPy values (no compilation needed)."""
  model = state_lib.create_model(config, num_classes)
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32),
      _abstract(model, config.image_size))
  tx = optimizer_lib.create_optimizer(
      config, schedule_lib.create_learning_rate_fn(config))
  return state_lib.TrainState(
      step=np.int32(3),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=jax.device_get(tx.init(variables["params"])),
      loss_state=jax.device_get(losses.init_loss_state(num_classes)),
      rng=np.zeros((2,), np.uint32))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[pathlib.Path, state_lib.TrainState]:
  """A tiny pre-training checkpoint (12 multi-label classes) whose BN
  statistics are not the init values, written by the real checkpointer."""
  workdir = tmp_path_factory.mktemp("pretrain")
  state = _random_state(pretrain.get_config("smoke"), PRETRAIN_CLASSES, 7)
  metadata = store.make_metadata(
      depth=14, num_classes=PRETRAIN_CLASSES, width_multiplier=0.125,
      image_size=32, label_mode="multi",
      class_ids=[f"c{i}" for i in range(PRETRAIN_CLASSES)],
      class_names=[f"n{i}" for i in range(PRETRAIN_CLASSES)])
  checkpointer = store.TrainCheckpointer(workdir, async_save=False)
  checkpointer.save(3, state, metadata, None)
  checkpointer.close()
  return workdir, jax.device_get(state)


def test_head_is_reinitialised_and_the_rest_restored_exactly(pretrained):
  workdir, saved = pretrained
  config = finetune_imagenet.get_config("smoke")
  model = state_lib.create_model(config, SINGLE_CLASSES)
  fresh = _random_state(config, SINGLE_CLASSES, 1)
  backbone = finetune.load_backbone(str(workdir), config,
                                    _abstract(model, config.image_size))
  state = finetune.with_backbone(fresh, *backbone)
  for collection in ("params", "batch_stats"):
    got = _flat(getattr(state, collection))
    want = _flat(getattr(saved, collection))
    init = _flat(getattr(fresh, collection))
    assert set(got) == set(init)
    for path, value in got.items():
      if path[0] == finetune.HEAD:
        np.testing.assert_array_equal(value, init[path])
      else:
        np.testing.assert_array_equal(value, want[path])
  assert state.params["logits"]["kernel"].shape[-1] == SINGLE_CLASSES
  assert saved.params["logits"]["kernel"].shape[-1] == PRETRAIN_CLASSES


def test_missing_checkpoint_names_the_command_to_make_it(tmp_path):
  config = finetune_imagenet.get_config("smoke")
  model = state_lib.create_model(config, SINGLE_CLASSES)
  with pytest.raises(store.CheckpointError,
                     match=r"python main.py --config=configs/pretrain.py:demo"
                     r" --workdir=.*nowhere"):
    finetune.load_backbone(str(tmp_path / "nowhere"), config,
                           _abstract(model, config.image_size))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """ml_images/synthetic, built once for this module."""
  path = tmp_path_factory.mktemp("tfds")
  pipeline.load_builder("ml_images/synthetic", str(path),
                              build_if_missing=True)
  return path


def _smoke(data_dir: pathlib.Path, **overrides):
  config = finetune_imagenet.get_config("smoke")
  config.data_dir = str(data_dir)
  config.async_checkpoints = False
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize("change, message", [
    ({"width_multiplier": 0.25}, r"model.width_multiplier: checkpoint 0.125, "
                                 r"config 0.25"),
    ({"depth": 26}, r"model.depth: checkpoint 14, config 26"),
])
def test_mismatched_backbone_fails_before_compiling(
    pretrained, data_dir, tmp_path, change, message):
  config = _smoke(data_dir, init_checkpoint=str(pretrained[0]))
  config.model.update(change)
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(store.CheckpointError,
                       match=r"backbone does not match the config: " + message):
      loop.train_and_evaluate(config, tmp_path / "work")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles


def test_shape_mismatch_in_a_converted_checkpoint_is_listed(tmp_path):
  """Metadata can claim the right backbone; every shape is still checked."""
  config = finetune_imagenet.get_config("smoke")
  wide = finetune_imagenet.get_config("smoke")
  wide.model.width_multiplier = 0.25
  state = _random_state(wide, SINGLE_CLASSES, 0)
  metadata = store.make_metadata(
      depth=14, num_classes=SINGLE_CLASSES, width_multiplier=0.125,
      image_size=32, label_mode="single",
      class_ids=list("abcdef"), class_names=list("abcdef"))
  path = store.save_inference_checkpoint(
      tmp_path / "converted",
      {"params": state.params, "batch_stats": state.batch_stats}, metadata)
  model = state_lib.create_model(config, SINGLE_CLASSES)
  with pytest.raises(store.CheckpointError,
                     match=r"params/init_conv/kernel: checkpoint \(7, 7, 3, "
                     r"16\), model \(7, 7, 3, 8\)"):
    finetune.load_backbone(str(path), config, _abstract(model,
                                                        config.image_size))


@pytest.mark.slow
@pytest.mark.parametrize("frozen_batch_stats", ["update", "keep"])
def test_frozen_stages_stay_bit_identical_while_the_rest_moves(
    frozen_batch_stats):
  """Frozen parameters never move. The frozen BN layers' moving statistics
  follow the batches like every other BN layer's ("update", the original's
  FixBlock2, the recipe's default) or stay as loaded ("keep")."""
  assert jax.local_device_count() == 8
  config = finetune_imagenet.get_config("smoke")
  assert config.freeze_blocks == 2  # finetune.sh's --FixBlock2=True.
  config.frozen_blocks_batch_stats = frozen_batch_stats
  model = state_lib.create_model(config, SINGLE_CLASSES)
  tx = optimizer_lib.create_optimizer(
      config, schedule_lib.create_learning_rate_fn(config))
  state = state_lib.create_train_state(jax.random.PRNGKey(0), model,
                                       config.image_size, tx)
  step = steps_lib.pmap_train_step(
      model, tx, config, optimizer_lib.batch_norm_modules(state.batch_stats))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 2, 32, 32, 3), dtype=np.uint8),
           "labels": rng.integers(0, SINGLE_CLASSES, (8, 2)).astype(np.int32),
           "mask": np.ones((8, 2), np.float32)}
  before = jax.device_get(state)
  replicated = distributed.replicate(state)
  for _ in range(3):
    replicated, metrics = step(replicated, batch)
  assert distributed.unreplicate(metrics)["finite"] == 1.0
  after = distributed.unreplicate(replicated)
  frozen_tops = {"init_conv"} | {k for k in before.params
                                 if k.startswith(("stages_0_", "stages_1_"))}
  assert len(frozen_tops) == 3  # Smoke ResNet-14: one block per stage.
  for collection in ("params", "batch_stats"):
    old, new = _flat(getattr(before, collection)), _flat(
        getattr(after, collection))
    moved = {path[0] for path in old
             if not np.array_equal(old[path], new[path])}
    frozen_moves = (collection == "batch_stats"
                    and frozen_batch_stats == "update")
    for path in old:
      if path[0] in frozen_tops and not frozen_moves:
        assert new[path].tobytes() == old[path].tobytes(), path
    # Every trainable module changed (params; BN statistics where present),
    # and the frozen BN layers' statistics too under "update" (the stem has
    # none: its conv is followed by the first block's pre-activation BN).
    expect = {p[0] for p in old} - (set() if frozen_moves else frozen_tops)
    assert moved == expect, collection
    if frozen_moves:
      assert {p[0] for p in old} & frozen_tops == frozen_tops - {"init_conv"}


def _main(workdir: pathlib.Path, data_dir: pathlib.Path, init: pathlib.Path,
          steps: int) -> subprocess.CompletedProcess:
  """The smoke fine-tune (FixBlock2) through main.py on 2 CPU devices; the
  compilation cache (conftest's) lets restarts reuse the executables."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, str(REPO / "main.py"),
       f"--config={REPO / 'configs' / 'finetune_imagenet.py'}:smoke",
       f"--workdir={workdir}", f"--config.data_dir={data_dir}",
       f"--config.init_checkpoint={init}", "--config.freeze_blocks=2",
       f"--config.num_train_steps={steps}"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _lines(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_main_fine_tunes_switches_size_and_resumes_exactly(
    pretrained, data_dir, tmp_path):
  """Steps 1-4 at 32 px, 5-6 at 40 px. A run stopped at 4 (the switch) and
  at 5 (after it) and restarted ends bit-identical to an uninterrupted run:
  each restart rebuilt the iterator at the right size and data position."""
  init, saved = pretrained
  full = _main(tmp_path / "full", data_dir, init, 6)
  assert "Initialised all but the 'logits' head" in full.stderr
  assert "step 5: training images now 40 px." in full.stderr
  final = _lines(tmp_path / "full")[-1]
  assert (final["step"], final["split"], final["image_size"]) == (
      6, "validation", 40)
  assert 0 <= final["top1"] <= final["top5"] <= 1
  variables, metadata = store.load_for_inference(tmp_path / "full")
  assert metadata["label_mode"] == "single" and metadata["step"] == 6
  assert metadata["model"]["num_classes"] == SINGLE_CLASSES
  assert metadata["image_size"] == 40
  # FixBlock2: the stem is still the pre-trained one.
  np.testing.assert_array_equal(variables["params"]["init_conv"]["kernel"],
                                saved.params["init_conv"]["kernel"])

  for steps in (4, 5, 6):
    resumed = _main(tmp_path / "resumed", data_dir, init, steps)
  assert "training images now" not in resumed.stderr  # Started at 40 px.
  restored, _ = store.load_for_inference(tmp_path / "resumed")
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  evals = [l for l in _lines(tmp_path / "resumed") if "split" in l]
  assert [(l["step"], l["image_size"]) for l in evals] == [
      (4, 32), (5, 40), (6, 40)]
