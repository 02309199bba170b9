"""Template modes (FLAN's ablation of instructions): instructions, no_template, dataset_name.

Each mode's inputs on the built-in families' real examples, checked against the raw
fields they come from; targets unchanged; the evaluation splits in their own mode
(instructions unless bound); caches and vocabularies keyed by the mode's text.
"""

import contextlib
import re
import string

import gin
import pytest

from flanjax.data import registry, tasks, templates
from flanjax.data.collections import builtin
from flanjax.errors import UserError

MODES = templates.MODES


@contextlib.contextmanager
def bound_modes(mode, eval_mode="instructions"):
  gin.bind_parameter("template_mode.mode", mode)
  gin.bind_parameter("template_mode.eval_mode", eval_mode)
  try:
    yield
  finally:
    gin.bind_parameter("template_mode.mode", "instructions")
    gin.bind_parameter("template_mode.eval_mode", "instructions")


def _words(text):
  return set(re.findall(r"[A-Za-z]+", text.lower()))


def _instruction_words(fam):
  """Every word the family's templates write themselves (outside their fields)."""
  words = set()
  for t in fam.templates:
    for literal, *_ in string.Formatter().parse(t.inputs):
      words |= _words(literal)
  return words | {"options", "choose", "from"}


def _expected_raw(fam, ex, fmt):
  """The raw inputs of one example, built by hand from its fields."""
  lines = [str(ex[f]) for f in fam.fields if ex.get(f)]
  if fmt.endswith("options"):
    lines += list(ex["options"])
  return "\n".join(lines)


@pytest.mark.parametrize("split", ["train", "validation", "heldout_templates"])
def test_each_mode_renders_the_raw_inputs_and_keeps_the_targets(split):
  for fam in builtin.FAMILIES:
    raw = builtin.raw_examples(fam.name, split)
    pool = builtin.raw_examples(fam.name, "train")
    shot_inputs = {_expected_raw(fam, ex, f) for f in fam.train_formats for ex in pool}
    rendered = {m: builtin.rendered_examples(fam.name, split, m) for m in MODES}
    leaked = 0
    for i, ex in enumerate(raw[:300]):
      inst, bare, named = (rendered[m][i] for m in MODES)
      # Targets, answers, templates and formats do not depend on the mode.
      assert inst["targets"] == bare["targets"] == named["targets"]
      assert inst["answer"] == bare["answer"] == named["answer"] == ex["answer"]
      assert inst["format"] == bare["format"] == named["format"]
      # The task's name first, then exactly what no_template renders.
      assert named["inputs"] == f"[builtin_{fam.name}]\n" + bare["inputs"]
      # No word of any template's wording, unless the example's own fields hold it.
      own = _words(" ".join(str(v) for k, v in ex.items() if k != "rationale"))
      blocks = bare["inputs"].split("\n\n")
      assert blocks[-1] == _expected_raw(fam, ex, bare["format"])
      for block in blocks[:-1]:  # few-shot: each exemplar is a train example's raw inputs
        assert block.rpartition("\n")[0] in shot_inputs, block  # then the exemplar's target
      leaked += len((_words(blocks[-1]) - own) & _instruction_words(fam))
      # Under instructions the template's words are there.
      assert _words(inst["inputs"]) & (_instruction_words(fam) - own) or fam.name == "list_reverse"
    assert leaked == 0, fam.name
  # Spot check on one real example.
  ex = builtin.raw_examples("sentiment", "validation")[0]
  assert builtin.rendered_examples("sentiment", "validation", "no_template")[0]["inputs"] == (
      f"{ex['review']}\npositive\nnegative")


def test_gin_binding_sets_training_mode_and_evaluation_stays_with_instructions(builtin_vocab):
  with bound_modes("no_template"):
    assert templates.template_mode() == ("no_template", "instructions")
    registry.register_builtin(builtin_vocab)
    import seqio
    task = seqio.get_mixture_or_task("builtin_parity")

    def first_inputs(split):
      ds = task.get_dataset(None, split=split, shuffle=False, use_cached=False)
      return next(ds.as_numpy_iterator())["inputs_pretokenized"].decode()

    assert first_inputs("train") == builtin.rendered_examples("parity", "train",
                                                              "no_template")[0]["inputs"]
    assert first_inputs("validation") == builtin.rendered_examples(
        "parity", "validation", "instructions")[0]["inputs"]
    # The default of every caller (the vocabulary's text) follows the binding.
    assert builtin.rendered_examples("parity", "train") == builtin.rendered_examples(
        "parity", "train", "no_template")
  with bound_modes("dataset_name", "dataset_name"):
    registry.register_builtin(builtin_vocab)
    ds = seqio.get_mixture_or_task("builtin_parity").get_dataset(
        None, split="heldout_templates", shuffle=False, use_cached=False)
    assert next(ds.as_numpy_iterator())["inputs_pretokenized"].decode().startswith(
        "[builtin_parity]\n")
  registry.register_builtin(builtin_vocab)  # back to instructions for other tests


def test_taskdef_modes_render_and_key_their_caches(builtin_vocab):
  exs = [dict(text=r, options=["positive", "negative"], answer=a)
         for r, a in (("A fine film.", "positive"), ("Dull and slow.", "negative"),
                      ("Lovely cast.", "positive"), ("Poor sound.", "negative"))]
  defn = tasks.TaskDef(name="modes_probe", load=lambda split: exs,
                       splits=("train", "validation"), templates="sentiment",
                       train_formats=("zero_shot_options",), eval_format="zero_shot_options",
                       fingerprint="probe")
  keys, texts = {}, {}
  for mode in MODES:
    tasks.register(defn, builtin_vocab, 128, modes=(mode, "instructions"))
    reg = tasks.DEFS["modes_probe"]
    assert reg.defn.template_mode == mode
    keys[mode] = tasks.cache_key(reg.defn, "train", builtin_vocab, 128)
    texts[mode] = [t["inputs_pretokenized"] for t in reg.tokenized("train").texts]
    # The validation split keeps instructions, and its cache entry with it.
    assert tasks.cache_key(reg.defn, "validation", builtin_vocab, 128) == tasks.cache_key(
        defn, "validation", builtin_vocab, 128)
  assert len(set(keys.values())) == 3
  assert keys["instructions"] == tasks.cache_key(defn, "train", builtin_vocab, 128)
  assert texts["no_template"] == [f"{e['text']}\npositive\nnegative" for e in exs]
  assert texts["dataset_name"] == [f"[modes_probe]\n{t}" for t in texts["no_template"]]
  assert all("positive" in t and len(t) > len(e["text"]) + 20
             for t, e in zip(texts["instructions"], exs))


def test_the_vocabulary_is_keyed_by_the_modes_text(builtin_vocab):
  from flanjax.data import vocab
  assert builtin.all_text() == builtin.all_text(mode="instructions")
  assert builtin.all_text(mode="no_template") != builtin.all_text()
  with bound_modes("no_template"):
    bare = vocab.builtin_vocabulary(vocab_size=1000)
  assert bare.sentencepiece_model_file != builtin_vocab.sentencepiece_model_file
  assert vocab.builtin_vocabulary(vocab_size=1000).sentencepiece_model_file == (
      builtin_vocab.sentencepiece_model_file)


def test_an_unknown_mode_is_one_line():
  with pytest.raises(UserError, match="template_mode.mode='plain' is not a template mode"):
    with bound_modes("plain"):
      templates.template_mode()
  with pytest.raises(UserError, match="no_template"):
    builtin.rendered_examples("parity", "train", "bare")
