"""TFDS dataset builders (spine: the dataset); importing one registers it.

From a checkout: ``tfds build mlimages_jax/datasets/<name> ...``; from any
install: ``tfds build <name> --imports=mlimages_jax.datasets.<name> ...``.
"""
