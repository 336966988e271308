"""Image preprocessing of ML-Images (ML_IMAGES.md §7–9): host (tf) and device.

Training augmentation reproduces the original recipe: a random crop with the
original's `sample_distorted_bounding_box` parameters (`random_crop_window`:
70–100% of the area with min_object_covered 0.7 for pre-training, 5–100% with
min_object_covered 0 for fine-tuning; aspect 0.75–1.33; up to 100 attempts,
whole image on failure) decoded with `decode_and_crop_jpeg` so only
the crop is decoded, a resize, a random horizontal flip, a random rotation of up
to ±45° and a colour distortion (brightness, saturation, hue, contrast, in one
of two orders), then clip and scale to [-1, 1]. Every random choice is a
`tf.random.stateless_*` op driven by an explicit per-example seed, so the same
seed always gives the same pixels (exact resumption).

Which images are rotated and colour-distorted follows the original code, not
its comments: one uniform draw per image plays the original's
`thread_id = tf.random_uniform([], 0, 3, tf.int32)`. An image is rotated when
u < `rotation_fraction` (1/3, the original's thread_id == 0), colour-distorted
when u < `colour_fraction` (2/3, thread_id 0 or 1), in the first order
(brightness, saturation, hue, contrast) when u < colour_fraction / 2 and in the
second (brightness, contrast, saturation, hue) otherwise. With the defaults
that is exactly the original joint distribution: a third rotated and in colour
order one, a third in colour order two, a third untouched.

Where the colour distortion runs (`colour_on_device`, on by default): on the
host it costs ~0.6 ms of CPU per distorted image, the largest cost of the
pipeline. On the accelerator it is a few fused elementwise passes over the
batch, so the host only draws the parameters (`colour_parameters`, from the same
per-example seed) and `device_augment` applies them after the transfer. Both
paths share `_saturation_and_hue` and `_contrast`, written once over a small
table of array ops (`_TF_OPS`, `_JNP_OPS`), so they cannot drift apart.

Speed on the host: the rotation (a gather, nearest-neighbour like the original's
tf.contrib.image.rotate) and the host-side colour distortion (saturation and hue
fused into one HSV round trip) run as XLA-compiled functions, and only on the
images drawn for them; the others take a plain flip-and-round path.

The host functions return uint8 images: a quarter of the host-to-device bytes
of float32; `normalize` (or `device_augment`) maps them to [-1, 1] on the
device. `normalize_tf` is the same map on the host for pipelines that must ship
float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import tensorflow as tf

MODES = ("pretrain", "finetune", "eval")
_DCT_METHODS = ("INTEGER_FAST", "INTEGER_ACCURATE")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Augmentation parameters; defaults are the original production values.

  `rotation_fraction` 1/3 and `colour_fraction` 2/3 are what the original
  code does (its comments say 1/4 and 1/2); see the module docstring for how
  one draw couples them. `colour_on_device` moves the colour distortion to the
  accelerator (`device_augment`); the pipeline then ships its parameters.
  """
  # The original's crop (image_preprocessing.py, train.py): the whole image
  # is the one box, so min_object_covered is the smallest crop area too.
  area_range: tuple[float, float] = (0.7, 1.0)
  aspect_ratio_range: tuple[float, float] = (0.75, 1.33)
  min_object_covered: float = 0.7
  max_attempts: int = 100
  flip: bool = True
  rotation_fraction: float = 1 / 3
  max_rotation_degrees: float = 45.0
  # "nearest" as tf.contrib.image.rotate (the original) did, or "bilinear".
  rotation_interpolation: str = "nearest"
  colour_fraction: float = 2 / 3
  colour_on_device: bool = True
  brightness_delta: float = 32 / 255
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: float = 0.2
  contrast_range: tuple[float, float] = (0.5, 1.5)
  eval_crop_fraction: float = 0.8
  antialias: bool = False
  # JPEG IDCT. Training uses the fast one (TF's default), whose error of
  # about one grey level vanishes under augmentation; evaluation libjpeg's
  # accurate one (the pixels PIL and most tools decode).
  dct_method: str = "INTEGER_FAST"
  eval_dct_method: str = "INTEGER_ACCURATE"

  def __post_init__(self):
    """Rejects values that cannot run or make no sense, naming the field."""
    problems = []
    choices = {"rotation_interpolation": ("nearest", "bilinear"),
               "dct_method": _DCT_METHODS, "eval_dct_method": _DCT_METHODS}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        problems.append(f"{name} must be one of {allowed}, not "
                        f"{getattr(self, name)!r}")
    for name in ("rotation_fraction", "colour_fraction", "min_object_covered"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if not 0.0 < self.eval_crop_fraction <= 1.0:
      problems.append("eval_crop_fraction must be in (0, 1], got "
                      f"{self.eval_crop_fraction}")
    for name in ("area_range", "aspect_ratio_range", "saturation_range",
                 "contrast_range"):
      value = getattr(self, name)
      if len(value) != 2 or not 0.0 <= value[0] <= value[1]:
        problems.append(f"{name} must be (low, high) with 0 <= low <= high, "
                        f"got {value}")
    if self.area_range[1] > 1.0:
      problems.append(f"area_range must end at <= 1, got {self.area_range}")
    if self.max_attempts < 1:
      problems.append(f"max_attempts must be >= 1, got {self.max_attempts}")
    for name in ("brightness_delta", "hue_delta", "max_rotation_degrees"):
      if getattr(self, name) < 0:
        problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
    if problems:
      raise ValueError("; ".join(problems))

  @classmethod
  def for_mode(cls, mode: str,
               overrides: Mapping[str, Any] | None = None) -> PreprocessConfig:
    """The defaults of `mode` ("pretrain", "finetune", "eval") plus overrides.

    Unknown override keys raise, so a typo in a config cannot silently fall
    back to a default.
    """
    if mode not in MODES:
      raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of "
                       f"{MODES}")
    values: dict[str, Any] = {}
    if mode == "finetune":  # The original's finetune.py.
      values["area_range"] = (0.05, 1.0)
      values["min_object_covered"] = 0.0
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in dict(overrides or {}).items():
      if key not in fields:
        raise ValueError(f"unknown preprocessing option {key!r}; expected one "
                         f"of {sorted(fields)}")
      values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**values)


