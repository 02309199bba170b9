"""TFDS-backed FLAN 2021 tasks on tfds.testing.mock_data: no prepared data, no network.

mock_data builds random examples from each builder's feature spec (its code;
tfds ships no metadata for these sets), so every split holds the same few
examples and labels are always valid: unlabelled (-1) examples are fed by a
hand-made dataset instead.
"""

import gin
import numpy as np
import pytest
import seqio

from flanjax.data import tasks, templates
from flanjax.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")
from flanjax.data.collections import tfds_tasks  # noqa: E402

NUM_EXAMPLES = 4  # > num_shots, so each few-shot prompt must leave the asked example out
LAYOUTS = tuple(templates.OPTION_LAYOUTS)


@pytest.fixture
def mocked():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    yield


# One set of TaskDefs for the module: tasks.raw_examples caches each split per TaskDef.
DEFS = {d.name: d for d in tfds_tasks.task_defs()}
SOURCES = {s.task: s for s in tfds_tasks.SOURCES}


def _formats(d):
  return list(dict.fromkeys([*d.train_formats, d.eval_format]))


def test_at_least_ten_tasks_each_with_a_family_of_eight_templates():
  assert len(DEFS) >= 10
  assert len(DEFS) == len(tfds_tasks.SOURCES)  # names are unique
  for name, d in DEFS.items():
    assert name.startswith("tfds_")
    temps = d.template_list()
    assert len(temps) >= 8, d.templates
    assert len({t.inputs for t in temps}) == len(temps), f"{d.templates}: duplicate templates"
    assert set(d.splits) >= {"train", "validation"}
    assert d.is_eval_only("validation") and not d.is_eval_only("train")
    classify = any(f.endswith("options") for f in _formats(d))
    assert d.eval_format == ("zero_shot_options" if classify else "zero_shot")


@pytest.mark.parametrize("name", sorted(DEFS))
def test_every_template_and_format_renders(name, mocked):
  d = DEFS[name]
  for split in d.splits:
    examples = tasks.raw_examples(d, split)
    assert len(examples) == NUM_EXAMPLES, split
    for i, ex in enumerate(examples):
      opts = ex.get("options")
      if opts:
        assert ex["answer"] in opts
      shots = [e for j, e in enumerate(examples) if j != i][:d.num_shots]
      for t in d.template_list():
        for fmt in _formats(d):
          for layout in LAYOUTS:
            inputs, targets = templates.render(t, ex, fmt, shots if fmt.startswith("few") else (),
                                               options_layout=layout)
            assert targets == ex["answer"]
            assert inputs and "{" not in inputs
            if opts:
              block = templates.render_options(opts, layout)
              assert (block in inputs) == fmt.endswith("options"), (fmt, inputs)
  if not any(f.endswith("options") for f in _formats(d)):
    assert all("options" not in ex for ex in tasks.raw_examples(d, "train"))


def _markers(pool, fields):
  """Per example, the longest field the template shows that differs between all examples."""
  keys = [k for k in fields if k != "answer" and isinstance(pool[0].get(k), str)
          and len({ex[k] for ex in pool}) == len(pool)]
  assert keys, fields
  return [max((ex[k] for k in keys), key=len) for ex in pool]


@pytest.mark.parametrize("name", sorted(DEFS))
def test_few_shot_exemplars_never_repeat_the_example_asked(name, mocked):
  d = DEFS[name]
  pool = tasks.raw_examples(d, "train")
  temps = d.template_list()
  for fmt in (f for f in d.train_formats if f.startswith("few_shot")):
    for i, rec in enumerate(tasks.render_split(d, "train", fmt=fmt)):
      assert rec["format"] == fmt
      marks = _markers(pool, temps[rec["template"]].fields())
      assert rec["inputs"].count(marks[i]) == 1, rec["inputs"]
      shown = [m for j, m in enumerate(marks) if j != i and m in rec["inputs"]]
      assert len(shown) == min(d.num_shots, len(pool) - 1)
      # The example asked comes last, after its exemplars.
      assert all(rec["inputs"].index(m) < rec["inputs"].index(marks[i]) for m in shown)


