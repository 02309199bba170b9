"""A converted checkpoint (tools/convert_checkpoint.py's orbax folder) keeps the model's
attention_impl, attention_block, remat and scan_layers, and its parameters in that layout."""

import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from flanjax.models import loading, stack, t5

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import convert_checkpoint  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_converted_checkpoint_keeps_attention_and_scan_settings(tmp_path):
  cfg = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, scan_layers=True, remat=True,
                    attention_impl="blockwise", attention_block=8)
  params = nn.unbox(t5.T5(cfg).init(jax.random.PRNGKey(0), **t5.dummy_batch(1, 4, 4))["params"])
  out = tmp_path / "converted"
  convert_checkpoint.write_orbax(str(out), cfg, params)
  got_cfg, got, _, _ = loading.read_orbax(str(out))
  assert got_cfg == cfg
  assert json.loads((out / loading.CONFIG_FILE).read_text())["config"]["attention_impl"] == \
      "blockwise"
  assert "encoder_layers" in got  # still stacked, as the scanned model applies it
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  # The same folder read as unscanned (--config without scan_layers) unstacks the layers.
  plain = tmp_path / "plain.json"
  plain.write_text(json.dumps(loading.config_to_json(
      t5.T5Config(**{**json.loads((out / loading.CONFIG_FILE).read_text())["config"],
                     "scan_layers": False}))))
  plain_cfg, unscanned, _, _ = loading.read_orbax(str(out), config=str(plain))
  assert not plain_cfg.scan_layers and plain_cfg.attention_impl == "blockwise"
  np.testing.assert_array_equal(unscanned["encoder_layer_1"]["mlp"]["wo"],
                                params["encoder_layers"]["mlp"]["wo"][1])
  assert stack.layout(unscanned, cfg).keys() == params.keys()
