"""Packaging: the lock, the wheel alone in a fresh venv, other platforms.

pyproject.toml says what the code needs (ranges); requirements.txt is the
exact lock CI installs. These tests check that the lock is exactly the
transitive closure of pyproject's requirements, that the wheel alone (no
requirements.txt) installs into a fresh virtual environment and runs every
command, and that pip resolves its dependencies for the platforms we cannot
run here (Linux aarch64, macOS arm64) and the README's GPU and TPU lines.
They need the package index (PyPI), as CI's own install does.
"""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

from acquire_helpers import make_jpeg

REPO = pathlib.Path(__file__).resolve().parents[1]
# Pure-Python dependencies published only as source archives: a cross-platform
# resolution (--only-binary=:all:) needs them as wheels, which are built here
# and must come out platform-independent (py3-none-any).
SDIST_ONLY = ("jsonpath-rw", "promise")  # (mlcroissant's, tensorflow-datasets')
_MANYLINUX = [f"manylinux_2_{minor}" for minor in range(35, 16, -1)] + [
    "manylinux2014"]
PLATFORMS = {
    "linux-x86_64": [f"{tag}_x86_64" for tag in _MANYLINUX],
    "linux-aarch64": [f"{tag}_aarch64" for tag in _MANYLINUX],
    "macos-arm64": ["macosx_14_0_arm64"],  # pip adds 13, 12, 11, universal2.
}
# pip evaluates environment markers for the machine it runs on, whatever
# --platform says, so the wheel's own requirements are evaluated here for the
# target and passed without markers. (Markers deeper in the tree are still
# evaluated for this machine: a limit of any cross-platform pip resolution.)
MARKER_ENVIRONMENTS = {
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux",
                      "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_system": "Darwin",
                    "platform_machine": "arm64"},
}


def _lock() -> dict[str, str]:
  """requirements.txt as {canonical name: pinned version}."""
  pins = {}
  for line in (REPO / "requirements.txt").read_text().splitlines():
    if line.strip() and not line.startswith("#"):
      name, version = line.split("==")
      pins[canonicalize_name(name)] = version.strip()
  return pins


def _pyproject_requirements(*extras: str) -> list[Requirement]:
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  lines = list(project["dependencies"])
  for extra in extras:
    lines += project["optional-dependencies"][extra]
  return [Requirement(line) for line in lines
          if canonicalize_name(Requirement(line).name) != "mlimages-jax"]


def _installed_closure(roots: list[Requirement]) -> set[str]:
  """Every installed distribution `roots` need here, transitively."""
  seen: dict[str, set[str]] = {}
  stack = list(roots)
  while stack:
    req = stack.pop()
    name = canonicalize_name(req.name)
    if req.marker and not req.marker.evaluate({"extra": ""}):
      continue
    if name in seen and set(req.extras) <= seen[name]:
      continue
    extras = seen.setdefault(name, set())
    extras.update(req.extras)
    for line in importlib.metadata.requires(name) or []:
      dep = Requirement(line)
      if dep.marker is None or any(dep.marker.evaluate({"extra": e})
                                   for e in ("", *extras)):
        dep.marker = None
        stack.append(dep)
  return set(seen)


def test_lock_is_the_closure_of_what_pyproject_needs():
  """Every requirement (runtime, notebooks, test) is pinned within its
  range, this environment runs exactly the pins, and the lock holds their
  transitive dependencies and nothing else."""
  lock = _lock()
  roots = _pyproject_requirements("notebooks", "test")
  env = default_environment()
  for req in roots:
    if req.marker and not req.marker.evaluate(env):
      continue
    name = canonicalize_name(req.name)
    assert name in lock, f"{req} is not in requirements.txt"
    assert req.specifier.contains(lock[name], prereleases=True), (
        f"requirements.txt pins {name}=={lock[name]}, outside {req}")
  for name, version in lock.items():
    assert importlib.metadata.version(name) == version, name
  closure = _installed_closure(roots)
  assert not closure - set(lock), f"not in the lock: {closure - set(lock)}"
  assert not set(lock) - closure, f"needed by nothing: {set(lock) - closure}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """The wheel, built from a copy of the sources (the checkout stays clean)."""
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  for name in ("mlimages_jax", "tfds_builder"):
    shutil.copytree(REPO / name, src / name,
                    ignore=shutil.ignore_patterns("__pycache__"))
  dist = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                 check=True, capture_output=True)
  return next(dist.glob("mlimages_jax-*.whl"))


def _checkout_files(folder: str, pattern: str, prefix: str) -> set[str]:
  """The files of `folder` but test data, as the wheel would name them."""
  paths = [p.relative_to(REPO / folder) for p in (REPO / folder).rglob(pattern)
           if p.is_file()]
  return {prefix + p.as_posix() for p in paths
          if not {"__pycache__", "dummy_data"} & set(p.parts)}


def test_wheel_installs_only_our_package(wheel):
  """Every module of the package, and the TFDS builders of tfds_builder/
  (all their files but the test data) as mlimages_jax.datasets.<name>."""
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {n.split("/")[0] for n in names} == {
      "mlimages_jax", wheel.name.split("-py3")[0] + ".dist-info"}
  wanted = (_checkout_files("mlimages_jax", "*.py", "mlimages_jax/") |
            _checkout_files("tfds_builder", "*", "mlimages_jax/datasets/"))
  assert "mlimages_jax/datasets/ml_images/checksums.tsv" in wanted
  assert not wanted - names, f"not in the wheel: {sorted(wanted - names)}"
  assert not [n for n in names if "/dummy_data/" in n or "/tests/" in n]


def _venv(path: pathlib.Path) -> pathlib.Path:
  """A fresh venv with a current pip (metadata-only dry runs); its python."""
  subprocess.run([sys.executable, "-m", "venv", "--upgrade-deps", str(path)],
                 check=True, capture_output=True)
  return path / "bin" / "python"


def _clean_env() -> dict[str, str]:
  """The environment without our checkout on the import path."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args) -> None:
    del args