# Multiplying by the reciprocal (not dividing) keeps XLA and TF bit-identical.
_SCALE = 2.0 / 255.0


def normalize(images: Any) -> jnp.ndarray:
  """uint8 images -> float32 in [-1, 1]; runs on the device after transfer."""
  return jnp.asarray(images, jnp.float32) * _SCALE - 1.0


def normalize_tf(images: tf.Tensor) -> tf.Tensor:
  """The host-side twin of `normalize` (same float32 values)."""
  return tf.cast(images, tf.float32) * _SCALE - 1.0


def _decode_window(image_bytes: tf.Tensor, window_fn,
                   dct_method: str) -> tf.Tensor:
  """Decodes the window `window_fn(shape) -> [y, x, h, w]` of an image, RGB.

  JPEGs decode only the window; other formats (PNG, GIF, BMP) decode fully
  and are sliced.
  """
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3,
                                         dct_method=dct_method)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3,
                               expand_animations=False)
    y, x, h, w = tf.unstack(window_fn(tf.shape(image)))
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Float image in [0, 255] (or beyond) -> rounded, clipped uint8."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _resize(image: tf.Tensor, size: tuple[int, int] | tf.Tensor,
            antialias: bool) -> tf.Tensor:
  return tf.image.resize(image, size, method="bilinear", antialias=antialias)


