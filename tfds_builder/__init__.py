"""TFDS dataset builders of this project (`tfds build tfds_builder/<name>`)."""
