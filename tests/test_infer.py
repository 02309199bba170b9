"""python -m flanjax.infer on a Hugging Face folder and real GSM8K questions, against
transformers' generate on the same weights; bad inputs give one-line errors."""

import json
import os

import numpy as np
import pytest

from flanjax import infer
from flanjax.models import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GSM8K_TEST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k",
                          "test.jsonl")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  """A random T5 (widened weights, so argmax is not a coin toss) with a real tokenizer."""
  from flanjax.data import vocab as vocab_lib
  vocab = vocab_lib.builtin_vocabulary(vocab_size=1000)
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=1024, d_model=32, d_ff=48, num_layers=2,
                              num_decoder_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.5)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(1024, 32) * 0.3)
  hf_cfg = model.config.to_dict()
  hf_cfg["tie_word_embeddings"] = False
  hf_cfg.pop("scale_decoder_outputs", None)
  ours = hf.t5_config_from_hf(hf_cfg)
  params = hf.t5_params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, ours)
  path = tmp_path_factory.mktemp("t5")
  hf.save(ours, params, str(path), vocabulary=vocab)
  # As infer reads it back: 1,000 pieces then 24 sentinels filling the 1,024 rows.
  return str(path), model, hf.load_config(str(path))[1]


def _questions(n):
  if not os.path.isfile(GSM8K_TEST):
    pytest.skip(f"real data not found at {os.path.abspath(GSM8K_TEST)} (../shared/data)")
  with open(GSM8K_TEST) as f:
    return [json.loads(next(f)) for _ in range(n)]


def _main(argv, capsys):
  with pytest.raises(SystemExit) as e:
    infer.main(argv)
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def test_infer_jsonl_and_prompts_equal_transformers_generate(t5_dir, tmp_path, capsys):
  path, tmodel, vocab = t5_dir
  recs = _questions(3)
  src = tmp_path / "q.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in recs))
  dest = tmp_path / "out.jsonl"
  code, _, err = _main(["--checkpoint", path, "--input", str(src), "--output", str(dest),
                        "--method", "beam", "--num_beams", "3", "--max_decode_len", "7",
                        "--batch_size", "2"], capsys)
  assert code == 0, err
  got = [json.loads(line) for line in dest.read_text().splitlines()]
  assert [g["prompt"] for g in got] == [r["question"] for r in recs]
  assert [g["answer"] for g in got] == [r["answer"] for r in recs]  # other fields kept
  for rec, g in zip(recs, got):
    ids = list(vocab.encode(rec["question"])) + [1]
    with torch.no_grad():
      ref = tmodel.generate(torch.tensor([ids]), num_beams=3, do_sample=False,
                            max_new_tokens=7, decoder_start_token_id=0, eos_token_id=1,
                            pad_token_id=0)[0, 1:].tolist()
    ref = ref[:ref.index(1)] if 1 in ref else ref
    assert g["generation"] == vocab.decode(ref)
    assert g["new_tokens"] == len(ref)
  # Prompts on the command line, greedy, to stdout.
  code, out, err = _main(["--checkpoint", path, "--max_decode_len", "5", recs[0]["question"]],
                         capsys)
  assert code == 0, err
  (line,) = out.splitlines()
  ids = list(vocab.encode(recs[0]["question"])) + [1]
  with torch.no_grad():
    ref = tmodel.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=5,
                          decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)[0, 1:]
  ref = ref.tolist()
  assert json.loads(line)["generation"] == vocab.decode(ref[:ref.index(1)] if 1 in ref else ref)
  assert "prompts/s" in err


def test_infer_bad_inputs_are_one_line_errors(t5_dir, tmp_path, capsys):
  path, _, _ = t5_dir
  rec = _questions(1)[0]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rec) + "\n" + '{"question": "cut off\n')
  cases = [
      (["--checkpoint", path, "--input", str(bad)], f"{bad}:2", "not valid JSON"),
      (["--checkpoint", path, "--input", str(bad), "--field", "nope"], f"{bad}:1", "'nope'"),
      (["--checkpoint", str(tmp_path / "missing"), "hi"], "is not a directory", "Hugging Face"),
      (["--checkpoint", str(tmp_path), "hi"], "holds no checkpoint", "checkpoints/<step>"),
      (["--checkpoint", path], "no prompts", "--input"),
      (["--checkpoint", path, "--method", "sample", "--top_p", "0", "hi"], "top_p", "(0, 1]"),
      (["--checkpoint", path, "--input", str(bad), "--output", str(bad)], "is the --input file",
       "another path"),
      (["--checkpoint", path, "--output", str(tmp_path), "hi"], "is a folder", "JSON lines"),
  ]
  for argv, *needles in cases:
    code, _, err = _main(argv, capsys)
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
      assert n in lines[0], (n, lines[0])
  assert bad.read_text().startswith(json.dumps(rec))  # the prompts are still there
  # Sizes of 0 are usage errors (argparse's: usage, then the one error line), not a traceback.
  for flag in ("--batch_size", "--max_input_length", "--max_decode_len"):
    code, _, err = _main(["--checkpoint", path, flag, "0", "hi"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"argument {flag}: 0 is below 1; give 1 or more" in err.strip().splitlines()[-1]
