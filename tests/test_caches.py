"""Damaged cache entries (a kill during a write, a full disk, a bad copy) are rebuilt, never read."""

import glob
import hashlib
import json
import os

import numpy as np
import pytest

from flanjax.data import cache, tasks, vocab


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """A fresh cache folder for the test, and no in-process caches."""
  monkeypatch.setenv("FLANJAX_CACHE", str(tmp_path / "cache"))
  cache.clear_caches()
  yield tmp_path / "cache"
  cache.clear_caches()


DATA = [dict(question=f"What is {i} plus {i + 1}?", answer=str(2 * i + 1), rationale="Add them.")
        for i in range(60)]


def _probe():
  return tasks.TaskDef(name="damage_probe", load=lambda split: DATA, splits=("train",),
                       templates="cot_qa", train_formats=("few_shot_cot", "cot"),
                       fingerprint="damage-v1")


def _entry(cache_dir):
  (path,) = [p for p in glob.glob(str(cache_dir / "tasks" / "damage_probe" / "train-*"))
             if ".tmp" not in p and ".damaged" not in p]
  return path


def _same(a, b):
  for k in ("inputs", "inputs_splits", "targets", "targets_splits"):
    np.testing.assert_array_equal(np.asarray(getattr(a, k)), np.asarray(getattr(b, k)))
  assert a.texts == b.texts


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _garble(path):
  """Same size, different bytes in the middle: only a checksum tells."""
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])
  open(path, "wb").write(bytes(data))


def _npz_garbage_with_a_matching_manifest(entry):
  """tokens.npz is not a zip, and DONE vouches for it: the load itself must fail."""
  open(os.path.join(entry, "tokens.npz"), "wb").write(b"not a zip file at all")
  done = json.load(open(os.path.join(entry, "DONE")))
  done["files"]["tokens.npz"] = {"size": 21, "sha256": hashlib.sha256(b"not a zip file at all").hexdigest()}
  json.dump(done, open(os.path.join(entry, "DONE"), "w"))


def _splits_disagree_with_the_count(entry):
  done = json.load(open(os.path.join(entry, "DONE")))
  done["examples"] += 1
  json.dump(done, open(os.path.join(entry, "DONE"), "w"))


DAMAGE = {
    "truncated tokens.npz": lambda e: _truncate(os.path.join(e, "tokens.npz")),
    "truncated texts.jsonl": lambda e: _truncate(os.path.join(e, "texts.jsonl")),
    "garbled tokens.npz": lambda e: _garble(os.path.join(e, "tokens.npz")),
    "garbled texts.jsonl": lambda e: _garble(os.path.join(e, "texts.jsonl")),
    "truncated DONE": lambda e: _truncate(os.path.join(e, "DONE")),
    "no DONE": lambda e: os.remove(os.path.join(e, "DONE")),
    "no tokens.npz": lambda e: os.remove(os.path.join(e, "tokens.npz")),
    "npz that does not load": _npz_garbage_with_a_matching_manifest,
    "wrong example count": _splits_disagree_with_the_count,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_tokenized_split_is_rebuilt_with_a_note(damage, cache_dir, builtin_vocab, capsys):
  d = _probe()
  clean = tasks.tokenized_split(d, "train", builtin_vocab, 128)
  entry = _entry(cache_dir)
  assert sorted(os.listdir(entry)) == ["DONE", "texts.jsonl", "tokens.npz"]
  capsys.readouterr()
  DAMAGE[damage](entry)
  cache.clear_caches()  # as a new process would: read from disk
  rebuilt = tasks.tokenized_split(d, "train", builtin_vocab, 128)
  out = capsys.readouterr().out
  notes = [line for line in out.splitlines() if " is damaged (" in line]
  assert len(notes) == 1, out
  assert entry in notes[0] and "rebuilding" in notes[0] and "damage_probe/train" in notes[0]
  _same(clean, rebuilt)
  # The rebuilt entry is whole: read again without a note, equal to the clean build.
  cache.clear_caches()
  again = tasks.tokenized_split(d, "train", builtin_vocab, 128)
  assert " is damaged (" not in capsys.readouterr().out
  _same(clean, again)
  assert _entry(cache_dir) == entry
  left = os.listdir(os.path.dirname(entry))
  assert [n for n in left if ".tmp" in n or ".damaged" in n] == []


def test_an_entry_is_written_under_a_temporary_name_and_renamed(cache_dir, builtin_vocab):
  d = _probe()
  tasks.tokenized_split(d, "train", builtin_vocab, 128)
  entry = _entry(cache_dir)
  done = json.load(open(os.path.join(entry, "DONE")))
  assert done["examples"] == len(DATA)
  for name in ("tokens.npz", "texts.jsonl"):
    path = os.path.join(entry, name)
    assert done["files"][name] == {"size": os.path.getsize(path), "sha256": cache.sha256_file(path)}
  assert os.listdir(os.path.dirname(entry)) == [os.path.basename(entry)]


# ---------------------------------------------------------------- vocabulary

TEXTS = ["What is 12 plus 30?", "Reverse the order of this list: apple, pear, fig",
         "Is 7 even or odd?\nOPTIONS:\n- even\n- odd"]


def _model(cache_dir):
  (path,) = glob.glob(str(cache_dir / "vocab" / "builtin-600-*.model"))
  return path


@pytest.mark.parametrize("damage", ["garbled", "truncated", "truncated, no checksum"])
def test_a_damaged_vocabulary_is_trained_again_with_a_note(damage, tmp_path, capsys):
  clean = vocab.builtin_vocabulary(vocab_size=600, cache_dir=str(tmp_path))
  want = [clean.encode(t) for t in TEXTS]  # loads the model now, before it is damaged
  path = _model(tmp_path)
  assert os.path.exists(path + ".sha256")
  capsys.readouterr()
  (_garble if damage == "garbled" else _truncate)(path)
  if "no checksum" in damage:
    os.remove(path + ".sha256")  # as cached by an older version: the model must load
  again = vocab.builtin_vocabulary(vocab_size=600, cache_dir=str(tmp_path))
  out = capsys.readouterr().out
  notes = [line for line in out.splitlines() if " is damaged (" in line]
  assert len(notes) == 1 and path in notes[0] and "vocabulary builtin" in notes[0], out
  assert "vocabulary: trained 600 pieces" in out
  assert [again.encode(t) for t in TEXTS] == want
  vocab.check_cached_model(path)  # whole again, checksum included
  assert sorted(os.listdir(os.path.dirname(path))) == sorted(
      [os.path.basename(path), os.path.basename(path) + ".sha256"])


def test_a_whole_model_cached_without_a_checksum_is_kept(tmp_path, capsys):
  vocab.builtin_vocabulary(vocab_size=600, cache_dir=str(tmp_path))
  path = _model(tmp_path)
  before = open(path, "rb").read()
  os.remove(path + ".sha256")
  capsys.readouterr()
  v = vocab.builtin_vocabulary(vocab_size=600, cache_dir=str(tmp_path))
  out = capsys.readouterr().out
  assert "trained" not in out and " is damaged (" not in out
  assert open(path, "rb").read() == before and v.sp_model == before
  assert open(path + ".sha256").read().split()[0] == hashlib.sha256(before).hexdigest()
