"""Best-fit packer: seqio's features per segment, no leaks, nothing lost, denser rows."""

import collections
import time
from fractions import Fraction

import numpy as np
import pytest
import seqio
import tensorflow as tf

from conftest import shared_data
from flanjax.data import packing

LENGTHS = {
    "enc_dec": {"inputs": 128, "targets": 48},
    "prefix_lm": {"inputs": 96, "targets": 32},
    "decoder": {"targets": 64},
}
CONVERTERS = {
    "enc_dec": seqio.EncDecFeatureConverter,
    "prefix_lm": seqio.PrefixLMFeatureConverter,
    "decoder": seqio.DecoderFeatureConverter,
}
KINDS = tuple(LENGTHS)


def _keys(kind):
  return ("targets",) if kind == "decoder" else ("inputs", "targets")


def _lognormal(rng, n, median, cap, sigma=0.9):
  return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, cap).astype(int)


def _seq(rng, n):
  # Real tokens are >= 2 (0 pad, 1 EOS); EOS last, as seqio's preprocessors leave it.
  return np.append(rng.integers(2, 500, n - 1), 1).astype(np.int32)


def _examples(rng, n, lengths, kind):
  """Lognormal lengths (a long tail up to the limits) plus edge cases at the limits."""
  t_len = _lognormal(rng, n, lengths["targets"] / 6, lengths["targets"])
  if kind == "decoder":
    exs = [dict(targets=_seq(rng, t)) for t in t_len]
    return exs + [dict(targets=_seq(rng, lengths["targets"])), dict(targets=_seq(rng, 1))]
  i_len = _lognormal(rng, n, lengths["inputs"] / 5, lengths["inputs"])
  exs = [dict(inputs=_seq(rng, a), targets=_seq(rng, t)) for a, t in zip(i_len, t_len)]
  return exs + [dict(inputs=_seq(rng, lengths["inputs"]), targets=_seq(rng, 1)),
                dict(inputs=_seq(rng, 1), targets=_seq(rng, lengths["targets"])),
                dict(inputs=_seq(rng, lengths["inputs"]),
                     targets=_seq(rng, lengths["targets"]))]


def _source(examples, kind):
  sig = {k: tf.TensorSpec([None], tf.int32) for k in _keys(kind)}
  return tf.data.Dataset.from_generator(
      lambda: ({k: e[k] for k in sig} for e in examples), output_signature=sig)


def _seqio_rows(examples, lengths, kind, pack):
  conv = CONVERTERS[kind](pack=pack)
  return list(conv(_source(examples, kind), dict(lengths)).as_numpy_iterator())


def _pack(examples, lengths, kind, **kw):
  p = packing.Packer(lengths, kind, record=True, **kw)
  return list(p.pack(examples)), p


def _share(rows, kind):
  feats = packing._token_features(kind)
  real = sum(int(np.count_nonzero(r[f])) for r in rows for f in feats)
  return real / sum(r[f].size for r in rows for f in feats)


def _sides(kind):
  return ("encoder", "decoder") if kind == "enc_dec" else ("decoder",)


def _check_invariants(row, kind):
  """Segments are contiguous blocks 1..m, positions restart, padding is all zeros."""
  ids = {}
  for side in _sides(kind):
    seg, pos = row[f"{side}_segment_ids"], row[f"{side}_positions"]
    n = int(np.count_nonzero(seg))
    assert np.all(seg[:n] > 0) and np.all(seg[n:] == 0), "padding only at the end"
    assert n == 0 or seg[0] == 1
    assert set(np.diff(seg[:n]).tolist()) <= {0, 1}, "segment ids contiguous and in order"
    starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
    want = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    np.testing.assert_array_equal(pos[:n], want)
    for f, v in row.items():
      if f.startswith(side):
        assert np.all(v[n:] == 0), f"{f} nonzero in padding"
    ids[side] = set(seg[:n].tolist())
    if side == "decoder":
      # Nothing crosses a segment boundary through the shifted inputs.
      assert np.all(row["decoder_input_tokens"][starts] == 0)
  if kind == "enc_dec":
    assert ids["encoder"] == ids["decoder"]


def _segment(row, side, s):
  seg = row[f"{side}_segment_ids"]
  return {f: v[seg == s] for f, v in row.items() if f.startswith(side)}


