"""The benchmark end to end at a minuscule size (no timings asserted); its FLOP count: test_flops."""

import json

import gin
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  from benchmarks import run as bench
  out = tmp_path_factory.mktemp("bench") / "smoke.json"
  try:
    bench.main([f"--gin_file={bench.HERE}/configs/smoke.gin", f"--out={out}", "--quiet"])
  finally:
    gin.clear_config()
  with open(out, encoding="utf-8") as f:
    return json.load(f)


def test_json_has_every_section(result):
  for key in ("command", "machine", "load_start", "load_end", "settings", "data", "models",
              "train", "generate", "targets", "table", "total_seconds"):
    assert key in result, key
  assert result["machine"]["threads"]["torch_intra_op"] >= 1
  for m in ("t5", "decoder"):
    tr = result["train"][m]
    for stack in ("flanjax", "torch_eager"):
      assert tr["padded"][stack]["tokens_per_s"] > 0
    assert "skipped" in tr["padded"]["torch_compile"]
    for run in ("flanjax_packed", "torch_eager_random", "torch_eager_grouped"):
      assert tr["real"][run]["real_tokens_per_s"] > 0
    gen = result["generate"][m]["batch_2"]
    assert gen["flanjax"]["tokens_per_s"] > 0 and gen["torch_eager"]["tokens_per_s"] > 0
  assert "flanjax / eager" in result["table"]


def test_both_stacks_saw_the_same_real_tokens(result):
  for m in ("t5", "decoder"):
    real = result["train"][m]["real"]
    n = real["flanjax_packed"]["real_tokens"]
    assert n > 0
    assert real["torch_eager_random"]["real_tokens"] == n
    assert real["torch_eager_grouped"]["real_tokens"] == n
    assert real["flanjax_packed"]["examples"] == real["torch_eager_random"]["examples"]
    # Packing leaves less padding than padding each batch to its longest.
    assert real["flanjax_packed"]["non_padding_share"] > 0.5
    padded = result["train"][m]["padded"]
    assert padded["flanjax"]["padded_tokens"] == padded["torch_eager"]["padded_tokens"]


def test_both_stacks_start_from_the_same_weights(result):
  for m in ("t5", "decoder"):
    assert result["train"][m]["parity"]["abs_diff"] < 1e-3

