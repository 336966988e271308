"""The `ml_images` TFDS dataset; importing this package registers it.

    import tfds_builder.ml_images  # noqa: F401
    ds = tfds.load("ml_images/synthetic", data_dir=...)
"""

from tfds_builder.ml_images.ml_images_dataset_builder import Builder

__all__ = ["Builder"]