def _rotate(image: tf.Tensor, angle: tf.Tensor, flip: tf.Tensor | bool,
            interpolation: str) -> tf.Tensor:
  """Flips (optionally), then rotates about the centre; black corners.

  Output pixel (x, y) samples the input at the rotated position, computed in
  one gather (nearest) or four (bilinear) rather than TF's projective
  transform kernel, which costs several times more per image.
  """
  h, w = image.shape[0], image.shape[1]
  ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32),
                       tf.range(w, dtype=tf.float32), indexing="ij")
  cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  src_x = cos * (xs - cx) - sin * (ys - cy) + cx
  src_y = sin * (xs - cx) + cos * (ys - cy) + cy
  src_x = tf.where(flip, (w - 1) - src_x, src_x)
  pixels = tf.reshape(image, [h * w, 3])

  def sample(y, x):
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    index = tf.clip_by_value(y, 0, h - 1) * w + tf.clip_by_value(x, 0, w - 1)
    return tf.gather(pixels, index) * tf.cast(inside, image.dtype)[..., None]

  if interpolation == "nearest":
    return sample(tf.cast(tf.round(src_y), tf.int32),
                  tf.cast(tf.round(src_x), tf.int32))
  x0, y0 = tf.floor(src_x), tf.floor(src_y)
  fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  top = sample(y0, x0) * (1 - fx) + sample(y0, x0 + 1) * fx
  bottom = sample(y0 + 1, x0) * (1 - fx) + sample(y0 + 1, x0 + 1) * fx
  return top * (1 - fy) + bottom * fy


class _Ops(NamedTuple):
  """The array ops the colour maths needs, from TF (host) or jnp (device)."""
  maximum: Callable
  minimum: Callable
  where: Callable
  floor: Callable
  clip: Callable
  stack: Callable
  image_mean: Callable  # [..., H, W, C] -> per-channel mean [..., 1, 1, C].


_TF_OPS = _Ops(tf.maximum, tf.minimum, tf.where, tf.floor, tf.clip_by_value,
               tf.stack, lambda x: tf.reduce_mean(x, [-3, -2], keepdims=True))
_JNP_OPS = _Ops(jnp.maximum, jnp.minimum, jnp.where, jnp.floor, jnp.clip,
                jnp.stack, lambda x: jnp.mean(x, (-3, -2), keepdims=True))


def _saturation_and_hue(ops: _Ops, image, factor, delta):
  """tf.image.adjust_saturation(factor) then adjust_hue(delta), fused.

  The two steps are adjacent in both colour orders, so one RGB->HSV->RGB
  round trip does both: scale S (clipped to [0, 1]), rotate H. Same HSV maths
  as TF's kernels, at any value scale. Written without fmod/divide_no_nan,
  which XLA:CPU does not vectorise. `factor` and `delta` broadcast against
  the image without its channel axis.
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  v = ops.maximum(ops.maximum(r, g), b)
  chroma = v - ops.minimum(ops.minimum(r, g), b)
  s = ops.where(v > 0, chroma / ops.maximum(v, 1e-30), 0.0)
  h = ops.where(v == r, g - b,
                ops.where(v == g, b - r + 2 * chroma, r - g + 4 * chroma))
  h = h / ops.maximum(6 * chroma, 1e-30) + delta  # Turns, taken mod 1 next.
  h6 = 6.0 * (h - ops.floor(h))
  c = v * ops.clip(s * factor, 0.0, 1.0)

  def channel(n):
    k = n + h6  # HSV -> RGB: channel = v - c * clip(min(k, 4 - k)), k mod 6.
    k = ops.where(k >= 6.0, k - 6.0, k)
    return v - c * ops.clip(ops.minimum(k, 4.0 - k), 0.0, 1.0)

  return ops.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _contrast(ops: _Ops, image, factor):
  """tf.image.adjust_contrast: scale each channel about its image mean."""
  mean = ops.image_mean(image)
  return (image - mean) * factor + mean


def _colour(image: tf.Tensor, first_order: bool, brightness: tf.Tensor,
            saturation: tf.Tensor, hue: tf.Tensor,
            contrast: tf.Tensor) -> tf.Tensor:
  """Inception's colour distortion in one of its two orders, on the host.

  first: brightness, saturation, hue, contrast; second: brightness, contrast,
  saturation, hue. Like the original, no clipping between the steps.
  """
  image = image + brightness
  if first_order:
    return _contrast(_TF_OPS, _saturation_and_hue(_TF_OPS, image, saturation,
                                                  hue), contrast)
  return _saturation_and_hue(_TF_OPS, _contrast(_TF_OPS, image, contrast),
                             saturation, hue)


# `colour_parameters` layout: [order (0: none, 1: first order = the original's
# color_ordering 0, 2: second order = its 1), brightness delta (fraction of
# the value range, as tf.image), saturation factor, hue delta (turns),
# contrast factor].
COLOUR_PARAMS = 5
NEUTRAL_COLOUR = (0.0, 0.0, 1.0, 0.0, 1.0)


def _draws(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(crop seed, uniforms) of an example: everything random about it.

  One op draws all the example's uniforms: [flip, case (the original's
  thread_id), angle, brightness, saturation, hue, contrast].
  """
  crop_seed, augment_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  return crop_seed, tf.random.stateless_uniform([7], augment_seed)


