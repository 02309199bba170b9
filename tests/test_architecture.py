"""The shape of the code (issue: one home per concept), checked so it stays that way."""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "flanjax"

# The decoding loops are one jit-compiled body each; splitting them hurts reading.
LONG_OK = {("decoding.py", "_beam_loop"), ("decoding.py", "_token_loop")}

# Comparisons with a kind's name, or isinstance checks on a model or config class.
KIND_BRANCH = re.compile(
    r"""(==|!=|\bin)\s*\(?\s*["'](enc_dec|prefix_lm|decoder|t5)["']"""
    r"""|isinstance\([^)]*\b(T5|Decoder)(Config)?\)""")
# The model kinds and the model files own what differs between kinds; packing builds
# each kind's row layout (as seqio's feature converters do).
KIND_HOMES = ("models/", "data/packing.py")


def _functions(path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_over_80_lines():
  long = [(str(p.relative_to(PKG)), name, n) for p in PKG.rglob("*.py")
          for name, n in _functions(p) if n > 80]
  assert [x for x in long if x[:2] not in LONG_OK] == []


def test_train_module_only_composes():
  assert len((PKG / "train.py").read_text().splitlines()) < 250


def test_only_the_kind_objects_and_model_files_branch_on_the_model_kind():
  found = []
  for p in PKG.rglob("*.py"):
    rel = str(p.relative_to(PKG))
    if rel.startswith(KIND_HOMES):
      continue
    for i, line in enumerate(p.read_text().splitlines(), 1):
      if KIND_BRANCH.search(line.split("#")[0]):
        found.append(f"{rel}:{i}: {line.strip()}")
  assert found == []


def test_the_run_folder_layout_is_spelled_in_one_module():
  names = ("run_info.json", "train_losses.jsonl", "summary.json", "eval_during_training.jsonl")
  found = []
  for p in PKG.rglob("*.py"):
    if p.name == "run_folder.py":
      continue
    text = p.read_text()
    found += [f"{p.relative_to(PKG)}: {n}" for n in names if f'"{n}"' in text]
  assert found == []
