"""Packed batches keep examples apart and mask padding; templates and splits behave."""

import numpy as np

from flanjax.data import pipeline, registry
from flanjax.data.collections import builtin
from flanjax.data.templates import Template, extract_answer, render

LENGTHS = {"inputs": 192, "targets": 64}


def _segments(row_tokens, row_seg):
  return {int(s): row_tokens[row_seg == s] for s in np.unique(row_seg) if s != 0}


def test_packed_batches_keep_examples_apart(builtin_vocab):
  name = "builtin_comparison"
  packed = next(pipeline.get_dataset(name, LENGTHS, "validation", batch_size=4, seed=0,
                                     pack=True, shuffle=False, num_epochs=1)
                .as_numpy_iterator())
  # The same split, unpacked and unshuffled: the originals, in order.
  originals = [(ex["inputs"].tolist(), ex["targets"].tolist()) for ex in
               registry.get_task_or_mixture(name).get_dataset(
                   LENGTHS, "validation", shuffle=False, num_epochs=1).as_numpy_iterator()]
  seen = 0
  for r in range(packed["encoder_input_tokens"].shape[0]):
    enc_seg = packed["encoder_segment_ids"][r]
    dec_seg = packed["decoder_segment_ids"][r]
    enc = _segments(packed["encoder_input_tokens"][r], enc_seg)
    tgt = _segments(packed["decoder_target_tokens"][r], dec_seg)
    assert len(enc) >= 2, "a row of short examples should hold several"
    assert sorted(enc) == sorted(tgt)
    for s in enc:
      # Every segment is one whole original example, inputs with its own targets.
      assert (enc[s].tolist(), tgt[s].tolist()) in originals
      seen += 1
      # Positions restart at 0 in every segment.
      for seg, pos in ((enc_seg, packed["encoder_positions"][r]),
                       (dec_seg, packed["decoder_positions"][r])):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
      # Decoder inputs are the targets shifted right within the segment, from 0.
      dec_in = packed["decoder_input_tokens"][r][dec_seg == s]
      assert dec_in[0] == 0
      np.testing.assert_array_equal(dec_in[1:], tgt[s][:-1])
    # Padding: segment 0, token 0, no loss.
    pad = dec_seg == 0
    assert np.all(packed["decoder_target_tokens"][r][pad] == 0)
    assert np.all(packed["decoder_loss_weights"][r][pad] == 0)
    assert np.all(packed["decoder_loss_weights"][r][~pad] == 1)
    assert np.all(packed["encoder_input_tokens"][r][enc_seg == 0] == 0)
  assert seen >= 8


def test_packing_beats_padding(builtin_vocab):
  def share(pack):
    ds = pipeline.get_dataset(registry.BUILTIN_MIXTURE, LENGTHS, "train", batch_size=16,
                              seed=0, pack=pack)
    return np.mean([pipeline.non_padding_share(b) for b in ds.take(3).as_numpy_iterator()])
  packed, padded = share(True), share(False)
  print(f"non-padding share: packed {packed:.3f}, padded {padded:.3f}")
  assert packed > 0.6 and packed > 1.5 * padded, (packed, padded)


def test_length_report_counts_truncation(builtin_vocab):
  rep = pipeline.length_report("builtin_arithmetic", "validation", {"inputs": 20, "targets": 64})
  assert rep.examples == builtin.SPLIT_SIZES["validation"]
  assert rep.truncated["inputs"] > 0 and "truncated" in rep.summary({"inputs": 20, "targets": 64})
  ok = pipeline.length_report("builtin_arithmetic", "validation", LENGTHS)
  assert not ok.truncated


def test_length_report_by_encoding_equals_the_tf_data_pass(builtin_vocab):
  # The built-in families' lengths come from encoding their text in Python (every run's start
  # counts them); the preprocessed dataset through tf.data is the reference, per example.
  import seqio  # pylint: disable=g-import-not-at-top
  feats = ["inputs", "targets"]
  for task in seqio.get_mixture_or_task(registry.BUILTIN_MIXTURE).tasks:
    count, fast = pipeline._lengths_by_encoding(task, "train", feats, None)  # pylint: disable=protected-access
    want_count, want = pipeline._lengths_by_pass(task, "train", feats, None)  # pylint: disable=protected-access
    assert count == want_count == builtin.SPLIT_SIZES["train"], task.name
    for k in feats:
      np.testing.assert_array_equal(fast[k], want[k], err_msg=f"{task.name} {k}")
  # A task with any other preprocessing is left to the pass.
  base = seqio.get_mixture_or_task(registry.BUILTIN_PREFIX + builtin.FAMILIES[0].name)
  other = seqio.Task("length_report_other_preprocessing", source=base.source,
                     preprocessors=[seqio.preprocessors.tokenize, lambda ds: ds.take(3),
                                    seqio.preprocessors.append_eos_after_trim],
                     output_features=base.output_features)
  assert pipeline._lengths_by_encoding(other, "train", feats, None) is None  # pylint: disable=protected-access
  assert pipeline._lengths_by_pass(other, "train", feats, None)[0] == 3  # pylint: disable=protected-access
  # A user's own function that only shares seqio's name is not seqio's tokenize.
  def tokenize(ds, output_features):  # pylint: disable=unused-argument
    return ds
  same_name = seqio.Task("length_report_same_name", source=base.source,
                         preprocessors=[tokenize, seqio.preprocessors.append_eos_after_trim],
                         output_features=base.output_features)
  assert pipeline._lengths_by_encoding(same_name, "train", feats, None) is None  # pylint: disable=protected-access