def _colour_order(u: tf.Tensor, config: PreprocessConfig) -> tf.Tensor:
  """0: no colour; 1: first order; 2: second order (module docstring)."""
  return tf.where(u[1] < config.colour_fraction,
                  tf.where(u[1] < config.colour_fraction / 2, 1, 2), 0)


def _colour_values(u: tf.Tensor, config: PreprocessConfig,
                   scale: float) -> list[tf.Tensor]:
  """[brightness delta * scale, saturation, hue delta, contrast] of `u`."""
  def between(i, low, high):
    return low + (high - low) * u[i]

  delta = scale * config.brightness_delta
  return [between(3, -delta, delta), between(4, *config.saturation_range),
          between(5, -config.hue_delta, config.hue_delta),
          between(6, *config.contrast_range)]


def colour_parameters(seed: tf.Tensor, *,
                      config: PreprocessConfig) -> tf.Tensor:
  """The colour distortion `train_image` would apply for `seed`, as float32.

  A [COLOUR_PARAMS] vector for `device_augment` (layout above);
  `NEUTRAL_COLOUR` when the example is not drawn for colour. Drawn from the
  same per-example seed as the crop and rotation, so it is reproducible and
  resumable like them.
  """
  _, u = _draws(seed)
  order = _colour_order(u, config)
  values = tf.stack([tf.cast(order, tf.float32),
                     *_colour_values(u, config, 1.0)])
  return tf.where(order > 0, values, tf.constant(NEUTRAL_COLOUR))


@functools.lru_cache(maxsize=None)
def _rotate_and_colour(config: PreprocessConfig, rotate: bool,
                       colour_order: int | None):
  """Flip + rotation and/or colour distortion as one XLA computation -> uint8.

  Compiled, the per-pixel steps fuse into a few loops over the image instead
  of one pass (and one temporary) per TF op: 3-5x cheaper than chaining
  tf.image ops (measured). One function per case (rotate or not, colour
  order 1/2 or none), picked per example by `tf.switch_case` in
  `train_image`. `u` holds the example's uniform draws.
  """
  max_angle = math.radians(config.max_rotation_degrees)

  # Plain TF ops, Python branches on the config only: no AutoGraph (its
  # source conversion of the cases cost seconds at every pipeline start).
  @tf.function(jit_compile=True, autograph=False)
  def augment(image, u, flip):
    if rotate:
      angle = -max_angle + 2 * max_angle * u[2]
      image = _rotate(image, angle, flip, config.rotation_interpolation)
    else:
      image = tf.where(flip, tf.reverse(image, [1]), image)
    if colour_order is not None:
      # Pixels are in [0, 255]: brightness scales with them.
      image = _colour(image, colour_order == 0,
                      *_colour_values(u, config, 255.0))
    return _to_uint8(image)

  return augment


