"""``python -m mlimages_jax <command>``: the same CLI as the ``mlimages`` script."""

from mlimages_jax.cli import run

if __name__ == "__main__":
  run()
