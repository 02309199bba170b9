"""Evaluation: log-likelihood scoring against transformers, rank classification, answer
extraction on real BBH and GSM8K targets, and the evaluate command end to end."""

import json
import math

import jax
import numpy as np
import pytest

from conftest import shared_data
from flanjax.evaluation import scoring
from flanjax.models import hf, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 96


# ---------------------------------------------------------------- tiny models

def _hf_t5(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=V, d_model=32, d_ff=48, num_layers=2,
                              num_decoder_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              relative_attention_num_buckets=16, decoder_start_token_id=0,
                              pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # HF's init is tiny for some weights: widen it
      p.normal_(0.0, 0.5)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 0.3)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  hf_cfg = model.config.to_dict()
  hf_cfg["tie_word_embeddings"] = False
  hf_cfg.pop("scale_decoder_outputs", None)
  ours = hf.t5_config_from_hf(hf_cfg)
  return model, t5.T5(ours), hf.t5_params_from_hf(sd, ours)


def _hf_llama(seed=0):
  from flanjax.models import decoder
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                                 rms_norm_eps=1e-5, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 1.0 if "embed_tokens" in name else 0.2)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  ours = hf.llama_config_from_hf(model.config.to_dict())
  return model, decoder.Decoder(ours), hf.llama_params_from_hf(sd, ours)


def _requests(seed=0, n=7):
  """Contexts and continuations of varied lengths (one context long enough for a second bucket)."""
  rng = np.random.default_rng(seed)
  ctx = [rng.integers(2, V, size=int(k)).tolist() for k in rng.integers(1, 12, size=n)]
  ctx[2] = rng.integers(2, V, size=21).tolist()
  cont = [rng.integers(2, V, size=int(k)).tolist() for k in rng.integers(1, 6, size=n)]
  return ctx, cont


def _ref_logprobs(logits, targets):
  logp = torch.log_softmax(logits.double(), dim=-1)
  picked = logp[torch.arange(len(targets)), torch.tensor(targets)]
  greedy = bool((logits.argmax(-1) == torch.tensor(targets)).all())
  return float(picked.sum()), greedy


@pytest.fixture(scope="module")
def tiny_t5():
  return _hf_t5()


@pytest.fixture(scope="module")
def tiny_llama():
  return _hf_llama()


# ---------------------------------------------------------------- scoring

def test_t5_loglikelihood_equals_transformers(tiny_t5):
  hf_model, model, params = tiny_t5
  ctx, cont = _requests()
  cont = [c + [1] for c in cont]  # EOS-terminated, as seqio targets
  got, greedy = scoring.loglikelihood(model, params, "t5", ctx, cont, batch_size=4)
  for i, (c, y) in enumerate(zip(ctx, cont)):
    with torch.no_grad():
      logits = hf_model(input_ids=torch.tensor([c]),
                        decoder_input_ids=torch.tensor([[0] + y[:-1]])).logits[0]
    want, want_greedy = _ref_logprobs(logits, y)
    assert got[i] == pytest.approx(want, abs=2e-4), i
    assert greedy[i] == want_greedy
  # A continuation that is the model's own greedy choice is flagged as such.
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([ctx[0]]), max_new_tokens=4, do_sample=False,
                            num_beams=1, eos_token_id=None)[0, 1:].tolist()
  _, g = scoring.loglikelihood(model, params, "t5", [ctx[0]], [out], batch_size=4)
  assert g[0]


@pytest.mark.parametrize("prefix_lm", [False, True], ids=["causal", "prefix-lm"])
def test_decoder_loglikelihood_equals_transformers(tiny_llama, prefix_lm):
  hf_model, model, params = tiny_llama
  ctx, cont = _requests(1)
  got, greedy = scoring.loglikelihood(model, params, "decoder", ctx, cont, prefix_lm=prefix_lm,
                                      batch_size=4)
  for i, (c, y) in enumerate(zip(ctx, cont)):
    row = ([0] if prefix_lm else []) + c + y
    n_ctx = len(row) - len(y)
    kw = {}
    if prefix_lm:  # a 4-D mask: causal, plus [0] + context attending both ways
      allowed = torch.tril(torch.ones(len(row), len(row), dtype=torch.bool))
      allowed[:n_ctx, :n_ctx] = True
      kw["attention_mask"] = allowed[None, None]
    with torch.no_grad():
      logits = hf_model(input_ids=torch.tensor([row]), **kw).logits[0]
    want, want_greedy = _ref_logprobs(logits[n_ctx - 1:len(row) - 1], y)
    assert got[i] == pytest.approx(want, abs=2e-4), (i, prefix_lm)
    assert greedy[i] == want_greedy


def test_scoring_edge_cases(tiny_llama):
  _, model, params = tiny_llama
  ctx, cont = _requests(2, n=3)
  full, _ = scoring.loglikelihood(model, params, "decoder", ctx, cont, batch_size=2)
  # Order and batch size do not change a score; an empty continuation is 0 and greedy.
  rev, _ = scoring.loglikelihood(model, params, "decoder", ctx[::-1], cont[::-1], batch_size=3)
  np.testing.assert_allclose(rev[::-1], full, atol=1e-5)
  s, g = scoring.loglikelihood(model, params, "decoder", [[5]], [[]])
  assert s[0] == 0.0 and g[0]
  # Over-long requests keep their end: the context loses its first tokens.
  long_ctx = list(range(2, 40))
  cut, _ = scoring.loglikelihood(model, params, "decoder", [long_ctx], [[7, 8]], max_length=10)
  same, _ = scoring.loglikelihood(model, params, "decoder", [long_ctx[-8:]], [[7, 8]])
  assert cut[0] == pytest.approx(same[0], abs=1e-5)
  with pytest.raises(ValueError, match="non-empty context"):
    scoring.loglikelihood(model, params, "decoder", [[]], [[3]])
  assert [scoring.bucket(n) for n in (1, 16, 17, 1000, 1025, 3000)] == [16, 16, 32, 1024, 1536, 3072]
