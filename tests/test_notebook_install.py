"""Tests of notebooks/install.py and the notebooks' install cell and links."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

from packaging.requirements import Requirement
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location(
    "notebook_install", REPO / "notebooks" / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)
# The only external project the notebooks may link to: the original.
ORIGINAL = ("https://github.com/Tencent/tencent-ml-images",
            "https://raw.githubusercontent.com/Tencent/tencent-ml-images/")


def test_plan_keeps_what_is_installed_and_installs_the_rest():
  """A Colab-like environment: its tensorflow stands for tensorflow-cpu, its
  jax and opencv stay even outside the tested ranges."""
  needed = [Requirement(r) for r in (
      "jax>=0.10.2,<0.11", "tensorflow-cpu>=2.21,<2.22", "flax>=0.12,<0.13",
      "opencv-python-headless>=4.10", "tqdm>=4.66")]
  installed = {"jax": "0.7.2", "tensorflow": "2.21.0", "opencv-python": "4.9",
               "tqdm": "4.67.1"}
  kept, missing = install.plan(needed, installed)
  assert missing == ["flax<0.13,>=0.12"]
  assert kept == [
      "jax 0.7.2 (kept; this project is tested with jax<0.11,>=0.10.2)",
      "tensorflow 2.21.0",
      "opencv-python 4.9 (kept; this project is tested with "
      "opencv-python-headless>=4.10)",
      "tqdm 4.67.1"]


def test_requirements_are_the_runtime_and_notebook_ones():
  names = {r.name for r in install.requirements(REPO)}
  assert {"jax", "flax", "ipykernel", "aiohttp"} <= names
  assert "pytest" not in names
  # Exactly one TensorFlow distribution applies on any platform.
  assert len(names & {"tensorflow", "tensorflow-cpu"}) == 1


def _cells(path: pathlib.Path) -> list[dict]:
  return json.loads(path.read_text())["cells"]


def test_every_notebook_installs_through_install_py():
  first = ["".join(_cells(p)[1]["source"]) for p in NOTEBOOKS]
  assert len(set(first)) == 1, "the install cells differ"
  assert 'REPO / "notebooks" / "install.py"' in first[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_links_and_paths_lead_somewhere(path):
  text = "".join("".join(c["source"]) for c in _cells(path))
  for url in re.findall(r"https?://[^\s)\"'`\\]+", text):
    if "<" not in url:  # A template such as https://github.com/<owner>/...
      assert url.startswith(ORIGINAL), f"{path.name}: link to {url}"
  for rel in re.findall(r"`((?:configs|notebooks|mlimages_jax|benchmarks)/"
                        r"[\w./-]+?)(?::\w+)?`", text):
    assert (REPO / rel).exists(), f"{path.name}: {rel} does not exist"


@pytest.mark.slow
def test_install_keeps_a_different_jax(tmp_path):
  """In a venv that already has another jax, install.py keeps it and asks pip
  only for what is missing (a dry run: resolved, nothing installed)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  subprocess.run([sys.executable, "-m", "venv", "--upgrade-deps",
                  str(tmp_path / "venv")], check=True, capture_output=True)
  python = tmp_path / "venv" / "bin" / "python"
  subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                  "jax==0.10.1", "jaxlib==0.10.1"], check=True,
                 capture_output=True, env=env)
  result = subprocess.run(
      [str(python), str(REPO / "notebooks" / "install.py"), str(REPO),
       "--dry-run"], capture_output=True, text=True, env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "keeping jax 0.10.1 (kept; this project is tested with" in out
  assert "keeping jaxlib 0.10.1 (kept;" in out
  report, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
  planned = {item["metadata"]["name"].lower().replace("_", "-"):
             item["metadata"]["version"] for item in report["install"]}
  assert "jax" not in planned and "jaxlib" not in planned, planned
  assert {"flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
          "tensorflow-datasets", "ipykernel"} <= set(planned)
  version = subprocess.run(
      [str(python), "-c", "import importlib.metadata as m; "
       "print(m.version('jax'))"], capture_output=True, text=True,
      check=True).stdout.strip()
  assert version == "0.10.1"
