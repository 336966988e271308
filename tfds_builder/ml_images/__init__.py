"""The `ml_images` TFDS dataset; importing this package registers it.

    import mlimages_jax.datasets.ml_images  # noqa: F401
    ds = tfds.load("ml_images/synthetic", data_dir=...)

Relative import: `tfds build tfds_builder/ml_images` imports this folder as
the package `ml_images`, and the builder must load once under either name.
"""

from .ml_images_dataset_builder import Builder

__all__ = ["Builder"]