@pytest.mark.parametrize("kind", KINDS)
def test_segments_match_seqio_alone_and_do_not_leak(kind):
  lengths = LENGTHS[kind]
  examples = _examples(np.random.default_rng(1), 400, lengths, kind)
  rows, p = _pack(examples, lengths, kind, window=64)
  single = _seqio_rows(examples, lengths, kind, pack=False)
  assert sorted(i for r in p.record for i in r) == list(range(len(examples)))
  feature_lengths = packing.model_lengths(lengths, kind)
  for row, members in zip(rows, p.record):
    assert {f: (v.shape, v.dtype) for f, v in row.items()} == {
        f: ((n,), np.int32) for f, n in feature_lengths.items()}
    _check_invariants(row, kind)
    for s, i in enumerate(members, start=1):
      want = single[i]
      for side in _sides(kind):
        got = _segment(row, side, s)
        n = got[f"{side}_positions"].size
        np.testing.assert_array_equal(got[f"{side}_positions"], np.arange(n))
        for f, v in want.items():
          if f.startswith(side):
            np.testing.assert_array_equal(got[f], v[:n], err_msg=f"{f} of example {i}")
        # seqio's row holds nothing beyond the segment but padding (and its
        # unpacked shift's one leaked token, at zero loss weight).
        rest = {f: v[n:] for f, v in want.items()
                if f.startswith(side) and f != "decoder_input_tokens"}
        assert all(not v.any() for v in rest.values()), rest


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_lost_or_duplicated(kind):
  lengths = LENGTHS[kind]
  examples = _examples(np.random.default_rng(2), 1500, lengths, kind)
  rows, _ = _pack(examples, lengths, kind, window=256)

  def key(parts):
    return tuple(tuple(int(t) for t in x) for x in parts)

  if kind == "prefix_lm":
    want = [key([np.concatenate([e["inputs"], e["targets"]])]) for e in examples]
  else:
    want = [key([e[k] for k in _keys(kind)]) for e in examples]
  got = []
  for row in rows:
    for s in range(1, row["decoder_segment_ids"].max() + 1):
      if kind == "enc_dec":
        got.append(key([_segment(row, "encoder", s)["encoder_input_tokens"],
                        _segment(row, "decoder", s)["decoder_target_tokens"]]))
      else:
        got.append(key([_segment(row, "decoder", s)["decoder_target_tokens"]]))
  assert collections.Counter(got) == collections.Counter(want)


def _reference(sizes, cap, window):
  """The algorithm spelled out with exact fractions and plain loops."""
  rows, out, mins, buffered = [], [], list(cap), 0

  def emit(r):
    nonlocal buffered
    rows.remove(r)
    buffered -= len(r["members"])
    out.append(tuple(r["members"]))

  for i, s in enumerate(sizes):
    best = None
    for r in rows:  # oldest first: a strict < keeps the oldest on ties
      if all(x <= rem for x, rem in zip(s, r["rem"])):
        slack = sum(Fraction(rem - x, c) for rem, x, c in zip(r["rem"], s, cap))
        if best is None or slack < best[0]:
          best = (slack, r)
    if best is None:
      rows.append(dict(rem=list(cap), members=[]))
      r = rows[-1]
    else:
      r = best[1]
    r["rem"] = [rem - x for rem, x in zip(r["rem"], s)]
    r["members"].append(i)
    buffered += 1
    mins = [min(m, x) for m, x in zip(mins, s)]
    if any(rem < m for rem, m in zip(r["rem"], mins)):
      emit(r)
    while buffered > window:
      emit(min(rows, key=lambda r: min(Fraction(x, c) for x, c in zip(r["rem"], cap))))
  while rows:
    emit(rows[0])
  return out


@pytest.mark.parametrize("kind,lengths", [
    ("enc_dec", {"inputs": 24, "targets": 12}), ("decoder", {"targets": 20}),
    ("prefix_lm", {"inputs": 10, "targets": 8})])
def test_best_fit_choice_matches_brute_force(kind, lengths):
  rng = np.random.default_rng(3)
  examples = []
  for _ in range(300):
    ex = dict(targets=_seq(rng, int(rng.integers(1, lengths["targets"] + 1))))
    if kind != "decoder":
      ex["inputs"] = _seq(rng, int(rng.integers(1, lengths["inputs"] + 1)))
    examples.append(ex)
  if kind == "enc_dec":
    sizes = [(e["inputs"].size, e["targets"].size) for e in examples]
  elif kind == "prefix_lm":
    sizes = [(e["inputs"].size + e["targets"].size,) for e in examples]
  else:
    sizes = [(e["targets"].size,) for e in examples]
  cap = packing.row_lengths(lengths, kind)
  for window in (1, 5, 16):
    _, p = _pack(examples, lengths, kind, window=window)
    assert p.record == _reference(sizes, cap, window), window


