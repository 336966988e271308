"""Tests for mlimages_jax.checkpoints.convert_tf and ``mlimages convert-tf-checkpoint``.

The reference is a TensorFlow 1 graph of the §6 network written here, with the
original's variable scopes (``tf.layers`` inside ``tf.variable_scope`` gives
``<scope>/conv2d/kernel`` and ``<scope>/batch_normalization/...``), saved as a
real TF checkpoint with random weights and random BN statistics.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import pytest
import tensorflow as tf

from mlimages_jax.checkpoints import store
from mlimages_jax import cli
from mlimages_jax.checkpoints import convert_tf
from mlimages_jax.models import resnet

tf1 = tf.compat.v1
STAGE_SIZES = (1, 1, 1, 1)  # ResNet-14.
WIDTH = 0.125  # Stem 8 channels, stages 32/64/128/256.
NUM_CLASSES = 5
IMAGE_SIZE = 224


class TFReferenceResNet:
  """§6 in TF1 ops: pre-padding + VALID for strided convs, fused BN."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng

  def _variable(self, name, shape, value):
    return tf1.get_variable(name, shape, tf.float32,
                            initializer=tf1.constant_initializer(value))

  def conv(self, scope, x, kernel_size, filters, strides):
    if strides > 1:
      before = (kernel_size - 1) // 2
      after = kernel_size - 1 - before
      x = tf.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])
    fan_in = kernel_size * kernel_size * int(x.shape[-1])
    shape = [kernel_size, kernel_size, int(x.shape[-1]), filters]
    with tf1.variable_scope(scope):
      kernel = self._variable(
          "conv2d/kernel", shape,
          self.rng.normal(0, np.sqrt(1.0 / fan_in), shape))
    return tf.nn.conv2d(x, kernel, strides,
                        "SAME" if strides == 1 else "VALID")

  def bn_relu(self, scope, x):
    c = int(x.shape[-1])
    with tf1.variable_scope(scope):
      with tf1.variable_scope("batch_normalization"):
        gamma = self._variable("gamma", [c], self.rng.uniform(0.5, 1.5, c))
        beta = self._variable("beta", [c], self.rng.normal(0, 0.2, c))
        mean = self._variable("moving_mean", [c], self.rng.normal(0, 0.3, c))
        var = self._variable("moving_variance", [c],
                             self.rng.uniform(0.5, 2.0, c))
    y, _, _ = tf1.nn.fused_batch_norm(x, gamma, beta, mean, var,
                                      epsilon=1e-5, is_training=False)
    return tf.nn.relu(y)

  def __call__(self, images, num_classes):
    with tf1.variable_scope("init"):
      x = self.conv("init_conv", images, 7, 8, 2)
    for i, blocks in enumerate(STAGE_SIZES):
      out = int(256 * 2 ** i * WIDTH)
      for j in range(blocks):
        strides = 2 if j == 0 else 1
        with tf1.variable_scope(f"stages_{i}_block_{j}"):
          shortcut = x
          if j == 0:
            shortcut = self.conv("conv1_b1", self.bn_relu("conv1_b1_bn", x),
                                 1, out, strides)
          y = self.conv("conv1_b2", self.bn_relu("conv1_b2_bn", x), 1,
                        out // 4, 1)
          y = self.conv("conv2_b2", self.bn_relu("conv2_b2_bn", y), 3,
                        out // 4, strides)
          y = self.conv("conv3_b2", self.bn_relu("conv3_b2_bn", y), 1, out, 1)
          x = y + shortcut
    with tf1.variable_scope("global_pool"):
      x = self.bn_relu("bn", x)
      features = tf.reduce_mean(x, [1, 2])
    with tf1.variable_scope("logits/dense"):
      c = int(features.shape[-1])
      kernel = self._variable("kernel", [c, num_classes],
                              self.rng.normal(0, 0.2, (c, num_classes)))
      bias = self._variable("bias", [num_classes],
                            self.rng.normal(0, 0.5, num_classes))
    return tf.matmul(features, kernel) + bias, features


def _load_photos(shared_dir: pathlib.Path) -> np.ndarray:
  """The 4 real photos: central 80% crop, bilinear resize, [-1, 1]."""
  images = []
  for i in range(4):
    raw = (shared_dir / "images" / f"im_{i}.jpg").read_bytes()
    image = tf.image.convert_image_dtype(
        tf.io.decode_jpeg(raw, channels=3), tf.float32)
    image = tf.image.central_crop(image, 0.8)
    image = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE])
    images.append((image.numpy() - 0.5) * 2.0)
  return np.stack(images).astype(np.float32)


