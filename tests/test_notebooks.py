"""Executes the notebooks in notebooks/ with small settings; any cell error fails.

Small settings are injected papermill-style: a cell that overrides the
notebook's "parameters" cell is inserted right after it, so the notebooks run
unchanged otherwise. Each runs twice in a row (`run_twice`), as a user reruns
it: what the first run leaves (workdir, dataset, caches) must not change what
the second prints. The kernel is this interpreter (a kernel spec written to
a temporary JUPYTER_PATH), so a fresh virtualenv needs only ipykernel, not a
registered kernel.
"""

from __future__ import annotations

import functools
import http.server
import json
import pathlib
import re
import sys
import threading

import nbclient
import nbformat
import pytest

from mlimages_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_hierarchy_and_labels", "02_classify_and_extract", "03_train_demo")
KERNEL = "mlimages-jax-tests"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module) -> None:
  """A kernel spec that runs this interpreter, found through JUPYTER_PATH."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  # ipykernel is imported by the kernel process, so it must be installed.
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "mlimages-jax tests", "language": "python"}))
  monkeypatch_module.setenv("JUPYTER_PATH", str(root))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """One TFDS data dir for all notebooks: ml_images/synthetic builds once."""
  return tmp_path_factory.mktemp("tfds")


def run_notebook(name: str, overrides: dict[str, object]) -> nbformat.NotebookNode:
  """Executes notebooks/<name>.ipynb with `overrides` injected; returns it."""
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  tagged = [i for i, cell in enumerate(nb.cells)
            if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
  source = "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
      source, metadata={"tags": ["injected-parameters"]}))
  client = nbclient.NotebookClient(
      nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()  # Raises CellExecutionError (with the traceback) on error.
  return nb


def run_twice(name: str, overrides: dict[str, object]) -> str:
  """Runs the notebook twice in a row, each on a fresh kernel, as a user
  reruns it (the first run's workdir, dataset and caches left in place);
  returns the printed output, which must be the same both times but for
  the names of temporary folders and TFDS's report of the dataset it built
  (the rerun reuses it)."""
  first, second = (
      re.sub(r"mlimages_nb\d\d_\w+", "mlimages_nbNN_", re.sub(
          r".*(Downloading and preparing|downloaded and prepared).*\n", "",
          text_output(run_notebook(name, overrides), "stdout")))
      for _ in range(2))
  assert first == second
  return first


def text_output(nb: nbformat.NotebookNode, stream: str | None = None) -> str:
  """What the cells printed (only to `stream`, "stdout" or "stderr", if
  given)."""
  return "".join(out.get("text", "") for cell in nb.cells
                 if cell.cell_type == "code" for out in cell.get("outputs", [])
                 if stream is None or out.get("name") == stream)


def test_notebooks_are_committed_without_outputs():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == list(NAMES)
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, path.name
    # No badge to a guessed repository: the README says how to open it.
    assert "README's *Notebooks* section" in nb.cells[0].source


@pytest.fixture
def http_root(tmp_path):
  """A folder served over HTTP on 127.0.0.1: (folder, its base URL)."""
  root = tmp_path / "www"
  root.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(root))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield root, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


@pytest.mark.slow
def test_hierarchy_notebook_downloads_else_falls_back(kernel_env, tmp_path,
                                                      http_root):
  # No original files: the hierarchy is downloaded (and cached) ...
  root, url = http_root
  hierarchy = synthetic.synthetic_hierarchy()
  hierarchy.write(root / "hierarchy.txt")
  settings = {"shared_dir": str(tmp_path / "absent"),
              "hierarchy_url": f"{url}/hierarchy.txt",
              "cache_dir": str(tmp_path / "cache"), "subtree_query": "disc",
              "lookup_name": "red disc", "num_generated_images": 300}
  out = text_output(run_notebook("01_hierarchy_and_labels", settings))
  assert f"Hierarchy: downloaded from {url}/hierarchy.txt" in out
  assert (tmp_path / "cache" / "dictionary_and_semantic_hierarchy.txt"
          ).read_text() == (root / "hierarchy.txt").read_text()
  assert "categories named 'red disc': 1" in out
  assert "num_images: 300" in out
  # ... and without the file or a download, the synthetic one, said so.
  settings.update(download=False, lookup_name="crane")
  out = text_output(run_notebook("01_hierarchy_and_labels", settings))
  assert "FALLBACK: the built-in synthetic hierarchy" in out
  assert "'crane' is not in this hierarchy" in out


@pytest.mark.slow
def test_hierarchy_notebook_with_original_files(kernel_env, shared_dir):
  out = run_twice("01_hierarchy_and_labels", {
      "shared_dir": str(shared_dir), "download": False})
  assert "Hierarchy: the original file" in out
  assert "categories named 'crane': 2" in out
  assert "num_images: 100" in out


@pytest.mark.slow
def test_classify_notebook_trains_a_tiny_checkpoint(kernel_env, data_dir,
                                                    tmp_path):
  out = run_twice("02_classify_and_extract", {
      "workdir": str(tmp_path / "run"), "config_variant": "smoke",
      "train_steps": 2, "data_dir": str(data_dir),
      "shared_dir": str(tmp_path / "absent"),
      "num_sample_images": 2, "num_gallery_images": 8, "num_queries": 2,
      "num_neighbours": 2})
  assert "0 photos, 2 synthetic images" in out
  assert "classified 2 images, 0 failed" in out
  assert "features: 8 images x 256 dims" in out  # ResNet-14 at width 1/8.


@pytest.mark.slow
def test_train_notebook_trains_then_resumes(kernel_env, data_dir, tmp_path):
  out = run_twice("03_train_demo", {
      "workdir": str(tmp_path / "run"), "config_variant": "smoke",
      "num_train_steps": 3, "resume_steps": 2, "log_every_steps": 1,
      "eval_every_steps": 2,
      "data_dir": str(data_dir), "num_example_images": 4,
      "poll_seconds": 1.0})
  assert ("resumed from step 3, now at step 5; training steps logged after "
          "resuming: [4, 5]") in out
  assert "evaluations: [(2, " in out  # Mid-run evaluations are plotted too.
  assert (tmp_path / "run" / "checkpoints" / "5").is_dir()
