"""mlimages-jax: Tencent ML-Images rebuilt in JAX/Flax.

Importing the package is cheap on purpose: the label tools must start fast, so
nothing here imports JAX or TensorFlow. Import the modules you need directly,
e.g. ``from mlimages_jax import hierarchy``.
"""

__version__ = "0.1.0"