def random_crop_window(shape: tf.Tensor, *, seed: tf.Tensor,
                       config: PreprocessConfig) -> tf.Tensor:
  """The training crop of an image of `shape` (H, W, C): [y, x, h, w].

  TF's sampler with the whole image as the one box, as the original (its
  empty box list with use_image_if_no_bounding_boxes); only the random
  stream differs: stateless, from `seed`, for exact resumption.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=config.min_object_covered,
      aspect_ratio_range=config.aspect_ratio_range,
      area_range=config.area_range, max_attempts=config.max_attempts,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                config: PreprocessConfig) -> tf.Tensor:
  """Encoded image -> augmented uint8 [image_size, image_size, 3].

  `seed` is a stateless seed (int64 [2]); equal seeds give equal outputs.
  With `config.colour_on_device` the colour distortion is left out: ship
  `colour_parameters(seed)` with the image and apply `device_augment`.
  """
  crop_seed, u = _draws(seed)
  image = _decode_window(
      image_bytes,
      functools.partial(random_crop_window, seed=crop_seed, config=config),
      config.dct_method)
  image = _resize(image, (image_size, image_size), config.antialias)
  image.set_shape([image_size, image_size, 3])
  flip = tf.logical_and(config.flip, u[0] < 0.5)

  def plain():
    # A convex combination of uint8 pixels is in [0, 255]: no clip needed.
    flipped = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    return tf.cast(flipped + 0.5, tf.uint8)

  def compiled(rotate, colour_order):
    return lambda: _rotate_and_colour(config, rotate, colour_order)(
        image, u, flip)

  # Case 3 * rotate + (0: no colour, 1 or 2: colour order); only the images
  # that get rotated or colour-distorted on the host pay for the extra work.
  colour_case = (tf.zeros([], tf.int32) if config.colour_on_device
                 else _colour_order(u, config))
  case = 3 * tf.cast(u[1] < config.rotation_fraction, tf.int32) + colour_case
  return tf.switch_case(case, [
      plain, compiled(False, 0), compiled(False, 1),
      compiled(True, None), compiled(True, 0), compiled(True, 1)])


def device_augment(images: Any, colour: Any, *,
                   dtype: Any = jnp.float32) -> jnp.ndarray:
  """Colour distortion on the accelerator, then clip and scale to [-1, 1].

  Args:
    images: [..., H, W, 3] as the pipeline ships them: uint8, or float32
      already in [-1, 1] (`transfer_dtype="float32"`).
    colour: [..., COLOUR_PARAMS] float32 from `colour_parameters`, one row
      per image (the batch's `colour`).
    dtype: of the result (e.g. jnp.bfloat16); the maths runs in float32.

  Returns:
    The images in [-1, 1], each distorted as `train_image` does on the host
    with `colour_on_device=False` (tf.image semantics: contrast about the
    per-channel mean of the image); images with order 0 equal `normalize`.
    Jit-able and vectorised over the leading axes, so it runs inside a
    pmapped or jitted training step.
  """
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    plain = normalize(images)
  else:
    plain = images.astype(jnp.float32)
  pixels = (plain + 1.0) * 127.5  # [0, 255], as the host path works.
  colour = jnp.asarray(colour, jnp.float32)[..., None, None, :]
  order, brightness, saturation, hue, contrast = (
      colour[..., i] for i in range(COLOUR_PARAMS))
  x = pixels + 255.0 * brightness[..., None]
  # Second order: contrast before saturation and hue; first order: after.
  x = jnp.where(order[..., None] == 2.0,
                _contrast(_JNP_OPS, x, contrast[..., None]), x)
  x = _saturation_and_hue(_JNP_OPS, x, saturation, hue)
  x = jnp.where(order[..., None] == 1.0,
                _contrast(_JNP_OPS, x, contrast[..., None]), x)
  x = jnp.clip(x, 0.0, 255.0) * _SCALE - 1.0
  return jnp.where(order[..., None] > 0, x, plain).astype(dtype)


def eval_image(image_bytes: tf.Tensor, *, image_size: int,
               config: PreprocessConfig) -> tf.Tensor:
  """Encoded image -> central crop, bilinear resize, uint8 [S, S, 3]."""
  fraction = config.eval_crop_fraction

  def central_window(shape):
    # tf.image.central_crop's rounding: offset floor((n - n*f)/2), size n - 2*offset.
    hw = tf.cast(shape[:2], tf.float32)
    offset = tf.cast((hw - hw * fraction) / 2.0, tf.int32)
    size = shape[:2] - 2 * offset
    return tf.stack([offset[0], offset[1], size[0], size[1]])

  image = _decode_window(image_bytes, central_window, config.eval_dct_method)
  image = _resize(image, (image_size, image_size), config.antialias)
  return _to_uint8(image)
