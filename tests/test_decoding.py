"""Decoding against transformers' generate: greedy and beam search for T5 and Llama,
and the sampling filters against transformers' logits warpers; stop strings."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import shared_data
from flanjax import decoding
from flanjax.errors import UserError
from flanjax.models import decoder, hf, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import test_decoder  # noqa: E402  (the tiny Llama of the parity tests)

V_T5, V_LLAMA = 64, test_decoder.V


def _torch_t5(seed):
  # Not test_t5's model: its 3 decoder layers over 2 encoder layers break
  # transformers' generate (its cache is sized by num_layers).
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=V_T5, d_model=32, d_ff=48, num_layers=2,
                              num_decoder_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # HF's init gives near-uniform logits: widen it
      p.normal_(0.0, 0.5)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V_T5, 32) * 0.3)
  hf_cfg = model.config.to_dict()
  hf_cfg["tie_word_embeddings"] = False  # lm_head was replaced by its own matrix above
  hf_cfg.pop("scale_decoder_outputs", None)
  cfg = hf.t5_config_from_hf(hf_cfg)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, t5.T5(cfg), hf.t5_params_from_hf(sd, cfg)


def _torch_llama(seed):
  tmodel = test_decoder._torch_llama(dict(num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=False), seed=seed)
  cfg, params = test_decoder._ours(tmodel)
  return tmodel, decoder.Decoder(cfg), params


def _frequent_token(ids, avoid=(0,)):
  """A token the model often emits: as EOS it makes hypotheses end at different lengths."""
  vals, counts = np.unique(ids[~np.isin(ids, avoid)], return_counts=True)
  return int(vals[np.argmax(counts)])


def _hf_new_tokens(seqs, start: int, eos: int):
  """transformers' rows after the prompt, cut after EOS (its padding is the pad id)."""
  out = []
  for row in np.asarray(seqs):
    row = list(row[start:])
    out.append(row[:row.index(eos) + 1] if eos in row else row)
  return out


def _assert_same(ours, ref_rows):
  for r, ref in enumerate(ref_rows):
    np.testing.assert_array_equal(ours[r, :len(ref)], ref, err_msg=f"row {r}")
    assert np.all(ours[r, len(ref):] == 0), f"row {r}: tokens after EOS"


def _t5_prompts(rng):
  enc = rng.integers(2, V_T5, size=(3, 11)).astype(np.int64)
  enc[1, 7:] = 0  # a padded row
  enc[2, 4:] = 0
  return enc


METHODS = [dict(num_beams=1), dict(num_beams=3, length_penalty=1.0),
           dict(num_beams=4, length_penalty=0.6), dict(num_beams=3, length_penalty=2.0),
           dict(num_beams=3, length_penalty=1.0, early_stopping=True)]


def _ids(kw):
  return "greedy" if kw["num_beams"] == 1 else "beam" + "".join(
      f",{k}={v}" for k, v in kw.items() if k != "num_beams") + f",k={kw['num_beams']}"


@pytest.mark.parametrize("kw", METHODS, ids=[_ids(k) for k in METHODS])
def test_t5_equals_transformers_generate(kw):
  tmodel, model, params = _torch_t5(seed=3)
  enc = _t5_prompts(np.random.default_rng(3))
  max_new = 9
  probe = decoding.generate(model, params, enc, config=decoding.DecodeConfig(
      max_decode_len=max_new), eos_id=-1)
  eos = _frequent_token(probe)
  if kw["num_beams"] == 1:
    cfg = decoding.DecodeConfig(method="greedy", max_decode_len=max_new)
  else:
    cfg = decoding.DecodeConfig(method="beam", max_decode_len=max_new, **kw)
  ours = decoding.generate(model, params, enc, config=cfg, eos_id=eos)
  with torch.no_grad():
    ref = tmodel.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                          do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                          pad_token_id=0, decoder_start_token_id=0, **kw)
  _assert_same(ours, _hf_new_tokens(ref.numpy(), 1, eos))
  if kw.get("length_penalty", 1.0) <= 1.0:  # a penalty of 2 rightly prefers the long ones
    assert any(eos in row for row in ours.tolist()), "no hypothesis ended early: weak test"


@pytest.mark.parametrize("kw", METHODS[:3] + METHODS[4:], ids=[_ids(k) for k in METHODS[:3] +
                                                              METHODS[4:]])
