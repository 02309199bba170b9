"""python -m flanjax.analyze token-shift: against itself, against a brute-force forward pass."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax import analyze
from flanjax.errors import UserError
from flanjax.models import hf, kinds, loading
from flanjax.models.t5 import T5Config

PROMPTS = ["Is 4521 even or odd?", "Review: The film was dull.\nIs this review positive or "
           "negative?", "Reverse the order of this list: cat, dog, bus", "<b>5 & 6</b>?"]


def _t5_dir(root, vocab, seed):
  """A random 32-d T5 as a Hugging Face folder, weights widened so argmax is no coin toss."""
  cfg = T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                 num_encoder_layers=2, num_decoder_layers=2)
  model = kinds.ENC_DEC.build(cfg)
  params = model.init(jax.random.PRNGKey(seed), **kinds.ENC_DEC.dummy_batch(1, 4, 4))["params"]
  import flax.linen as nn
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, nn.unbox(params))
  path = root / f"t5_{seed}"
  hf.save(cfg, params, str(path), vocabulary=vocab)
  return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, builtin_vocab):
  root = tmp_path_factory.mktemp("token_shift")
  return root, _t5_dir(root, builtin_vocab, 0), _t5_dir(root, builtin_vocab, 1)


def _brute_ranks(loaded, prompt, tokens):
  """Ranks from one full teacher-forced forward pass (no cache) of the T5 (its encoder
  input 0-padded to 64, the decoder's to 16: padding is masked / after the causal end)."""
  ids = kinds.ENC_DEC.prompt_ids(loaded.vocab, prompt)
  enc = np.zeros((1, 64), np.int32)
  enc[0, :len(ids)] = ids
  dec_in = np.zeros((1, 16), np.int32)
  dec_in[0, 1:len(tokens)] = tokens[:-1]
  logits = jax.jit(loaded.model.apply)({"params": loaded.params}, enc, dec_in)[0]
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  out = []
  for i, t in enumerate(tokens):
    out.append((int(np.sum(logp[i] > logp[i, t])), float(logp[i, t]), np.sort(logp[i])[::-1]))
  return out


# Both tests decode 10 tokens in batches of 2 at the command's input length (512), so
# they share their compilations.
def test_a_model_against_itself_is_all_top1_through_the_command(models, tmp_path, capsys):
  root, a, _ = models
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    analyze.main(["token-shift", "--base", a, "--tuned", a, "--prompts", str(prompts),
                  "--out", str(out), "--max_new_tokens", "10", "--batch_size", "2"])
  assert e.value.code == 0
  report = json.loads((out / "token_shift.json").read_text())
  assert report["prompts"] == 4 and report["positions"] >= 4
  assert report["shares"] == {"unshifted": 1.0, "marginal": 0.0, "shifted": 0.0}
  assert report["top_shifted_tokens"] == []
  assert "unshifted (base top-1) 100.0%" in capsys.readouterr().out
  page = (out / "token_shift.html").read_text()
  assert "&lt;b&gt;5 &amp; 6&lt;/b&gt;?" in page and "<b>5" not in page


def test_shares_equal_a_brute_force_count(models):
  root, a, b = models
  base, tuned = loading.load(a), loading.load(b)
  shift = analyze.token_shift(base, tuned, PROMPTS, max_new_tokens=10, input_length=512,
                              batch_size=2, log=lambda _: None)
  counts = {c: 0 for c in analyze.CLASSES}
  for p in shift.prompts:
    toks = [t["id"] for t in p["tokens"]]
    assert 1 <= len(toks) <= 10
    # The tuned model's greedy tokens, checked by its own forward pass (rank 0 each).
    assert all(r == 0 for r, _, _ in _brute_ranks(tuned, p["prompt"], toks))
    for t, (rank, lp, sorted_lp) in zip(p["tokens"], _brute_ranks(base, p["prompt"], toks)):
      # rel 3e-4: the cached decode and the full forward sum in different float32 orders
      # (blocked attention), which moves a -40 log-probability by up to ~1e-2.
      assert t["base_logprob"] == pytest.approx(lp, rel=3e-4, abs=1e-3)
      near_tie = np.min(np.abs(sorted_lp[:4] - lp)[np.abs(sorted_lp[:4] - lp) > 0],
                        initial=1.0) < 1e-4 * max(1.0, abs(lp))
      assert t["rank"] == rank or near_tie
      counts[analyze.shift_class(rank)] += 1
  n = sum(counts.values())
  assert shift.positions == n
  for c in analyze.CLASSES:
    assert shift.shares()[c] == pytest.approx(counts[c] / n, abs=1.0 / n)
  # Two different random models: not everything is unshifted.
  assert shift.shares()["unshifted"] < 1.0
  top = shift.top_shifted(5)
  shifted = [t["text"] for p in shift.prompts for t in p["tokens"] if t["class"] == "shifted"]
  assert [t["count"] for t in top] == sorted((shifted.count(x) for x in set(shifted)),
                                             reverse=True)[:5]


def test_different_vocabularies_are_one_line(models):
  import seqio
  root, a, _ = models
  base = loading.load(a)
  other = loading.Loaded(base.model, base.config, base.params, seqio.ByteVocabulary(), base.kind,
                         "bytes")
  with pytest.raises(UserError, match="different vocabularies") as e:
    analyze.check_same_vocabulary(base, other, "base_dir", "tuned_dir")
  assert "\n" not in str(e.value)


def test_the_page_escapes_every_text():
  report = {"base": "<a>", "tuned": "t", "prompts": 1, "positions": 1,
            "shares": {"unshifted": 0.0, "marginal": 0.0, "shifted": 1.0},
            "top_shifted_tokens": [{"token": "<script>", "count": 1, "base_preferred": "'\""}],
            "per_prompt": [{"prompt": "x<y", "tokens": [
                {"text": "</p><script>", "class": "shifted", "rank": 7,
                 "base_top1_text": "'><img>"}]}]}
  page = analyze.to_html(report)
  assert "<script>" not in page and "<img>" not in page and "<a>" not in page
  assert "&lt;/p&gt;&lt;script&gt;" in page and "x&lt;y" in page
