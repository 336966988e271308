"""The `ml_images` TFDS dataset; importing this package registers it.

    import mlimages_jax.datasets.ml_images  # noqa: F401
    ds = tfds.load("ml_images/synthetic", data_dir=...)
"""

from mlimages_jax.datasets.ml_images.ml_images_dataset_builder import Builder

__all__ = ["Builder"]
