"""TFDS dataset builders (spine: the dataset); importing one registers it.

The builders live in the checkout's top-level `tfds_builder/<name>/` (TFDS's
folder layout: `tfds build tfds_builder/<name> ...` from a checkout); the
wheel ships each one as `mlimages_jax.datasets.<name>` (pyproject's
package-dir mapping), so from any install: ``tfds build <name>
--imports=mlimages_jax.datasets.<name> ...``. In a checkout this package also
looks in `tfds_builder/`, so the same import works from one copy of the code.
"""

import pathlib

_CHECKOUT = pathlib.Path(__file__).resolve().parents[2] / "tfds_builder"
if _CHECKOUT.is_dir():
  __path__.append(str(_CHECKOUT))