def test_llama_equals_transformers_generate(kw):
  tmodel, model, params = _torch_llama(seed=5)
  rng = np.random.default_rng(5)
  lengths = [6, 3, 8]
  prompts = np.zeros((3, 8), np.int32)
  for r, n in enumerate(lengths):
    prompts[r, :n] = rng.integers(3, V_LLAMA, n)
  max_new = 8
  probe = decoding.generate(model, params, prompts, np.array(lengths),
                            config=decoding.DecodeConfig(max_decode_len=max_new), eos_id=-1)
  eos = _frequent_token(probe)
  method = "greedy" if kw["num_beams"] == 1 else "beam"
  cfg = decoding.DecodeConfig(method=method, max_decode_len=max_new,
                              **(kw if method == "beam" else {}))
  ours = decoding.generate(model, params, prompts, np.array(lengths), config=cfg, eos_id=eos)
  refs = []
  for r, n in enumerate(lengths):  # one prompt at a time: no left padding on their side
    with torch.no_grad():
      out = tmodel.generate(torch.tensor(prompts[r:r + 1, :n]).long(),
                            attention_mask=torch.ones(1, n, dtype=torch.long), do_sample=False,
                            max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0, **kw)
    refs += _hf_new_tokens(out.numpy(), n, eos)
  _assert_same(ours, refs)


def test_beam_scores_are_length_normalised_log_probabilities():
  _, model, params = _torch_t5(seed=3)
  enc = _t5_prompts(np.random.default_rng(3))
  cfg = decoding.DecodeConfig(method="beam", num_beams=3, length_penalty=0.7, max_decode_len=6)
  ids, scores = decoding.generate_with_scores(model, params, enc, config=cfg, eos_id=-1)
  # Brute force: the teacher-forced log-probability of each returned sequence.
  dec_in = np.concatenate([np.zeros((3, 1), np.int32), ids[:, :-1]], axis=1)
  logp = jax.nn.log_softmax(model.apply({"params": params}, enc, dec_in))
  total = np.take_along_axis(np.asarray(logp), ids[:, :, None], axis=-1)[..., 0].sum(-1)
  np.testing.assert_allclose(scores, total / 6 ** 0.7, rtol=1e-4, atol=1e-4)
  # And greedy's score is the sum of its tokens' log-probabilities.
  g, gs = decoding.generate_with_scores(model, params, enc, config=decoding.DecodeConfig(
      max_decode_len=6), eos_id=-1)
  dec_in = np.concatenate([np.zeros((3, 1), np.int32), g[:, :-1]], axis=1)
  logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, enc, dec_in)))
  np.testing.assert_allclose(gs, np.take_along_axis(logp, g[:, :, None], -1)[..., 0].sum(-1),
                             rtol=1e-4, atol=1e-4)
  assert np.all(scores * 6 ** 0.7 >= gs - 1e-4)  # beam finds at least greedy's likelihood


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 10, 0.5), (1.0, 0, 0.05), (2.0, 3, 0.95)])
def test_sampling_filters_equal_transformers_warpers(temperature, top_k, top_p):
  from transformers.generation import logits_process as lp
  logits = np.random.default_rng(0).normal(0, 3, (4, 50)).astype(np.float32)
  ref = torch.tensor(logits)
  warpers = [lp.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(lp.TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(lp.TopPLogitsWarper(top_p))
  for w in warpers:
    ref = w(None, ref)
  ours = np.asarray(decoding.warp_logits(jnp.asarray(logits), temperature, top_k, top_p))
  ref = ref.numpy()
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampling_draws_from_the_filtered_distribution():
  _, model, params = _torch_t5(seed=3)
  n = 2000
  enc = np.tile(_t5_prompts(np.random.default_rng(3))[:1], (n, 1))
  cfg = decoding.DecodeConfig(method="sample", max_decode_len=1, temperature=0.8, top_k=6,
                              seed=1)
  first = decoding.generate(model, params, enc, config=cfg, eos_id=-1)[:, 0]
  logits = model.apply({"params": params}, enc[:1], np.zeros((1, 1), np.int32))[0, 0]
  want = np.asarray(jax.nn.softmax(decoding.warp_logits(logits[None], 0.8, 6)[0]))
  got = np.bincount(first, minlength=V_T5) / n
  assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))  # nothing outside the top 6
  np.testing.assert_allclose(got, want, atol=0.04)  # 4 sigma at n=2000
  # top_k=1 is greedy; another seed gives other draws; the same seed the same ones.
  g = decoding.generate(model, params, enc[:8], config=decoding.DecodeConfig(
      max_decode_len=5), eos_id=-1)
  s = decoding.generate(model, params, enc[:8], config=decoding.DecodeConfig(
      method="sample", top_k=1, max_decode_len=5), eos_id=-1)
  np.testing.assert_array_equal(g, s)
  again = decoding.generate(model, params, enc, config=cfg, eos_id=-1)[:, 0]
  np.testing.assert_array_equal(first, again)
  other = decoding.generate(model, params, enc, config=cfg, eos_id=-1,
                            rng=jax.random.PRNGKey(2))[:, 0]
  assert np.mean(first != other) > 0.2


