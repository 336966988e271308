r"""Trains a model from a config: ``python main.py --config=... --workdir=...``.

All logic lives in `mlimages_jax.train.loop`; this file only parses flags, joins
the multi-process run and turns user errors into a message and exit code 1,
and a stop on SIGTERM/SIGINT (checkpoint saved) into exit code 75
(`preemption.EXIT_CODE`): rerun the same command to resume.
Multi-host: run the same command on every host, adding
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` unless the
cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) is detected automatically.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/pretrain.py:demo.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs; "
                    "a run resumes from it.")
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
  """Orbax logs every save step at INFO; keep only its warnings and errors."""
  return (record.levelno >= std_logging.WARNING
          or "/orbax/" not in record.pathname)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a --config.FIELD the config lacks is one line with a
  "did you mean" (ml_collections raises it as a long traceback)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError):
    from mlimages_jax.train import config as config_lib
    for arg in argv[1:]:
      name = arg.split("=")[0].lstrip("-")
      for prefix in ("config.", "noconfig."):
        problem = (name.startswith(prefix) and
                   config_lib.override_problem(name[len(prefix):]))
        if problem:
          print(f"error: {problem}", file=sys.stderr)
          sys.exit(1)
    raise


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  # Imported here so that --help and flag errors return at once.
  from mlimages_jax import fileio
  from mlimages_jax.checkpoints import store
  from mlimages_jax.evaluation import evaluator
  from mlimages_jax.inputs import pipeline
  from mlimages_jax.train import config_validation
  from mlimages_jax.train import distributed
  from mlimages_jax.train import loop
  from mlimages_jax.train import preemption

  distributed.initialize_distributed(FLAGS.coordinator_address,
                                     FLAGS.num_processes, FLAGS.process_id)
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (config_validation.ConfigError, store.CheckpointError,
          pipeline.DatasetNotBuiltError, evaluator.EvaluationError,
          fileio.OutputPathError, fileio.FolderInUseError,
          FloatingPointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    return 1
  except preemption.Preempted as e:
    logging.warning("%s", e)
    print(e, file=sys.stderr)
    return preemption.EXIT_CODE
  return 0


if __name__ == "__main__":
  from mlimages_jax import fast_exit
  app.run(lambda argv: fast_exit.exit_process(main(argv)),
          flags_parser=_parse_flags)