def _write_tf_checkpoint(prefix: pathlib.Path, images: np.ndarray, *,
                         extra: dict[str, np.ndarray] | None = None,
                         drop: str | None = None):
  """Builds the TF network, saves it like a training run, returns outputs."""
  graph = tf.Graph()
  with graph.as_default():
    inputs = tf1.placeholder(tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3])
    logits, features = TFReferenceResNet(np.random.default_rng(7))(
        inputs, NUM_CLASSES)
    # What a training run saves besides the weights.
    tf1.train.get_or_create_global_step()
    tf1.get_variable("Variable", [NUM_CLASSES], tf.float32)  # pos_count.
    tf1.get_variable("Variable_1", [NUM_CLASSES], tf.float32)  # neg_count.
    tf1.get_variable("stages_0_block_0/conv1_b2/conv2d/kernel/Momentum",
                     [1, 1, 8, 8], tf.float32)
    for name, value in (extra or {}).items():
      tf1.get_variable(name, value.shape, tf.float32,
                       initializer=tf1.constant_initializer(value))
    saved = [v for v in tf1.global_variables() if v.op.name != drop]
    saver = tf1.train.Saver(saved)
    with tf1.Session(graph=graph) as sess:
      sess.run(tf1.global_variables_initializer())
      out_logits, out_features = sess.run([logits, features],
                                          {inputs: images})
      saver.save(sess, str(prefix), write_meta_graph=False)
  return out_logits, out_features


@pytest.fixture(scope="module")
def photos(shared_dir):
  return _load_photos(shared_dir)


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory, photos):
  prefix = tmp_path_factory.mktemp("tf_ckpt") / "model.ckpt"
  logits, features = _write_tf_checkpoint(prefix, photos)
  return prefix, logits, features


def _write_dictionary(path: pathlib.Path) -> pathlib.Path:
  lines = ["category_index\tcategory_id\tindex_of_parent_category\t"
           "category name", "0\tn00000001\t-1\tthing",
           "1\tn00000002\t0\tanimal", "2\tn00000003\t1\tdog",
           "3\tn00000004\t1\tcat", "4\tn00000005\t0\tplant"]
  path.write_text("\n".join(lines) + "\n")
  return path


def test_converted_model_matches_tensorflow(tf_checkpoint, photos, tmp_path):
  prefix, tf_logits, tf_features = tf_checkpoint
  out = tmp_path / "converted"
  dictionary = _write_dictionary(tmp_path / "dict.txt")
  rc = cli.main(["convert-tf-checkpoint", str(prefix), "--out", str(out),
                 "--dictionary", str(dictionary), "--depth", "14",
                 "--num-classes", str(NUM_CLASSES)])
  assert rc == 0
  variables, metadata = store.load_for_inference(out)
  assert metadata["model"] == {"depth": 14, "num_classes": NUM_CLASSES,
                               "width_multiplier": WIDTH}
  assert metadata["label_mode"] == "multi"
  assert metadata["classes"]["ids"][2] == "n00000003"
  assert metadata["classes"]["names"][3] == "cat"
  model = resnet.create_model(14, NUM_CLASSES, width_multiplier=WIDTH)
  logits, features = jax.jit(functools.partial(model.apply, train=False))(
      variables, photos)
  assert features.shape == (4, 256)
  for ours, reference in ((features, tf_features), (logits, tf_logits)):
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)
  # The photos differ, so the comparison is not trivially satisfied.
  assert np.abs(tf_logits[0] - tf_logits[1]).max() > 0.1


def test_bad_checkpoint_lists_problems_and_writes_nothing(
    tmp_path, photos, capsys):
  prefix = tmp_path / "bad" / "model.ckpt"
  _write_tf_checkpoint(
      prefix, photos[:1],
      extra={"stages_9_extra/conv2d/kernel": np.zeros((1, 1, 2, 2))},
      drop="stages_1_block_0/conv2_b2_bn/batch_normalization/moving_mean")
  out = tmp_path / "out"
  rc = cli.main(["convert-tf-checkpoint", str(prefix), "--out", str(out)])
  assert rc != 0
  err = capsys.readouterr().err
  assert "1 missing:" in err
  assert ("stages_1_block_0/conv2_b2_bn/batch_normalization/moving_mean"
          in err)
  assert "1 unexpected:" in err and "stages_9_extra/conv2d/kernel" in err
  assert "global_step" not in err  # Training state is not a problem.
  assert not out.exists()
  assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # No temp dirs.


def test_wrong_expectations_and_unreadable_input(tf_checkpoint, tmp_path,
                                                 capsys):
  prefix, _, _ = tf_checkpoint
  with pytest.raises(convert_tf.ConversionError, match="ResNet-14"):
    convert_tf.convert_checkpoint(str(prefix), tmp_path / "a", depth=101)
  with pytest.raises(convert_tf.ConversionError, match="has 5 logits"):
    convert_tf.convert_checkpoint(str(prefix), tmp_path / "b",
                                  num_classes=11166)
  wrong_dict = tmp_path / "imagenet_dict.txt"
  wrong_dict.write_text("0\ttench\n1\tgoldfish\n")
  with pytest.raises(convert_tf.ConversionError, match="2 classes"):
    convert_tf.convert_checkpoint(str(prefix), tmp_path / "c",
                                  dictionary=wrong_dict)
  rc = cli.main(["convert-tf-checkpoint", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "d")])
  assert rc != 0 and "not a readable TF checkpoint" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet_dict.txt"]


