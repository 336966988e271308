"""Every `mlimages ...` command the project mentions exists and parses.

Commands in README.md, the builder's README, the notebooks, docstrings,
comments and error messages are checked against the real parser
(`mlimages_jax.cli.build_parser`): commands in code blocks must parse in
full; mentions in prose and code must name existing (sub-)commands, and
backticked ones may leave out required arguments only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import re
import shlex

import pytest

from mlimages_jax.cli import build_parser

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKDOWN = [REPO / "README.md",
            REPO / "tfds_builder/ml_images/README.md"]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SOURCES = sorted(p for folder in ("mlimages_jax", "tfds_builder", "configs",
                                  "benchmarks")
                 for p in (REPO / folder).rglob("*.py")) + [REPO / "main.py"]

_BACKTICKED = re.compile(r"`(mlimages [^`]*)`")
# A mention in code: the words after `mlimages ` (a path of sub-commands).
_WORDS = re.compile(r"(?<![\w./-])mlimages((?: [a-z0-9][a-z0-9-]*)+)")


def _code_block_commands(text: str) -> list[str]:
  """`mlimages ...` lines of fenced code blocks, continuations joined and
  trailing comments and [optional] brackets removed."""
  commands = []
  for block in text.split("```")[1::2]:
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
      line = line.strip().lstrip("!$ ")
      if line.startswith("mlimages "):
        line = re.sub(r"\s#.*", "", line)
        commands.append(re.sub(r"[\[\]]", "", line))
  return commands


def _notebook_text(path: pathlib.Path) -> str:
  cells = json.loads(path.read_text())["cells"]
  return "\n".join("".join(cell["source"]) for cell in cells)


def _parse(words: list[str]) -> tuple[int, str]:
  """(exit status or 0, argparse's message) of parsing `words`."""
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(
        io.StringIO()):
      build_parser().parse_args(words)
  except SystemExit as e:
    return int(e.code or 0), err.getvalue()
  return 0, ""


def _subcommands(parser: argparse.ArgumentParser) -> dict | None:
  # pylint: disable=protected-access
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      return action.choices
  return None


def _path_problem(words: list[str]) -> str | None:
  """Why `mlimages <words...>` names no command, or None."""
  parser = build_parser()
  for word in words:
    choices = _subcommands(parser)
    if choices is None:  # A command: the rest are its arguments.
      return None
    if word not in choices:
      return f"no sub-command {word!r} (choices: {sorted(choices)})"
    parser = choices[word]
  return None


def _mentions() -> dict[str, list[tuple[str, str]]]:
  """kind -> [(where, command)]; kinds: block, backticked, code."""
  found: dict[str, list[tuple[str, str]]] = {"block": [], "backticked": [],
                                             "code": []}
  texts = [(p, p.read_text()) for p in MARKDOWN]
  texts += [(p, _notebook_text(p)) for p in NOTEBOOKS]
  for path, text in texts:
    where = str(path.relative_to(REPO))
    found["block"] += [(where, c) for c in _code_block_commands(text)]
    found["backticked"] += [(where, m) for m in _BACKTICKED.findall(text)]
  for path in SOURCES + NOTEBOOKS:
    text = path.read_text()
    found["code"] += [(str(path.relative_to(REPO)), "mlimages" + m)
                      for m in _WORDS.findall(text)]
  return found


MENTIONS = _mentions()


def test_the_mentions_are_found():
  """The scan sees the README's commands and the sources' messages."""
  assert len(MENTIONS["block"]) > 20
  assert ("README.md", "mlimages hierarchy stats --dictionary "
          "M/dictionary_and_semantic_hierarchy.txt") in MENTIONS["block"]
  assert len(MENTIONS["code"]) > 10


def test_a_missing_command_is_caught():
  assert "no sub-command 'acquire'" in _path_problem(["acquire"])
  assert "no sub-command 'agument'" in _path_problem(["labels", "agument"])
  assert _path_problem(["labels", "augment", "IN", "OUT"]) is None
  assert _parse(shlex.split("labels augment IN OUT --dictonary D"))[0] == 2


@pytest.mark.parametrize("where,command", MENTIONS["block"])
def test_code_block_commands_parse(where, command):
  status, message = _parse(shlex.split(command)[1:])
  assert status == 0, f"{where}: {command}\n{message}"


@pytest.mark.parametrize("where,command",
                         sorted(set(MENTIONS["backticked"] + MENTIONS["code"])))
def test_mentioned_commands_exist(where, command):
  words = [w for w in shlex.split(command.replace("...", " "))[1:]]
  path = []
  for word in words:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", word):
      break
    path.append(word)
  problem = _path_problem(path)
  assert problem is None, f"{where}: {command}: {problem}"
  status, message = _parse(words)
  assert status == 0 or "the following arguments are required" in message, (
      f"{where}: {command}\n{message}")