def test_texts_in_memory_and_the_majority_answer_equal_a_pass_through_tf_data(builtin_vocab):
  # The evaluation's baseline (the train split's most common answer) and the length report
  # read the built-in families' and flanjax's own tasks' text from memory; the reference is
  # the task's unshuffled preprocessed dataset through tf.data, example by example.
  import collections  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from conftest import shared_data  # pylint: disable=g-import-not-at-top
  from flanjax.evaluation import harness  # pylint: disable=g-import-not-at-top
  def majority(task, records):  # the first of the most common answers, as Counter keeps it
    post = harness.answer_fn(task)
    counts = collections.Counter(str(post(r["targets_pretokenized"])) for r in records)
    return counts.most_common(1)[0][0]

  names = [t.name for t in seqio.get_mixture_or_task(registry.BUILTIN_MIXTURE).tasks]
  shared_data("flan_cot")
  registry.register_all(builtin_vocab)  # flanjax's own tasks (TaskDefs) over real files
  names += ["flan_cot_creak_direct", "flan_cot_gsm8k"]
  for name in names:
    task = seqio.get_mixture_or_task(name)
    held = pipeline.texts_in_memory(task, "train", 2000)
    ds = task.get_dataset(None, split="train", shuffle=False, num_epochs=1, use_cached=False)
    want = [{k: ex[k].decode("utf-8") for k in ("inputs_pretokenized", "targets_pretokenized")}
            for ex in ds.take(2000).as_numpy_iterator()]
    assert held is not None and len(held) == len(want) > 100, name
    for got, ref in zip(held, want):
      assert {k: got[k] for k in ref} == ref, name
    assert harness._count_majority(task, 2000) == majority(task, want), name  # pylint: disable=protected-access
  # Another preprocessor (here one that drops examples) leaves it to tf.data.
  base = seqio.get_mixture_or_task(names[0])
  other = seqio.Task("texts_in_memory_other_preprocessing", source=base.source,
                     preprocessors=[seqio.preprocessors.tokenize, lambda ds: ds.take(3),
                                    seqio.preprocessors.append_eos_after_trim],
                     output_features=base.output_features, postprocess_fn=base.postprocess_fn)
  assert pipeline.texts_in_memory(other, "train") is None
  three = [{"targets_pretokenized": ex["targets_pretokenized"].decode("utf-8")} for ex in
           other.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()]
  assert len(three) == 3
  assert harness._count_majority(other, 2000) == majority(other, three)  # pylint: disable=protected-access
  registry.register_all(builtin_vocab)  # the session's registration again


def test_stream_resumes_at_position(builtin_vocab):
  make = lambda: pipeline.get_dataset(registry.BUILTIN_MIXTURE, LENGTHS, "train", 4, seed=1)
  a = pipeline.BatchStream(make)
  first = [next(a) for _ in range(5)]
  b = pipeline.BatchStream(make, position=3)
  for want in first[3:]:
    got = next(b)
    np.testing.assert_array_equal(got["encoder_input_tokens"], want["encoder_input_tokens"])
  assert b.position == 5


def test_formats_render():
  t = Template("Is {number} even or odd?\n{options}")
  ex = dict(number="12", options=["even", "odd"], answer="even", rationale="12 ends in 2.")
  assert render(t, ex, "zero_shot") == ("Is 12 even or odd?", "even")
  inputs, _ = render(t, ex, "zero_shot_options", options_layout="letters")
  assert inputs.endswith("Options:\n(A) even\n(B) odd")
  inputs, target = render(t, ex, "few_shot_cot", exemplars=[dict(ex, number="3", answer="odd")])
  assert inputs.startswith("Is 3 even or odd?\n") and inputs.endswith("Is 12 even or odd?")
  assert target == "12 ends in 2. So the answer is even."
  assert extract_answer(target) == "even"


def test_builtin_splits_are_disjoint_and_templates_held_out():
  for fam in builtin.FAMILIES:
    train = {fam.key(e) for e in builtin.raw_examples(fam.name, "train")}
    for split in ("validation", "heldout_templates"):
      assert not train & {fam.key(e) for e in builtin.raw_examples(fam.name, split)}
    n_train = len(fam.train_templates)
    assert {r["template"] for r in builtin.rendered_examples(fam.name, "train")} == set(
        range(n_train))
    assert all(r["template"] >= n_train
               for r in builtin.rendered_examples(fam.name, "heldout_templates"))
    # Few-shot exemplars never contain the question being asked.
    for ex, r in zip(builtin.raw_examples(fam.name, "train"),
                     builtin.rendered_examples(fam.name, "train")):
      if r["format"].startswith("few_shot"):
        query = r["inputs"].split("\n\n")[-1]
        assert r["inputs"].count(query) == 1