def test_out_never_replaces_an_input_or_a_foreign_directory(
    tf_checkpoint, tmp_path, capsys):
  """--out holding the TF checkpoint, or a run with --overwrite: refused,
  and both stay."""
  prefix, _, _ = tf_checkpoint
  (tmp_path / "config.json").write_text("{}")  # A training run, say.
  folders = (prefix.parent, tmp_path)
  before = {p: p.read_bytes() for d in folders for p in d.rglob("*")
            if p.is_file()}
  rc = cli.main(["convert-tf-checkpoint", str(prefix), "--out",
                 str(prefix.parent), "--overwrite"])
  assert rc == 1 and "contains the input TF_CKPT_PREFIX" in (
      capsys.readouterr().err)
  with pytest.raises(store.CheckpointError, match="not an inference"):
    convert_tf.convert_checkpoint(str(prefix), tmp_path, overwrite=True)
  assert {p: p.read_bytes() for d in folders for p in d.rglob("*")
          if p.is_file()} == before


def test_name_mapping_is_the_original_scopes():
  assert (convert_tf.tf_name_of("params", ("init_conv", "kernel"))
          == "init/init_conv/conv2d/kernel")
  assert (convert_tf.tf_name_of(
      "params", ("stages_2_block_22", "conv2_b2", "kernel"))
          == "stages_2_block_22/conv2_b2/conv2d/kernel")
  assert (convert_tf.tf_name_of(
      "batch_stats", ("stages_0_block_0", "conv1_b1_bn", "var"))
          == "stages_0_block_0/conv1_b1_bn/batch_normalization/"
          "moving_variance")
  assert (convert_tf.tf_name_of("params", ("global_pool_bn", "scale"))
          == "global_pool/bn/batch_normalization/gamma")
  assert (convert_tf.tf_name_of("params", ("logits", "bias"))
          == "logits/dense/bias")


def test_resnet101_imagenet_shapes_infer_and_map():
  """The released 1000-class ResNet-101's variable set, from shapes alone."""
  model = resnet.create_model(101, 1000)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32),
      train=False))
  shapes = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        abstract[collection])[0]:
      keys = tuple(k.key for k in path)
      shapes[convert_tf.tf_name_of(collection, keys)] = leaf.shape
  blocks, stages = 3 + 4 + 23 + 3, 4
  convs = 1 + 3 * blocks + stages  # Stem, 3 per block, 1 per projection.
  bns = 3 * blocks + stages + 1  # The same, plus the final BN.
  assert len(shapes) == convs + 4 * bns + 2
  shapes["global_step"] = ()
  spec = convert_tf.infer_spec(shapes)
  assert spec == convert_tf.ModelSpec(101, 1000, 1.0)


def test_dictionaries_with_bom_crlf_and_bad_bytes(tmp_path):
  """A BOM hid the hierarchy's header (read as a 1000-class dictionary)."""
  path = tmp_path / "d.txt"
  path.write_bytes(b"\xef\xbb\xbfcategory_index\tcategory_id\t"
                   b"index_of_parent_category\tcategory name\r\n"
                   b"0\tn0\t-1\tthing\r\n1\tn1\t0\tdog\r\n")
  assert convert_tf.read_class_dictionary(path, 2) == (["n0", "n1"],
                                                       ["thing", "dog"])
  path.write_bytes(b"\xef\xbb\xbf0\ttench\r\n1\tgold\xfffish\r\n")
  with pytest.raises(convert_tf.ConversionError,
                     match=rf"^{path}:2: not UTF-8: byte 0xff at column 7"):
    convert_tf.read_class_dictionary(path, 2)
  path.write_bytes(b"\xef\xbb\xbf0\ttench\r\n1\tgoldfish\r\n")
  assert convert_tf.read_class_dictionary(path, 2) == (
      ["0", "1"], ["tench", "goldfish"])


def test_imagenet_dictionary_gets_tfds_wnids(shared_dir):
  ids, names = convert_tf.read_class_dictionary(
      shared_dir / "imagenet2012_dictionary.txt", 1000)
  assert ids[0] == "n01440764" and names[0] == "tench Tinca tinca"
  assert ids[1] == "n01443537" and names[1] == "goldfish Carassius auratus"
  assert len(set(ids)) == 1000
  ids, names = convert_tf.read_class_dictionary(
      shared_dir / "dictionary_and_semantic_hierarchy.txt", 11166)
  assert (ids[0], names[0]) == ("n00002452", "thing")
