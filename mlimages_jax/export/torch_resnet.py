"""The ML-Images ResNet in plain PyTorch, shipped with every PyTorch export.

This file is copied as-is next to the exported weights, so it imports only
torch and the standard library (neither JAX nor mlimages_jax): a PyTorch
user needs nothing else. Usage, in the export directory::

  import mlimages_resnet
  model = mlimages_resnet.load(".")          # eval mode, weights loaded
  x = mlimages_resnet.normalize(uint8_nhwc)  # -> float32 NCHW in [-1, 1]
  logits, features = model(x)

The architecture is the one of mlimages_jax.models.resnet: a bare 7x7/2
stem convolution (no BN, ReLU or max-pool); the first block of EVERY stage
downsamples (stride 2 in its 3x3 convolution and its projection shortcut);
pre-activation bottlenecks (BN-ReLU before each convolution, also on the
projection shortcut); a final BN-ReLU, global average pool (the features)
and a dense layer with bias (the logits). Every convolution here has an odd
kernel and pads (k-1)//2 on both sides, which is exactly the original's
padding (stride 1: SAME; stride 2: explicit (k-1)//2 before, the rest after,
then VALID), so no asymmetric padding is needed.

`config.json` gives the channel counts (width multiplier already applied),
so nothing here depends on how the JAX side derives them.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _conv(in_channels: int, out_channels: int, kernel_size: int,
          stride: int) -> nn.Conv2d:
  return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                   padding=(kernel_size - 1) // 2, bias=False)


class Bottleneck(nn.Module):
  """BN-ReLU-1x1 -> BN-ReLU-3x3(stride) -> BN-ReLU-1x1, plus the shortcut."""

  def __init__(self, in_channels: int, channels: int, stride: int,
               projection: bool, eps: float):
    super().__init__()
    width = channels // 4
    self.projection = projection
    if projection:
      self.conv1_b1_bn = nn.BatchNorm2d(in_channels, eps=eps)
      self.conv1_b1 = _conv(in_channels, channels, 1, stride)
    self.conv1_b2_bn = nn.BatchNorm2d(in_channels, eps=eps)
    self.conv1_b2 = _conv(in_channels, width, 1, 1)
    self.conv2_b2_bn = nn.BatchNorm2d(width, eps=eps)
    self.conv2_b2 = _conv(width, width, 3, stride)
    self.conv3_b2_bn = nn.BatchNorm2d(width, eps=eps)
    self.conv3_b2 = _conv(width, channels, 1, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x
    if self.projection:
      shortcut = self.conv1_b1(torch.relu(self.conv1_b1_bn(x)))
    y = self.conv1_b2(torch.relu(self.conv1_b2_bn(x)))
    y = self.conv2_b2(torch.relu(self.conv2_b2_bn(y)))
    y = self.conv3_b2(torch.relu(self.conv3_b2_bn(y)))
    return y + shortcut


class MLImagesResNet(nn.Module):
  """float32 NCHW images in [-1, 1] -> (logits [N, C], features [N, F])."""

  def __init__(self, *, num_classes: int, stage_sizes: Sequence[int],
               stem_channels: int, stage_channels: Sequence[int],
               bn_epsilon: float = 1e-5, **_unused):
    super().__init__()
    self.init_conv = _conv(3, stem_channels, 7, 2)
    self.block_names = []
    in_channels = stem_channels
    for i, (num_blocks, channels) in enumerate(zip(stage_sizes,
                                                   stage_channels)):
      for j in range(num_blocks):
        name = f"stages_{i}_block_{j}"
        self.add_module(name, Bottleneck(in_channels, channels,
                                         2 if j == 0 else 1, j == 0,
                                         bn_epsilon))
        self.block_names.append(name)
        in_channels = channels
    self.global_pool_bn = nn.BatchNorm2d(in_channels, eps=bn_epsilon)
    self.logits = nn.Linear(in_channels, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.init_conv(x)
    for name in self.block_names:
      x = getattr(self, name)(x)
    features = torch.relu(self.global_pool_bn(x)).mean(dim=(2, 3))
    return self.logits(features), features


def normalize(images: torch.Tensor) -> torch.Tensor:
  """uint8 images, NHWC -> float32 NCHW in [-1, 1] (x * 2/255 - 1)."""
  x = images.permute(0, 3, 1, 2).to(torch.float32)
  return x * (2.0 / 255.0) - 1.0


def load(directory: str | os.PathLike[str] = ".",
         map_location: str = "cpu") -> MLImagesResNet:
  """The exported network with its weights, in eval mode."""
  from safetensors.torch import load_file
  with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
    config = json.load(f)
  model = MLImagesResNet(**config["architecture"])
  model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE),
                                  device=map_location))
  return model.eval()