@pytest.mark.parametrize("kind,lengths", [
    ("enc_dec", {"inputs": 1024, "targets": 256}),
    ("prefix_lm", {"inputs": 512, "targets": 128}),
    ("decoder", {"targets": 512})])
def test_denser_than_seqio(kind, lengths):
  examples = _examples(np.random.default_rng(4), 2500, lengths, kind)
  ours, p = _pack(examples, lengths, kind)
  theirs = _seqio_rows(examples, lengths, kind, pack=True)
  a, b = _share(ours, kind), _share(theirs, kind)
  assert a == pytest.approx(p.stats.share())
  print(f"\n{kind} {lengths}: non-padding share ours {a:.3f} ({len(ours)} rows) vs "
        f"seqio {b:.3f} ({len(theirs)} rows); {p.stats.summary()}")
  assert a >= b and len(ours) <= len(theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_mode_equals_seqio_unpacked(kind):
  lengths = LENGTHS[kind]
  examples = _examples(np.random.default_rng(5), 300, lengths, kind)
  if kind != "decoder":
    examples.append(dict(inputs=np.zeros(0, np.int32), targets=_seq(np.random.default_rng(0), 3)))
  ours, p = _pack(examples, lengths, kind, pack=False)
  theirs = _seqio_rows(examples, lengths, kind, pack=False)
  assert len(ours) == len(theirs) == len(examples) == p.stats.rows
  for a, b in zip(ours, theirs):
    assert set(a) == set(b)
    for f in b:
      assert a[f].dtype == b[f].dtype
      np.testing.assert_array_equal(a[f], b[f], err_msg=f)


@pytest.mark.parametrize("kind", KINDS)
def test_pack_dataset_matches_packer_and_seqio_signature(kind):
  lengths = LENGTHS[kind]
  examples = _examples(np.random.default_rng(6), 200, lengths, kind)
  for pack in (True, False):
    src = _source(examples, kind).map(lambda ex: dict(ex, extra=tf.constant("x")))
    stats = packing.PackingStats()
    ds = packing.pack_dataset(src, lengths, kind, pack=pack, window=32, stats=stats)
    seqio_ds = CONVERTERS[kind](pack=pack)(_source(examples, kind), dict(lengths))
    assert {k: (v.shape, v.dtype) for k, v in ds.element_spec.items()} == {
        k: (v.shape, v.dtype) for k, v in seqio_ds.element_spec.items()}
    got = list(ds.as_numpy_iterator())
    want, _ = _pack(examples, lengths, kind, pack=pack, window=32)
    assert len(got) == len(want) == stats.rows and stats.examples == len(examples)
    for a, b in zip(got, want):
      for f in b:
        np.testing.assert_array_equal(a[f], b[f])


def test_mask_violations_counted_and_strict_raises():
  lengths = {"inputs": 16, "targets": 8}
  good = dict(inputs=np.array([5, 6, 1], np.int32), targets=np.array([7, 1], np.int32))
  examples = [good, good,
              dict(inputs=np.array([5, 1], np.int32), targets=np.zeros(0, np.int32)),
              good,
              dict(inputs=np.array([5, 1], np.int32), targets=np.array([7, 8], np.int32)),
              dict(inputs=np.array([5, 1], np.int32), targets=np.array([7, 1, 0], np.int32)),
              good]
  for pack in (True, False):
    rows, p = _pack(examples, lengths, "enc_dec", pack=pack)
    st = p.stats
    assert (st.violations, st.no_loss, st.eos_unweighted) == (3, 1, 3), st
    assert sorted(st.violating_examples) == [2, 4, 5]
    line = st.summary()
    assert "\n" not in line and "mask violations: 3 segments" in line, line
    assert st.examples == len(examples)
    with pytest.raises(ValueError, match=r"example 2: no loss-weighted target"):
      _pack(examples, lengths, "enc_dec", pack=pack, strict=True)
  # Prefix LM: empty targets become one padding target without loss, as in seqio.
  _, p = _pack([dict(inputs=np.array([4, 1], np.int32), targets=np.zeros(0, np.int32))] * 2
               + [good], {"inputs": 16, "targets": 8}, "prefix_lm")
  assert (p.stats.violations, p.stats.no_loss) == (2, 2)
  _, p = _pack([good] * 5, lengths, "enc_dec")
  assert p.stats.summary().endswith("mask violations: none")
  with pytest.raises(ValueError, match="example 1: inputs has 17 tokens"):
    _pack([good, dict(inputs=_seq(np.random.default_rng(0), 17), targets=good["targets"])],
          lengths, "enc_dec")


def test_throughput():
  lengths = {"inputs": 1024, "targets": 256}
  rng = np.random.default_rng(7)
  examples = _examples(rng, 20000, lengths, "enc_dec")
  p = packing.Packer(lengths, "enc_dec", window=1024)
  t = time.perf_counter()
  rows = sum(1 for _ in p.pack(examples))
  rate = len(examples) / (time.perf_counter() - t)
  print(f"\nthroughput: {rate:,.0f} examples/s into {rows} rows (1024/256, window 1024); "
        f"{p.stats.summary()}")
  assert rate > 5000  # target is well over 10k/s; slack for a shared CPU


def _flan_cot_examples(folder, tmp_path, lengths):
  """Question -> CoT or direct answer, 50/50, tokenized with a model trained here."""
  from flanjax.data import vocab  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  rows = []
  for f in sorted(folder.glob("*.tsv")):
    # Only "\n" ends a record: str.splitlines would also split on U+2028 inside text.
    for line in f.read_text(encoding="utf-8").rstrip("\n").split("\n"):
      q, answer, rationale = line.split("\t")
      rows.append((q.replace("\\n", "\n"), answer, rationale))
  model = vocab.train_sentencepiece(
      [t for r in rows for t in r], str(tmp_path / "cot.model"), vocab_size=8000)
  sp = spm.SentencePieceProcessor(model_file=model)
  rng = np.random.default_rng(0)
  cot = rng.random(len(rows)) < 0.5
  targets = [f"{r} So the answer is {a}." if c else a
             for (_, a, r), c in zip(rows, cot)]
  order = rng.permutation(len(rows))  # a shuffled training stream

  def ids(texts, n):  # trim then EOS, as seqio's append_eos_after_trim
    return [np.array(x[:n - 1] + [vocab.EOS_ID], np.int32) for x in sp.encode(texts)]

  inputs = ids([r[0] for r in rows], lengths["inputs"])
  targets = ids(targets, lengths["targets"])
  return [dict(inputs=inputs[i], targets=targets[i]) for i in order]


def test_share_on_flan_cot_lengths(tmp_path):
  folder = shared_data("flan_cot")
  lengths = {"inputs": 1024, "targets": 256}
  examples = _flan_cot_examples(folder, tmp_path, lengths)[:12000]
  t = time.perf_counter()
  ours, p = _pack(examples, lengths, "enc_dec")
  rate = len(examples) / (time.perf_counter() - t)
  theirs = _seqio_rows(examples, lengths, "enc_dec", pack=True)
  st = packing.PackingStats()
  for r in theirs:
    for f in packing._token_features("enc_dec"):
      st.real[f] = st.real.get(f, 0) + int(np.count_nonzero(r[f]))
      st.positions[f] = st.positions.get(f, 0) + r[f].size
  print(f"\nflan_cot ({len(examples)} examples, 50/50 CoT/direct, 1024/256): "
        f"non-padding share ours {p.stats.share():.3f} "
        f"(encoder {p.stats.share('encoder_input_tokens'):.3f}, "
        f"decoder {p.stats.share('decoder_target_tokens'):.3f}; {len(ours)} rows, "
        f"{rate:,.0f} examples/s) vs seqio {st.share():.3f} "
        f"(encoder {st.share('encoder_input_tokens'):.3f}, "
        f"decoder {st.share('decoder_target_tokens'):.3f}; {len(theirs)} rows)")
  assert p.stats.share() >= st.share() and not p.stats.violations


def test_token_id_zero_inside_an_example_is_still_trained():
  """Llama-family tokenizers use id 0 for a real token ('!' in Llama 3): weights go by position."""
  from flanjax.data.packing import Packer
  ex = {"inputs": np.array([5, 0, 7, 1], np.int32), "targets": np.array([9, 0, 4, 1], np.int32)}
  for kind, lengths, want in (
      ("enc_dec", {"inputs": 8, "targets": 8}, [1, 1, 1, 1, 0, 0, 0, 0]),
      ("prefix_lm", {"inputs": 8, "targets": 8}, [0, 0, 0, 0, 1, 1, 1, 1] + [0] * 8),
      ("decoder", {"targets": 8}, [1, 1, 1, 1, 0, 0, 0, 0])):
    rows = list(Packer(lengths, kind).pack([ex]))
    np.testing.assert_array_equal(rows[0]["decoder_loss_weights"], want, err_msg=kind)


def test_examples_fetched_in_batches_are_the_per_example_stream():
  """packing.numpy_examples (the packer's source, fetched SOURCE_BATCH at a time) gives what
  as_numpy_iterator gives one by one: same order, lengths (empty ones too), dtypes, scalars."""
  rng = np.random.default_rng(0)
  n = 2 * packing.SOURCE_BATCH + 37  # two full batches and a partial one
  ins = [rng.integers(1, 500, int(rng.integers(0, 30)), dtype=np.int32) for _ in range(n)]
  tgs = [rng.integers(1, 500, int(rng.integers(1, 9)), dtype=np.int32) for _ in range(n)]
  tasks = [f"task_{i % 3}".encode() for i in range(n)]

  def gen():
    for i in range(n):
      yield {"inputs": ins[i], "targets": tgs[i], "task": tasks[i], "id": np.int64(i)}

  sig = {"inputs": tf.TensorSpec((None,), tf.int32), "targets": tf.TensorSpec((None,), tf.int32),
         "task": tf.TensorSpec((), tf.string), "id": tf.TensorSpec((), tf.int64)}
  ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
  want, got = list(ds.as_numpy_iterator()), list(packing.numpy_examples(ds))
  assert len(got) == len(want) == n
  for w, g in zip(want, got):
    assert g.keys() == w.keys() and g["task"] == w["task"] and g["id"] == w["id"]
    for k in ("inputs", "targets"):
      assert g[k].dtype == w[k].dtype and np.array_equal(g[k], w[k])
  assert all(g["inputs"].base is None for g in got)  # copies: no batch kept alive
  # A feature of rank 2, or a nested dict, is fetched one example at a time, as before.
  nested = tf.data.Dataset.from_tensor_slices({"a": {"b": np.arange(3)}})
  assert [e["a"]["b"] for e in packing.numpy_examples(nested)] == [0, 1, 2]
  two_d = tf.data.Dataset.from_tensor_slices({"x": np.arange(12).reshape(3, 2, 2)})
  assert [e["x"].tolist() for e in packing.numpy_examples(two_d)] == \
      [e["x"].tolist() for e in two_d.as_numpy_iterator()]


@pytest.mark.parametrize("bos,virtual,pack", [(3, 0, True), (None, 0, True), (3, 2, True),
                                              (3, 0, False)])
def test_causal_rows_are_each_example_read_left_to_right(bos, virtual, pack):
  # kind="causal": an example is BOS (where the tokenizer adds it; after a soft prompt's
  # virtual ids) + its inputs without their EOS + its targets; the model reads every token
  # but the last and predicts every token but the first, with loss on the targets only.
  # Checked against that text, example by example, from a brute-force walk of each row.
  rng = np.random.default_rng(7)
  lengths = {"inputs": 40, "targets": 24}
  exs = _examples(rng, 150, lengths, "prefix_lm")
  exs.append(dict(inputs=np.array([3, 9, 1], np.int32), targets=_seq(rng, 4)))  # has BOS
  exs.append(dict(inputs=np.zeros(0, np.int32), targets=_seq(rng, 5)))  # no inputs
  if virtual:
    soft = np.array([900, 901], np.int32)
    exs = [dict(e, inputs=np.concatenate([soft, e["inputs"]])) for e in exs]
    lengths = {"inputs": 42, "targets": 24}
  rows, packer = _pack(exs, lengths, "causal", bos_id=bos, virtual=virtual, pack=pack,
                       eos_id=1)
  assert packer.stats.violations == 0
  assert set(rows[0]) == set(packing.model_lengths(lengths, "causal", pack))
  seen = []
  for row, members in zip(rows, packer.record):
    seg = row.get("decoder_segment_ids", (row["decoder_loss_weights"] * 0 + 1) *
                  (np.arange(row["decoder_target_tokens"].size) <
                   len(np.trim_zeros(row["decoder_target_tokens"], "b"))))
    for s, i in enumerate(members, 1):
      e = exs[i]
      inp = list(e["inputs"])
      inp = inp[:-1] if inp[-1:] == [1] else inp  # its EOS dropped
      if bos is not None and inp[virtual:virtual + 1] != [bos]:
        inp = inp[:virtual] + [bos] + inp[virtual:]
      full = inp + list(e["targets"])
      idx = np.flatnonzero(seg == s)
      if not inp:  # nothing to read before the first target: 0 starts it, as seqio's
        full = [0] + full
      assert list(row["decoder_input_tokens"][idx]) == full[:-1]
      assert list(row["decoder_target_tokens"][idx]) == full[1:]
      weights = list(row["decoder_loss_weights"][idx])
      assert weights == [0] * (len(full) - 1 - e["targets"].size) + [1] * e["targets"].size
      if pack:
        assert list(row["decoder_positions"][idx]) == list(range(len(full) - 1))
      seen.append(i)
  assert sorted(seen) == list(range(len(exs)))
