"""Tests of mlimages_jax.train.run_log."""

from __future__ import annotations

import json

from mlimages_jax.train import run_log


def test_metrics_log_truncates_on_resume(tmp_path):
  log = run_log.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
  for step in (2, 4, 6):
    log.write({"step": step, "loss": 1.0 / step})
  log.write({"step": 6, "split": "validation", "mAP": 0.5})
  log.truncate_after(4)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
           .splitlines()]
  assert [l["step"] for l in lines] == [2, 4]


def test_run_log_on_a_remote_workdir(monkeypatch):
  """metrics.jsonl, config.json and TensorBoard events on a non-local
  filesystem (TF's ram://, reached through epath like gs://), including the
  rewrite a resumed run does."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mlimages_jax import fileio  # pylint: disable=g-import-not-at-top
  from remote_helpers import route_ram_through_epath  # pylint: disable=g-import-not-at-top
  workdir = fileio.as_path(route_ram_through_epath(monkeypatch)) / "run"
  workdir.mkdir(parents=True)
  config = ml_collections.ConfigDict(dict(batch_size=4,
                                          eval_split="validation"))
  log = run_log.RunLog(workdir, config, total_steps=6, is_chief=True)
  for step in (2, 4):
    log.train([(step, {k: np.float32(1.0 / step) for k in (
        "loss", "weight_decay_loss", "total_loss", "grad_norm",
        "learning_rate")})], decode_failures=0)
  log.evaluation(4, 32, {"mAP": 0.25}, seconds=1.5)
  log.flush()
  lines = [json.loads(l) for l in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(l["step"], l.get("mAP"), l.get("seconds")) for l in lines] == [
      (2, None, None), (4, None, None), (4, 0.25, 1.5)]
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 4
  assert any(p.name.startswith("events.out.tfevents.")
             for p in workdir.iterdir())
  log.resumed(2)
  assert [json.loads(l)["step"] for l in
          (workdir / "metrics.jsonl").read_text().splitlines()] == [2]