def test_generator_batches_and_buckets_like_one_call():
  """The text-level Generator (fixed batch, bucketed widths, prefix-LM rows) equals
  decoding row by row; a long prompt is trimmed as training trims it."""
  _, model, params = _torch_llama(seed=5)

  class Vocab:
    eos_id = 1

    def encode(self, text):
      return [3 + (ord(c) % (V_LLAMA - 3)) for c in text]

    def decode(self, ids):
      return " ".join(map(str, ids))

  texts = ["abc", "a much longer prompt than the others", "xy", "hello there", "q"]
  gen = decoding.Generator(model, params, Vocab(), input_length=20, batch_size=2,
                           config=decoding.DecodeConfig(max_decode_len=5), kind="prefix_lm")
  out = gen.generate_ids([gen.encode(t) for t in texts])
  assert gen.truncated == 1
  for t, got in zip(texts, out):
    ids = (Vocab().encode(t) + [1])
    ids = ids if len(ids) <= 20 else ids[:19] + [1]
    row = np.array([[0] + ids], np.int32)
    want = decoding.generate(model, params, row, config=decoding.DecodeConfig(
        max_decode_len=5), eos_id=1, kind="prefix_lm")[0].tolist()
    assert got == decoding.strip_eos(want, 1)


def test_bad_decode_configs_name_the_field():
  for kw, field in [(dict(method="nucleus"), "method"), (dict(max_decode_len=0),
                    "max_decode_len"), (dict(method="sample", temperature=0), "temperature"),
                    (dict(method="sample", top_p=1.5), "top_p")]:
    with pytest.raises(UserError, match=field):
      decoding.DecodeConfig(**kw)


# ---------------------------------------------------------------- stop strings

INVENTED = ("There are 3 apples and 15 pears. So the answer is 18. That is 2 more than 16."
            "\n\nQ: How many pears are there?\nA: Let's think step by step. So the answer is 16.")


def _scripted(monkeypatch, vocab, reply):
  """decoding.generate_with_scores answers each prompt row with vocab.encode(reply(prompt))."""
  def fake(model, params, prompts, lengths, config, eos_id, kind):
    del model, params, config
    rows = []
    for p, n in zip(np.asarray(prompts), np.asarray(lengths)):
      text = vocab.decode([int(t) for t in kind.decode_prompt(p[:n])])
      rows.append(list(vocab.encode(reply(text))) + [eos_id])
    width = max(len(r) for r in rows)
    out = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    return out, np.zeros([len(rows)], np.float32)
  monkeypatch.setattr(decoding, "generate_with_scores", fake)


def test_stop_strings_cut_generations_at_the_first_occurrence(monkeypatch):
  import seqio
  from flanjax.data.collections import bbh
  seen = []
  monkeypatch.setattr(decoding, "_generate", lambda *a, config, **kw: seen.append(config) or (
      np.zeros([1, 2], np.int32), np.zeros([1], np.float32)))
  decoding.generate_with_scores(None, None, np.ones([1, 3]), config=decoding.DecodeConfig(
      stop=("x",)), kind="enc_dec")
  assert seen[0].stop == ()  # the compiled loop never sees stop strings: no recompiles
  vocab = seqio.ByteVocabulary()
  _scripted(monkeypatch, vocab, lambda prompt: INVENTED)
  cfg = decoding.DecodeConfig(stop=("\n\nQ:", "###"))
  gen = decoding.Generator(None, None, vocab, 64, cfg, batch_size=2, kind="enc_dec")
  texts = gen.generate_text(["a prompt", "another"])
  first = INVENTED[:INVENTED.index("\n\nQ:")]
  assert texts == [first, first]
  ids = gen.generate_ids([gen.encode("a prompt")])[0]
  assert vocab.decode(ids) == first  # the ids end where the text does
  assert bbh.extract_answer(texts[0], "bbh_object_counting") == "18"
  plain = decoding.Generator(None, None, vocab, 64, decoding.DecodeConfig(), kind="enc_dec")
  assert bbh.extract_answer(plain.generate_text(["x"])[0], "bbh_object_counting") == "16"
  assert decoding.cut_at_stop("ab###c\n\nQ:", ("\n\nQ:", "###")) == "ab"
  assert decoding.cut_at_stop("\n\nQ: at once", ("\n\nQ:",)) == ""
  assert decoding.cut_at_stop("nothing", ("\n\nQ:",)) == "nothing"
  assert decoding.DecodeConfig(stop="\n\nQ:").stop == ("\n\nQ:",)
  assert decoding.DecodeConfig(stop=["a", "b"]).stop == ("a", "b")
  with pytest.raises(UserError, match="stop"):
    decoding.DecodeConfig(stop=("",))


