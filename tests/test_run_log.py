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
