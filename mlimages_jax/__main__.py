"""``python -m mlimages_jax <command>``: the same CLI as the ``mlimages`` script."""

import sys

from mlimages_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
