"""The ML-Images ResNet (pre-activation bottlenecks, stride 2 in every stage).

This is the network of the original ``models/resnet.py`` (ML_IMAGES.md §6), not
the torchvision/flax-examples ResNet: the stem is a bare 7x7/2 convolution with
no BN, ReLU or max-pool; instead the first block of EVERY stage (also stage 0)
downsamples, in its 3x3 convolution and in its projection shortcut; blocks are
pre-activation (BN-ReLU before each convolution, also on the projection
shortcut) and the network ends with BN-ReLU, a global average pool (the
feature) and a dense layer with bias (the logits).

Strided convolutions pad explicitly, ``(k-1)//2`` before and the rest after,
then run VALID (the original's ``_pre_padding``); stride-1 convolutions run
SAME. With even input sizes this differs from SAME for the 7x7/2 stem, so it
matters for importing the released checkpoints.

Module names mirror the TF variable scopes (``init_conv``,
``stages_{i}_block_{j}/conv2_b2``, ``global_pool_bn``, ``logits``) so that the
checkpoint converter maps variables one to one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Blocks per stage for each supported depth. 14 and 26 are tiny variants for
# tests and demos; 50/101/152 are the original's.
STAGE_SIZES: dict[int, tuple[int, int, int, int]] = {
    14: (1, 1, 1, 1),
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STEM_FEATURES = 64
STAGE_FEATURES = (256, 512, 1024, 2048)
STEM_KERNEL = 7

# tf.variance_scaling_initializer() defaults: scale 1, fan_in, truncated normal.
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in",
                                                    "truncated_normal")
# tf.layers.dense defaults: Glorot uniform kernel, zero bias.
dense_kernel_init = nn.initializers.glorot_uniform()


def explicit_padding(kernel_size: int) -> tuple[int, int]:
  """Pre-padding of a strided conv, original: (k-1)//2 before, rest after."""
  total = kernel_size - 1
  return total // 2, total - total // 2


def make_conv(features: int, kernel_size: int, strides: int, *, name: str,
              dtype: Any = jnp.float32) -> nn.Conv:
  """A bias-free conv with the original's padding (SAME, or pad + VALID)."""
  if strides == 1:
    padding: Any = "SAME"
  else:
    padding = (explicit_padding(kernel_size),) * 2
  return nn.Conv(features, (kernel_size, kernel_size),
                 strides=(strides, strides), padding=padding, use_bias=False,
                 dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=conv_kernel_init, name=name)


def scaled_features(features: int, width_multiplier: float) -> int:
  """Channel count for a width multiplier; divisible by 4 for the bottleneck."""
  scaled = int(round(features * width_multiplier / 4)) * 4
  return max(scaled, 4)


class BottleneckBlock(nn.Module):
  """Pre-activation bottleneck: BN-ReLU-1x1 → BN-ReLU-3x3(stride) → BN-ReLU-1x1.

  ``projection`` blocks (the first of each stage) apply BN-ReLU-conv1x1(stride)
  to the block input as the shortcut; the others add the input unchanged.
  """
  features: int
  strides: int
  projection: bool
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shortcut = x
    if self.projection:
      shortcut = nn.relu(self.norm(name="conv1_b1_bn")(x))
      shortcut = self.conv(self.features, 1, self.strides,
                           name="conv1_b1")(shortcut)
    bottleneck = self.features // 4
    y = nn.relu(self.norm(name="conv1_b2_bn")(x))
    y = self.conv(bottleneck, 1, 1, name="conv1_b2")(y)
    y = nn.relu(self.norm(name="conv2_b2_bn")(y))
    y = self.conv(bottleneck, 3, self.strides, name="conv2_b2")(y)
    y = nn.relu(self.norm(name="conv3_b2_bn")(y))
    y = self.conv(self.features, 1, 1, name="conv3_b2")(y)
    return y + shortcut


class ResNet(nn.Module):
  """ML-Images ResNet: ``x -> (logits [B, C], features [B, F])``, float32.

  Attributes:
    num_classes: size of the dense head.
    stage_sizes: blocks in each of the 4 stages.
    width_multiplier: scales every channel count (1.0 is the original; small
      values give fast test models with the same topology).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and batch
      statistics stay float32 and the outputs are returned as float32.
    bn_momentum: decay of the BN moving averages (TF's ``momentum`` has the
      same meaning as flax's: ``new = momentum * old + (1 - momentum) *
      batch``).
    bn_epsilon: BN variance epsilon.
    bn_axis_name: if set, BN batch statistics are averaged over this pmap axis
      (synchronised BN); None keeps per-device statistics like the original.
  """
  num_classes: int
  stage_sizes: Sequence[int]
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32
  bn_momentum: float = 0.997
  bn_epsilon: float = 1e-5
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    conv = functools.partial(make_conv, dtype=self.dtype)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        dtype=self.dtype, param_dtype=jnp.float32,
        axis_name=self.bn_axis_name if train else None)

    x = jnp.asarray(x, self.dtype)
    x = conv(scaled_features(STEM_FEATURES, self.width_multiplier),
             STEM_KERNEL, 2, name="init_conv")(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      channels = scaled_features(STAGE_FEATURES[i], self.width_multiplier)
      for j in range(num_blocks):
        x = BottleneckBlock(features=channels, strides=2 if j == 0 else 1,
                            projection=j == 0, conv=conv, norm=norm,
                            name=f"stages_{i}_block_{j}")(x)
    x = nn.relu(norm(name="global_pool_bn")(x))
    # Pool in float32: a bf16 mean over 7x7 positions loses feature precision.
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, kernel_init=dense_kernel_init,
                      name="logits")(features)
    return logits.astype(jnp.float32), features


def create_model(depth: int, num_classes: int, *, width_multiplier: float = 1.0,
                 dtype: Any = jnp.float32, **kwargs: Any) -> ResNet:
  """The ResNet of a given depth (14, 26, 50, 101 or 152)."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"unsupported ResNet depth {depth}; "
                     f"choose one of {sorted(STAGE_SIZES)}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if width_multiplier <= 0:
    raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
  return ResNet(num_classes=num_classes, stage_sizes=STAGE_SIZES[depth],
                width_multiplier=width_multiplier, dtype=dtype, **kwargs)


def depth_of(stage_sizes: Sequence[int]) -> int:
  """Inverse of STAGE_SIZES (used to infer the depth of a checkpoint)."""
  for depth, sizes in STAGE_SIZES.items():
    if tuple(stage_sizes) == sizes:
      return depth
  raise ValueError(f"no supported depth has stage sizes {tuple(stage_sizes)}; "
                   f"known: {STAGE_SIZES}")