@pytest.mark.parametrize("name", sorted(DEFS))
def test_registered_task_yields_tokenized_examples(name, mocked, builtin_vocab):
  tasks.register(DEFS[name], builtin_vocab)
  task = seqio.get_mixture_or_task(name)
  for split in ("train", "validation"):
    rows = list(task.get_dataset({"inputs": 256, "targets": 32}, split=split, shuffle=False,
                                 use_cached=False).as_numpy_iterator())
    assert len(rows) == NUM_EXAMPLES
    for r in rows:
      assert r["inputs"].dtype == np.int32 and 1 < len(r["inputs"]) <= 256
      assert 0 < len(r["targets"]) <= 32
      assert r["targets"][-1] == builtin_vocab.eos_id or len(r["targets"]) == 32
      assert r["task"].decode() == name
      if split == "validation":
        assert r["targets_pretokenized"].decode() == r["answer"].decode()


def _hand_made(self, split, decoders=None, read_config=None, **kwargs):
  del decoders, read_config, kwargs
  if self.name == "snli":
    return tf.data.Dataset.from_tensor_slices({
        "premise": ["p0", "p1", "p2", "p3", "p4"], "hypothesis": ["h0", "h1", "h2", "h3", "h4"],
        "label": np.array([0, -1, 2, -1, 1], np.int64)})
  assert self.builder_config.name == "cb", self.name
  return tf.data.Dataset.from_tensor_slices({
      "premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"],
      "idx": np.arange(3, dtype=np.int32), "label": np.array([0, 1, 2], np.int64)})


def test_unlabelled_examples_are_skipped_with_a_count(capsys):
  with tfds.testing.mock_data(as_dataset_fn=_hand_made):
    snli = tfds_tasks.load(SOURCES["tfds_snli"], "train")
    cb = tfds_tasks.load(SOURCES["tfds_cb"], "validation")
  assert [(e["premise"], e["answer"]) for e in snli] == [
      ("p0", "yes"), ("p2", "no"), ("p4", "not enough information")]
  assert snli[0]["options"] == ["yes", "not enough information", "no"]
  out = capsys.readouterr().out
  assert "tfds_snli/train" in out and "kept 3, skipped 2 unlabelled (label -1)" in out
  # CB orders its labels entailment, contradiction, neutral: the text follows the label.
  assert [e["answer"] for e in cb] == ["yes", "no", "not enough information"]
  assert cb[0]["options"] == snli[0]["options"]


@pytest.fixture
def empty_data_dir(tmp_path):
  gin.bind_parameter("tfds_data_dir.path", str(tmp_path))
  try:
    yield str(tmp_path)
  finally:
    gin.bind_parameter("tfds_data_dir.path", None)


def test_missing_dataset_is_a_one_line_error_naming_the_fix(empty_data_dir):
  d = tfds_tasks.task_defs()[0]  # a fresh TaskDef: nothing cached
  with pytest.raises(UserError) as e:
    tasks.render_split(d, "train")
  msg = str(e.value)
  assert "\n" not in msg
  assert "glue/rte" in msg and empty_data_dir in msg
  assert "tfds build glue/rte" in msg and "tfds_data_dir.path" in msg


def test_fingerprint_reads_no_examples_and_follows_the_data_dir(empty_data_dir, monkeypatch):
  def no_load(*args, **kwargs):
    raise AssertionError("the fingerprint read the data")
  monkeypatch.setattr(tfds, "load", no_load)
  src = SOURCES["tfds_mnli"]
  fp = tfds_tasks.fingerprint(src)
  assert "glue/mnli/" in fp and empty_data_dir in fp
  gin.bind_parameter("tfds_data_dir.path", empty_data_dir + "/other")
  assert tfds_tasks.fingerprint(src) != fp


def test_squad_metrics():
  got = tfds_tasks.squad_metrics(["the Eiffel Tower", "Paris"], ["Eiffel tower.", "in Paris, France"])
  assert got["exact_match"] == 50.0
  # "in Paris, France" against "Paris": precision 1/3, recall 1, F1 1/2.
  assert got["f1"] == pytest.approx(75.0)