def test_stop_cut_on_tokens_that_straddle_the_stop_string():
  class Pieces:  # one token per piece: "18." then ".\n" straddles the stop "\n\n"
    pieces = ["", "", "So", " 18", ".\n", "\nQ:", " 16"]

    def decode(self, ids):
      return "".join(self.pieces[i] for i in ids)
  ids = decoding.cut_ids_at_stop([2, 3, 4, 5, 6], Pieces(), ("\n\nQ:",))
  assert ids == [2, 3, 4]  # the text before the stop is kept whole; its tail may show
  assert Pieces().decode(ids) == "So 18.\n"  # the first character of the stop string
  assert decoding.cut_ids_at_stop([2, 3], Pieces(), ("\n\nQ:",)) == [2, 3]


def test_bbh_cot_scores_the_models_own_answer_not_an_invented_one(monkeypatch):
  """Through the harness: outputs answering each question, then inventing a next question
  with another answer. The suite's stop string scores the first answer; without it, the
  invented one is read."""
  shared_data("bbh")
  import collections
  import gin
  import seqio
  from flanjax import config
  from flanjax.data import tasks as task_lib
  from flanjax.data.collections import bbh
  from flanjax.evaluation import harness
  for suite in ("eval/bbh.gin", "eval/gsm8k.gin", "eval/bbh_gsm8k.gin"):
    config.parse_gin(config.parse_args([f"--gin_file={suite}"]), finalize=False)
    try:
      assert decoding.DecodeConfig().stop == ("\n\nQ:",), suite
    finally:
      gin.clear_config()
  name = "bbh_object_counting"
  vocab = seqio.ByteVocabulary()
  before = task_lib.DEFS.get(name)
  task_lib.register(next(d for d in bbh.task_defs() if d.name == name), vocab, 8192)
  try:
    examples = harness.load_examples(name, "test", vocab, 8192, max_examples=3)
    gold = collections.defaultdict(lambda: "0", {e.inputs: e.targets for e in examples})
    wrong = lambda g: str(int(g) + 2)  # noqa: E731
    _scripted(monkeypatch, vocab, lambda prompt: (
        f"Counting them one by one. So the answer is {gold[prompt]}. That is 2 more than "
        f"{int(gold[prompt]) - 2}.\n\nQ: I have two more.\nA: Let's think step by step. "
        f"So the answer is {wrong(gold[prompt])}."))
    scores = {}
    for stop in ((), ("\n\nQ:",)):
      gen = decoding.Generator(None, None, vocab, 8192, decoding.DecodeConfig(stop=stop),
                               batch_size=2, kind="enc_dec")
      r = harness.evaluate_one(None, None, vocab, "enc_dec", name, "test", gen,
                               input_length=8192, examples=examples, rank_classification=False)
      scores[stop] = r.metrics["exact_match"]
    assert scores == {(): 0.0, ("\n\nQ:",): 100.0}
  finally:
    if before is not None:
      task_lib.register(before.defn, before.vocabulary, before.input_length)


def test_infer_takes_stop_strings():
  from flanjax import infer
  args = infer._parser().parse_args(  # pylint: disable=protected-access
      ["--checkpoint", "x", "--stop", "\\n\\nQ:", "--stop", "###", "--stop", "é"])
  assert infer._decode_config(args).stop == ("\n\nQ:", "###", "é")  # pylint: disable=protected-access
  args = infer._parser().parse_args(["--checkpoint", "x", "--stop", ""])  # pylint: disable=protected-access
  with pytest.raises(UserError, match="stop"):
    infer._decode_config(args)  # pylint: disable=protected-access
