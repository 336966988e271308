"""The model wing's input: TFDS dataset -> sharded, resumable, preprocessed batches.

TensorFlow here is only the host's input library (tf.data, image decoding);
the model runs in JAX. A TensorFlow build with GPU support (Colab's, or a
user's own) would otherwise claim nearly all GPU memory at its first op and
leave JAX none. Every tf.data user (the pipeline, `inference.predict`) imports
this package first, so hiding the GPUs from TensorFlow here happens once,
before any TensorFlow op runs; JAX still sees them.
"""

import logging as _logging

import tensorflow as _tf


def _hide_gpus_from_tensorflow() -> None:
  try:
    _tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:  # TF already ran ops on its devices.
    _logging.getLogger(__name__).warning(
        "TensorFlow was initialised before mlimages_jax.inputs and may hold "
        "GPU memory that JAX needs: %s", e)


_hide_gpus_from_tensorflow()
