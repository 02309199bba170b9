"""Generation throughput: greedy, a fixed number of new tokens, batch 1 and 16.

Both stacks get the same weights and the same prompts (random ids, no
padding) and must produce exactly `new_tokens` tokens per row: transformers'
`generate(min_new_tokens=max_new_tokens=N)`, and flanjax's decoding with an EOS
id that never occurs (-1). Both use a key-value cache. tokens/s counts new
tokens (batch x N); the prompt's time (encoder or prefill) is included.

A window repeats the call until it lasts about `min_window_s` (the count is set
from one timed warm call): a single batch-1 call is ~50 ms, a few of /proc/stat's
10 ms ticks, which made the other processes' share of the CPU in it tick noise.
"""

from __future__ import annotations

import math
import time

import numpy as np

from benchmarks import common
from benchmarks import stacks


def _flanjax_generate(fj):
  """(api name, fn(prompts, n) -> [b, n] ids) with the best decoding API present."""
  import jax  # pylint: disable=g-import-not-at-top
  model = fj.model
  params = jax.device_put(fj.params())
  try:
    from flanjax.decoding import DecodeConfig, generate  # pylint: disable=g-import-not-at-top

    def fn(prompts, n):
      return np.asarray(generate(model, params, prompts, None,
                                 DecodeConfig(method="greedy", max_decode_len=n), eos_id=-1))
    return "flanjax.decoding.generate", fn
  except ImportError:
    pass


def _hf_generate(th, kind):
  torch = th.torch

  def fn(prompts, n):
    ids = torch.from_numpy(prompts.astype(np.int64)).to(th.dev)
    with torch.inference_mode(), th._cast():  # pylint: disable=protected-access
      out = th.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              num_beams=1, pad_token_id=0, eos_token_id=1,
                              decoder_start_token_id=0 if kind == "enc_dec" else None,
                              use_cache=True)
    out = out.cpu().numpy()
    # T5's output starts with the decoder start token; a decoder's, with the prompt.
    return out[:, 1:] if kind == "enc_dec" else out[:, prompts.shape[1]:]
  return fn


def _calls_per_window(fn, min_window_s: float) -> int:
  """Calls per timed window so that it lasts about min_window_s (fn is warm: compiled)."""
  t0 = time.perf_counter()
  fn()
  return max(1, math.ceil(min_window_s / max(time.perf_counter() - t0, 1e-6)))


def _windows(fn, reps: int, calls: int, tokens_per_call: int):
  w = common.Windows()
  for _ in range(reps):
    w.time(lambda: [fn() for _ in range(calls)], calls * tokens_per_call)
  return w


def _figure(w, calls: int, device, dtype, **extra) -> dict:
  """A generation figure: new tokens/s, the median over windows of `calls` calls each."""
  f = w.summary()
  return {"tokens_per_s": f["median"], "tokens_per_s_min": f["min"], "tokens_per_s_max": f["max"],
          "windows": f["windows"], "calls_per_window": calls,
          "seconds_per_call": round(float(np.median(w.seconds)) / calls, 4),
          "device": device, "dtype": dtype, "load_before": f["load_before"],
          "load_after": f["load_after"], "others_cpu_share": f.get("others_cpu_share"),
          "steal_cpu_share": f.get("steal_cpu_share"),
          "quiet": f["quiet"], **extra}


def _common_prefix(a, b) -> float:
  """Mean share of each row's tokens before the stacks' first disagreement."""
  n = a.shape[1]
  same = np.cumprod(a == b, axis=1).sum(axis=1)
  return float(np.mean(same / n))


def run(cfg, batch_sizes, prompt_len: int, new_tokens: int, reps: int, seed: int,
        vocab_ids: int, log, min_window_s: float = 0.5) -> dict:
  kind = stacks.packing_kind(cfg)
  name = stacks.family(cfg)
  fj = stacks.Flanjax(cfg, stacks.AdamW(), seed)
  th = stacks.Torch(cfg, fj.params(), stacks.AdamW())
  th.model.eval()
  api, ours = _flanjax_generate(fj)
  theirs = _hf_generate(th, kind)
  out = {"flanjax_api": api, "prompt_len": prompt_len, "new_tokens": new_tokens,
         "hf": "generate(do_sample=False, num_beams=1, min_new_tokens=max_new_tokens)"}
  rng = np.random.default_rng(seed)
  for b in batch_sizes:
    prompts = rng.integers(3, vocab_ids, (b, prompt_len)).astype(np.int32)
    t0 = time.perf_counter()
    first = ours(prompts, new_tokens)
    compile_s = time.perf_counter() - t0
    assert first.shape == (b, new_tokens), first.shape
    call_fj = lambda: ours(prompts, new_tokens)  # pylint: disable=cell-var-from-loop
    calls_fj = _calls_per_window(call_fj, min_window_s)
    w_fj = _windows(call_fj, reps, calls_fj, b * new_tokens)
    ref = theirs(prompts, new_tokens)  # warm-up
    assert ref.shape == (b, new_tokens), ref.shape
    call_hf = lambda: theirs(prompts, new_tokens)  # pylint: disable=cell-var-from-loop
    calls_hf = _calls_per_window(call_hf, min_window_s)
    w_hf = _windows(call_hf, reps, calls_hf, b * new_tokens)
    res = {"flanjax": _figure(w_fj, calls_fj, fj.device, fj.dtype,
                              compile_and_first_call_s=round(compile_s, 2)),
           "torch_eager": _figure(w_hf, calls_hf, th.device, th.dtype),
           "greedy_agreement": round(_common_prefix(first, ref), 3)}
    out[f"batch_{b}"] = res
    log(f"{name} generate b={b}: flanjax {res['flanjax']['tokens_per_s']:,.0f} tok/s, "
        f"HF {res['torch_eager']['tokens_per_s']:,.0f} tok/s "
        f"(agreement {res['greedy_agreement']:.2f})")
  return out
