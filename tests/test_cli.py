"""Tests for `mlimages hierarchy ...` and `mlimages labels ...`."""

from __future__ import annotations

import json
import pathlib
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from mlimages_jax.data import annotation_reader
from mlimages_jax.data import annotations
from mlimages_jax.data import closure
from mlimages_jax.data import cooccurrence
from mlimages_jax.cli import main
from mlimages_jax.data.hierarchy import HEADER, Hierarchy

# 5 "thing" -> 0 "animal" -> {2 "dog", 3 "cat"}; 2 -> 1 "puppy"; 4 -> 6.
ROWS = [(0, "n0", 5, "animal"), (1, "n1", 2, "puppy"), (2, "n2", 0, "dog"),
        (3, "n3", 0, "cat"), (4, "n4", -1, "matter"), (5, "n5", -1, "thing"),
        (6, "n6", 4, "water, H2O")]


@pytest.fixture(name="dictionary")
def fixture_dictionary(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "dictionary.txt"
  path.write_text("\n".join(["\t".join(HEADER)] + [
      "\t".join(str(c) for c in row) for row in ROWS]) + "\n")
  return path


def run(capsys, *argv) -> tuple[int, str, str]:
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_hierarchy_stats_json(capsys, dictionary):
  code, out, _ = run(capsys, "hierarchy", "stats", "--dictionary", dictionary,
                     "--json")
  assert code == 0
  stats = json.loads(out)
  assert stats["num_categories"] == 7 and stats["num_roots"] == 2
  assert stats["roots"] == ["matter", "thing"] and stats["num_leaves"] == 3
  assert stats["max_depth"] == 3
  assert stats["mean_depth"] == pytest.approx(9 / 7)
  assert stats["depth_histogram"] == {"0": 2, "1": 2, "2": 2, "3": 1}
  code, out, _ = run(capsys, "hierarchy", "stats", "--dictionary", dictionary)
  assert code == 0 and "7 categories, 2 roots, 3 leaves" in out


def test_hierarchy_errors(capsys, dictionary, tmp_path):
  broken = tmp_path / "broken.txt"
  broken.write_text(dictionary.read_text().replace("3\tn3\t0", "3\tn3\t3"))
  code, out, err = run(capsys, "hierarchy", "stats", "--dictionary", broken)
  assert code == 1 and out == ""
  assert f"{broken}:5: cycle" in err
  code, _, err = run(capsys, "hierarchy", "stats", "--dictionary",
                     tmp_path / "missing.txt")
  assert code == 1 and "missing.txt" in err
  code, _, err = run(capsys, "hierarchy", "show", "zebra", "--dictionary",
                     dictionary)
  assert code == 1 and "no class matches 'zebra'" in err
  latin = tmp_path / "latin.txt"
  latin.write_bytes(dictionary.read_bytes().replace(b"water", b"w\xe4ter"))
  code, out, err = run(capsys, "hierarchy", "stats", "--dictionary", latin)
  assert (code, out) == (1, "")
  assert err == (f"error: {latin}:8: not UTF-8: byte 0xe4 at column 9 "
                 "(b'6\\tn6\\t4\\tw\\xe4ter, H2O\\n')\n")


def test_hierarchy_show(capsys, dictionary):
  code, out, _ = run(capsys, "hierarchy", "show", "puppy", "--dictionary",
                     dictionary)
  assert code == 0
  lines = out.splitlines()
  assert lines[0] == "1\tn1\tpuppy\t(depth 3)"
  assert lines[2:6] == ["  1\tn1\tpuppy", "  2\tn2\tdog", "  0\tn0\tanimal",
                        "  5\tn5\tthing"]
  assert lines[6] == "children: 0"
  code, out, _ = run(capsys, "hierarchy", "show", "n0", "--dictionary",
                     dictionary)
  assert "children: 2\n  2\tn2\tdog\n  3\tn3\tcat\n" in out
  code, out, _ = run(capsys, "hierarchy", "show", "H2O", "--dictionary",
                     dictionary)
  assert out.startswith("6\tn6\twater, H2O")


def test_labels_augment(capsys, dictionary, tmp_path):
  inp = tmp_path / "in.txt"
  inp.write_text("b.jpg 1:0.8 3:0.9\na.jpg 6\nc.jpg 4:-1\n")
  out = tmp_path / "out.txt"
  code, stdout, _ = run(capsys, "labels", "augment", inp, out,
                        "--dictionary", dictionary)
  assert code == 0 and "augmented 3 rows" in stdout
  assert out.read_text() == ("b.jpg\t0:0.9\t1:0.8\t2:0.8\t3:0.9\t5:0.9\n"
                             "a.jpg\t4:1\t6:1\nc.jpg\t4:-1\n")
  code, stdout, _ = run(capsys, "labels", "augment", inp, out,
                        "--dictionary", dictionary, "--workers", "2")
  assert code == 0 and "augmented 3 rows" in stdout
  assert out.read_text().startswith("b.jpg\t0:0.9\t1:0.8\t2:0.8\t3:0.9")
  pairs = tmp_path / "pairs.tsv"
  pairs.write_text("source_index\ttarget_index\tconfidence\n6\t3\t0.7\n")
  code, _, _ = run(capsys, "labels", "augment", inp, out, "--dictionary",
                   dictionary, "--cooccurrence", pairs)
  assert code == 0
  assert out.read_text().splitlines()[1] == (
      "a.jpg\t0:0.7\t3:0.7\t4:1\t5:0.7\t6:1")


def test_labels_augment_bad_input(capsys, dictionary, tmp_path):
  inp = tmp_path / "in.txt"
  inp.write_text("a 1\nb 9:1\nc 2:1\n")
  out = tmp_path / "out" / "o.txt"
  code, stdout, err = run(capsys, "labels", "augment", inp, out,
                          "--dictionary", dictionary)
  assert code == 1 and stdout == ""
  assert f"{inp}:2: class index 9 out of range 0..6" in err
  assert not out.exists()
  code, stdout, err = run(capsys, "labels", "augment", inp, out,
                          "--dictionary", dictionary, "--skip-invalid")
  assert code == 0 and "1 invalid line(s) skipped" in stdout
  assert "skipped 1 invalid line(s)" in err and f"{inp}:2:" in err
  assert [line.split("\t")[0] for line in out.read_text().splitlines()] == [
      "a", "c"]


def test_labels_remap(capsys, dictionary, tmp_path):
  mapping = tmp_path / "map.tsv"
  mapping.write_text("/m/dog\t2\n/m/cat\t3\n")
  inp = tmp_path / "oi.txt"
  inp.write_text("u1\t/m/dog:0.9\t/m/car:1\nu2\t/m/car\n")
  out = tmp_path / "out.txt"
  code, stdout, _ = run(capsys, "labels", "remap", inp, out, "--mapping",
                        mapping, "--dictionary", dictionary)
  assert code == 0 and out.read_text() == "u1\t2:0.9\n"
  assert "2 rows -> 1" in stdout and "/m/car (2)" in stdout
  mapping.write_text("/m/dog\t17\n")
  code, _, err = run(capsys, "labels", "remap", inp, out, "--mapping", mapping,
                     "--dictionary", dictionary)
  assert code == 1 and f"{mapping}:1: ML-Images index 17" in err


def test_labels_cooccurrence(capsys, dictionary, tmp_path):
  # 30 images of "cat" (3) that show "water" (6) and 90 of "puppy" (1).
  scores = np.full((120, 2), 0.05, np.float32)
  scores[:30, 1] = 0.9
  np.save(tmp_path / "scores.npy", scores)
  (tmp_path / "images.txt").write_text("".join(
      f"i{n}\t{3 if n < 30 else 1}:1\n" for n in range(120)))
  (tmp_path / "columns.txt").write_text("2\n6\n")
  out = tmp_path / cooccurrence.PAIRS_FILE_NAME
  code, stdout, _ = run(
      capsys, "labels", "cooccurrence", "--scores", tmp_path / "scores.npy",
      "--images", tmp_path / "images.txt", "--columns",
      tmp_path / "columns.txt", "--dictionary", dictionary, "--out", out)
  assert code == 0 and stdout.startswith("1 pairs")
  pairs = cooccurrence.load_cooccurrence_pairs(out, 7)
  assert pairs.sources.tolist() == [3] and pairs.targets.tolist() == [6]
  assert pairs.confidences.tolist() == [np.float32(0.9)]
  (tmp_path / "columns.txt").write_text("2\n")
  code, _, err = run(
      capsys, "labels", "cooccurrence", "--scores", tmp_path / "scores.npy",
      "--images", tmp_path / "images.txt", "--columns",
      tmp_path / "columns.txt", "--dictionary", dictionary, "--out",
      tmp_path / "p2.tsv")
  assert code == 1 and "1 column classes for 2 score columns" in err
  assert not (tmp_path / "p2.tsv").exists()


def test_labels_stats(capsys, dictionary, tmp_path):
  (tmp_path / "a.txt").write_text("a 1:1 2:1\nb 2:0.8 6:-1\n")
  (tmp_path / "b.txt").write_text("c 3\n")
  out = tmp_path / "stats"
  code, stdout, _ = run(capsys, "labels", "stats", tmp_path / "a.txt",
                        tmp_path / "b.txt", "--dictionary", dictionary,
                        "--out", out)
  assert code == 0
  summary = json.loads((out / "stats.json").read_text())
  assert summary["num_images"] == 3 and summary["num_classes"] == 3
  assert summary["num_trainable_classes"] == 0
  assert summary["avg_tags_per_image"] == pytest.approx(4 / 3)
  assert summary["avg_images_per_class"] == pytest.approx(4 / 3)
  assert json.loads(stdout.splitlines()[0])["num_images"] == 3
  assert sorted(p.name for p in out.iterdir()) == [
      "hist_num_annotations.png", "num_images_per_class.png", "stats.json"]


def test_real_files_through_a_subprocess(shared_dir, real_hierarchy_path,
                                         tmp_path):
  """`python -m mlimages_jax` and the `mlimages` script, as a user runs them."""
  out = tmp_path / "closed.txt"
  done = subprocess.run(
      [sys.executable, "-m", "mlimages_jax", "labels", "augment",
       str(shared_dir / "train_urls_tiny.txt"), str(out), "--dictionary",
       str(real_hierarchy_path)], capture_output=True, text=True, check=True)
  assert "augmented 100 rows" in done.stdout
  tree = Hierarchy.from_file(real_hierarchy_path)
  closed = out.read_text().splitlines()
  assert sum(line.count("\t") for line in closed) == 1103  # From 827 labels.
  for (key, idx, conf), line in zip(
      annotation_reader.read_annotation_file(
          shared_dir / "train_urls_tiny.txt"), closed):
    assert line == annotations.format_line(
        key, *closure.augment(tree, idx, conf))
  script = shutil.which("mlimages") or str(
      pathlib.Path(sys.executable).parent / "mlimages")
  done = subprocess.run([script, "hierarchy", "stats", "--json",
                         "--dictionary", str(real_hierarchy_path)],
                        capture_output=True, text=True, check=True)
  stats = json.loads(done.stdout)
  assert stats["num_categories"] == 11166 and stats["num_roots"] == 4
  assert stats["roots"] == ["thing", "matter", "object, physical object",
                            "atmospheric phenomenon"]


@pytest.mark.parametrize("command", [
    ["augment", "{a}", "{dictionary}", "--dictionary", "{dictionary}"],
    ["augment", "{a}", "{tmp}", "--dictionary", "{dictionary}"],
    ["remap", "{a}", "{map}", "--mapping", "{map}", "--dictionary",
     "{dictionary}"],
    ["cooccurrence", "--scores", "{tmp}/s.npy", "--images", "{a}",
     "--columns", "{map}", "--dictionary", "{dictionary}", "--out", "{a}"],
    ["stats", "{a}", "{tmp}/stats.json", "--dictionary", "{dictionary}",
     "--out", "{tmp}"]])
def test_labels_never_write_over_their_inputs(capsys, dictionary, tmp_path,
                                              command):
  """An output that is (or holds) an input: one-line error, input intact."""
  (tmp_path / "a.txt").write_text("a 1\n")
  (tmp_path / "map.tsv").write_text("/m/dog\t2\n")
  (tmp_path / "stats.json").write_text("a 2\n")  # A list of that name.
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  code, stdout, err = run(capsys, "labels", *[arg.format(
      a=tmp_path / "a.txt", dictionary=dictionary, tmp=tmp_path,
      map=tmp_path / "map.tsv") for arg in command])
  assert code == 1 and stdout == ""
  assert "refusing to write over an input" in err and err.count("\n") == 1
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_labels_augment_in_place_keeps_the_files_mode(capsys, dictionary,
                                                      tmp_path):
  """INPUT = OUTPUT is a rewrite: allowed, and the list stays 0644."""
  inp = tmp_path / "in.txt"
  inp.write_text("a.jpg 1\n")
  inp.chmod(0o644)
  code, _, _ = run(capsys, "labels", "augment", inp, inp, "--dictionary",
                   dictionary)
  assert code == 0
  assert inp.read_text() == "a.jpg\t0:1\t1:1\t2:1\t5:1\n"
  assert stat.S_IMODE(inp.stat().st_mode) == 0o644


@pytest.mark.parametrize("command", [
    ["classify", "x.jpg"], ["features", "x.jpg", "--out", "{tmp}/f.npy"],
    ["evaluate", "--dataset", "synth_shapes", "--workdir", "{tmp}/eval"],
    ["fewshot", "--dataset", "synth_shapes"],
    ["export", "--format", "pytorch", "--out", "{tmp}/export"],
])
def test_a_checkpoint_that_is_a_file_is_one_line(capsys, tmp_path, command):
  """Each command that loads --checkpoint: exit 1, one line naming it."""
  a_file = tmp_path / "model.ckpt"
  a_file.write_text("")
  code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in command],
                       "--checkpoint", a_file)
  assert code == 1 and out == ""
  assert (f"error: {a_file} is a file, not a checkpoint folder: give a "
          "training workdir, one of its step folders or an inference "
          "checkpoint folder") in err
  assert "Traceback" not in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.parametrize("command", [
    ["classify", "x.jpg", "--checkpoint", "ckpt"],
    ["features", "x.jpg", "--checkpoint", "ckpt"],
    ["fewshot", "--checkpoint", "ckpt", "--dataset", "synth_shapes"],
    ["labels", "cooccurrence"],
    ["dedup", "images"],
])
def test_an_out_file_that_is_a_folder_is_refused_at_once(capsys, tmp_path,
                                                         command):
  with pytest.raises(SystemExit, match="2"):
    main([*command, "--out", str(tmp_path)])
  assert (f"error: argument --out: {tmp_path} is a folder; give a file path"
          in capsys.readouterr().err)