@pytest.mark.slow
def test_wheel_alone_installs_and_runs_every_command(wheel, tmp_path):
  """`pip install <wheel>` into a fresh venv, then each command once."""
  python = _venv(tmp_path / "venv")
  bin_dir = python.parent
  env = _clean_env()
  start = time.perf_counter()
  # --no-compile: byte-compiling TensorFlow's sources alone takes minutes.
  subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile",
                  str(wheel)], check=True, capture_output=True, env=env)
  print(f"runtime install: {time.perf_counter() - start:.0f} s")

  def run(*command, cwd=tmp_path) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (command, result.stdout[-2000:],
                                    result.stderr[-3000:])
    return result.stdout

  # The package and the builder it ships (found, not run: no TensorFlow).
  code = ("import importlib.util as u\n"
          "for m in ('mlimages_jax', 'mlimages_jax.datasets.ml_images'):\n"
          "  print(u.find_spec(m).origin)\n")
  locations = run(python, "-c", code).split()
  assert len(locations) == 2 and all(
      p.startswith(str(tmp_path / "venv")) for p in locations), locations
  dummy = REPO / "tfds_builder/ml_images/dummy_data"
  dictionary = dummy / "dictionary_and_semantic_hierarchy.txt"
  mlimages = bin_dir / "mlimages"

  stats = json.loads(run(mlimages, "hierarchy", "stats", "--dictionary",
                         dictionary, "--json"))
  num_classes = len(dictionary.read_text().splitlines()) - 1
  assert stats["num_categories"] == num_classes

  closed = tmp_path / "closed.txt"
  run(mlimages, "labels", "augment", dummy / "openimages/train/im_list.txt",
      closed, "--dictionary", dictionary)
  assert len(closed.read_text().splitlines()) == len(
      (dummy / "openimages/train/im_list.txt").read_text().splitlines())

  served = tmp_path / "web"
  (served / "farm1").mkdir(parents=True)
  for i in range(3):
    (served / "farm1" / f"{i}.jpg").write_bytes(make_jpeg(i))
  handler = functools.partial(_QuietHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    base = f"http://127.0.0.1:{server.server_address[1]}/farm1"
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{base}/{i}.jpg\t{i}:1\n" for i in range(3)))
    run(mlimages, "download", urls, "--out", tmp_path / "downloaded",
        "--no-progress")
  finally:
    server.shutdown()
  for i in range(3):
    assert (tmp_path / "downloaded/images" / f"farm1_{i}.jpg").read_bytes() == (
        make_jpeg(i))

  data_dir = tmp_path / "tfds"
  run(bin_dir / "tfds", "build", "ml_images",
      "--imports=mlimages_jax.datasets.ml_images", "--config=synthetic",
      f"--data_dir={data_dir}")
  assert list(data_dir.glob("ml_images/synthetic/*/dataset_info.json"))

  # Training is main.py with a recipe: scripts of a checkout, not of the wheel.
  scripts = tmp_path / "scripts"
  shutil.copytree(REPO / "configs", scripts / "configs",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(REPO / "main.py", scripts / "main.py")
  workdir = tmp_path / "run"
  run(python, "main.py", "--config=configs/pretrain.py:smoke",
      f"--workdir={workdir}", f"--config.data_dir={data_dir}",
      "--config.num_train_steps=2", "--config.num_eval_examples=64",
      cwd=scripts)
  assert list((workdir / "checkpoints").iterdir())

  image = tmp_path / "photo.jpg"
  image.write_bytes(make_jpeg(7, size=(64, 64)))
  out = run(mlimages, "classify", image, "--checkpoint", workdir,
            "--top-k", "3")
  lines = out.splitlines()
  assert lines[0].endswith("photo.jpg")
  assert [line.split(".")[0].strip() for line in lines[1:4]] == ["1", "2", "3"]


def _resolve_command(python: pathlib.Path, platform: str, report: pathlib.Path,
                     *requirements: str) -> list[str]:
  command = [str(python), "-m", "pip", "install", "--dry-run", "-q",
             "--ignore-installed", "--only-binary=:all:",
             "--python-version", "3.11", "--target", str(report.parent / "t"),
             "--report", str(report)]
  for tag in PLATFORMS[platform]:
    command += ["--platform", tag]
  return command + list(requirements)


def _wheel_requirements(wheel: pathlib.Path, environment: dict[str, str]
                        ) -> list[str]:
  """The wheel's runtime requirements that apply in `environment`, as
  requirement strings without markers."""
  with zipfile.ZipFile(wheel) as archive:
    metadata = archive.read(next(n for n in archive.namelist()
                                 if n.endswith(".dist-info/METADATA")))
  environment = dict(environment, python_version="3.11",
                     python_full_version="3.11.0", extra="")
  needed = []
  for line in metadata.decode().splitlines():
    if line.startswith("Requires-Dist: "):
      req = Requirement(line.split(": ", 1)[1])
      if req.marker is None or req.marker.evaluate(environment):
        req.marker = None
        needed.append(str(req))
  return needed


def _accelerator_lines() -> list[str]:
  """The README's `pip install` lines for GPUs and TPUs (after a marker)."""
  text = (REPO / "README.md").read_text()
  block = text.split("<!-- accelerator-install -->", 1)[1].split("```")[1]
  return [line.split("#")[0].strip() for line in block.splitlines()
          if line.startswith("pip install")]


@pytest.mark.slow
def test_dependencies_resolve_for_other_platforms_and_accelerators(
    wheel, tmp_path):
  """pip resolves, without installing, for platforms CI does not run on:
  the wheel for Linux aarch64 and macOS arm64, and the README's GPU (also on
  aarch64: Grace-Hopper) and TPU lines on top of the exact lock."""
  python = _venv(tmp_path / "venv")
  house = tmp_path / "wheelhouse"
  lock = _lock()
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                  "--no-build-isolation", "-w", str(house),
                  *(f"{name}=={lock[name]}" for name in SDIST_ONLY)],
                 check=True, capture_output=True)
  built = sorted(p.name for p in house.glob("*.whl"))
  assert len(built) == len(SDIST_ONLY)
  assert all(name.endswith("-none-any.whl") for name in built), built
  lines = _accelerator_lines()
  assert len(lines) == 2, lines
  jobs = {}  # name -> (platform, requirements)
  for platform, environment in MARKER_ENVIRONMENTS.items():
    # The wheel itself is pure Python: its requirements are what resolve.
    jobs[f"wheel on {platform}"] = (platform, [
        "--find-links", str(house), *_wheel_requirements(wheel, environment)])
  for line in lines:
    requirement = re.fullmatch(r'pip install "(jax\[(\w+)\]==(\S+))"', line)
    assert requirement, f"unexpected README line: {line}"
    assert requirement.group(3) == lock["jax"], (
        f"{line} does not name the locked jax {lock['jax']}")
    kind = requirement.group(2)
    for platform in (["linux-x86_64", "linux-aarch64"] if kind != "tpu"
                     else ["linux-x86_64"]):
      jobs[f"{line} on {platform}"] = (platform, [
          requirement.group(1), "-c", str(REPO / "requirements.txt")])
  running = {}
  for i, (name, (platform, requirements)) in enumerate(jobs.items()):
    report = tmp_path / f"job{i}" / "report.json"
    report.parent.mkdir()
    # Concurrently: each waits on the index far more than it computes.
    running[name] = (report, subprocess.Popen(
        _resolve_command(python, platform, report, *requirements),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_clean_env()))
  problems, resolved = [], {}
  for name, (report, process) in running.items():
    output = process.communicate(timeout=900)[0]
    if process.returncode:
      problems.append(f"{name}: {output[-1500:]}")
      continue
    resolved[name] = {canonicalize_name(item["metadata"]["name"]): (
        item["metadata"]["version"], item["download_info"]["url"])
                      for item in json.loads(report.read_text())["install"]}
  assert not problems, "\n".join(problems)
  for name, dists in resolved.items():
    print(name, len(dists), "distributions")
    if name.startswith("wheel on"):
      assert "tensorflow" in dists and "tensorflow-cpu" not in dists, name
      tag = "aarch64" if "aarch64" in name else "macosx"
      for native in ("tensorflow", "jaxlib", "numba", "opencv-python-headless"):
        assert tag in dists[native][1], (name, dists[native])
    else:
      assert dists["jax"][0] == lock["jax"], name
      for dist, (version, _) in dists.items():  # The lock stays as tested.
        assert lock.get(dist, version) == version, (name, dist, version)
      expected = "libtpu" if "tpu" in name else "jax-cuda12-plugin"
      assert expected in dists, (name, sorted(dists))
