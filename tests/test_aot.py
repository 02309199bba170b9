"""flanjax.aot: the trainer's step compiled for a TPU topology on this CPU host (libtpu)."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `pip install "jax[tpu]==<jax>"` adds: libtpu (jax 0.10.2 requires libtpu 0.0.42.*).
LIBTPU = "libtpu==0.0.42.*"


def _libtpu_path():
  """A folder on which `import libtpu` works: the environment's, else a cached pip install
  (the tpu extra's libtpu, installed once from the package index); skips if neither."""
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return ""
  except ImportError:
    pass
  if jax.__version__ != "0.10.2":
    pytest.skip(f"{LIBTPU} is pinned for jax 0.10.2, this is jax {jax.__version__}")
  target = os.path.join(os.path.expanduser("~"), ".cache", "flanjax", "libtpu-0.0.42")
  if not os.path.isdir(os.path.join(target, "libtpu")):
    got = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--target", target, LIBTPU], capture_output=True, text=True,
                         timeout=900, check=False)
    if got.returncode:
      pytest.skip(f"libtpu could not be installed from the package index: "
                  f"{(got.stderr.strip().splitlines() or ['?'])[-1][:200]}")
  return target


def _run_aot(tmp_path, *flags):
  """`python -m flanjax.aot --gin_file=flan.gin --topology=v5e:2x2 FLAGS --json=...` with
  libtpu on the path: (the finished process, the JSON file's path)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_libtpu_path(), REPO) if p))
  out = tmp_path / "aot.json"
  cmd = [sys.executable, "-m", "flanjax.aot", "--gin_file=flan.gin", "--topology=v5e:2x2",
         *flags, f"--json={out}"]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200,
                        check=False), out


def test_tiny_t5_train_and_decode_steps_compile_for_a_v5e_topology(tmp_path):
  # 0.01 GiB: the train step's state alone (~13 MB) does not fit, the decode step does.
  got, out = _run_aot(tmp_path, "--gin.train.task_feature_lengths={'inputs': 64, 'targets': 16}",
                      "--gin.train.batch_size=8", "--decode", "--decode_batch=4",
                      "--hbm_gib=0.01")
  assert got.returncode in (0, 1), got.stderr[-3000:]
  train, decode = json.loads(out.read_text())
  assert train["devices"] == decode["devices"] == 4
  assert train["device_kind"] == "TPU v5 lite"
  for r in (train, decode):
    assert r["fits"] == (r["total_gib"] <= 0.01)
  assert got.returncode == (0 if train["fits"] and decode["fits"] else 1)
  assert not train["fits"] and decode["fits"]
  assert "does NOT fit" in got.stdout
  # A data-parallel mesh replicates the parameters: every device holds all of them.
  from flanjax.models import t5  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", "tiny.gin"))
  cfg = t5.T5Config(vocab_size=1024)  # flan.gin's 1000-piece vocabulary, rounded up to 128
  gin.clear_config()
  assert train["params_gib"] * 2**30 == pytest.approx(cfg.num_params() * 4, rel=1e-9)
  # The step's matmuls: 6 FLOPs per weight and token it multiplies (forward and backward);
  # encoder weights see the 64 inputs, decoder weights and the output the 16 targets, a
  # quarter of the batch per device. Attention's scores and the optimizer add a little.
  d, f, hk = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv
  enc = cfg.num_encoder_layers * (4 * d * hk + 3 * d * f)
  dec = cfg.num_decoder_layers * (8 * d * hk + 3 * d * f) + d * cfg.vocab_size
  matmuls = 6 * (enc * 64 + dec * 16) * 8 / 4
  assert 1.0 < train["flops_per_device"] / matmuls < 2
  # The step times use the model's count (MFU's; XLA counts a scanned stack's body once),
  # which holds the same matmuls plus attention's scores.
  assert 1.0 < train["model_flops_per_device"] / matmuls < 1.2
  assert train["model_flops_per_device"] <= train["flops_per_device"]
  assert train["step_seconds_at_50pct_mfu"] == pytest.approx(
      2 * train["model_flops_per_device"] / 197e12)


def test_a_step_xla_refuses_for_memory_ends_in_one_line_and_exit_1(tmp_path):
  # One layer each way, 4,096 rows of 1,024 inputs under the reference attention: its
  # [1024, 4, 1024, 1024] scores per chip alone are 16 GiB in fp32, a v5e chip's whole HBM;
  # XLA refuses it at compile time (RESOURCE_EXHAUSTED). (2,048 rows needed 20.72 GiB of
  # temporaries before attention._softmax_values and fit in 14.51 GiB after it.)
  got, out = _run_aot(tmp_path, "--gin.train.task_feature_lengths={'inputs': 1024, 'targets': 16}",
                      "--gin.train.batch_size=4096", "--gin.T5Config.num_encoder_layers=1",
                      "--gin.T5Config.num_decoder_layers=1")
  assert got.returncode == 1, got.stderr[-3000:]
  assert "Traceback" not in got.stderr
  [row] = json.loads(out.read_text())
  assert not row["fits"] and row["total_gib"] is None
  assert row["temp_gib"] > row["hbm_gib"] > 15  # XLA's figures, in GiB
  last = got.stdout.strip().splitlines()[-1]
  assert last.startswith("train step does NOT fit 4 x TPU v5 lite (v5e:2x2): it needs "
                         f"{row['temp_gib']:.2f} GiB")
  assert f"{row['hbm_gib']:.2f} GiB XLA leaves free of 16 GiB HBM" in last
  for fix in ("train.batch_size (now 4096)", "train.microbatches (now 1)",
              "T5Config.remat=True", "T5Config.attention_impl='blockwise'", "more chips"):
    assert fix in last


def test_hbm_refusal_reads_both_of_xlas_wordings_and_nothing_else():
  from flanjax import aot  # pylint: disable=g-import-not-at-top
  new = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                     "for HLO temporaries (18.82G) exceeds available HBM (15.75G).")
  old = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
                     "in memory space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm capacity "
                     "by 5.02G.")
  assert aot.hbm_refusal(new)[:2] == (18.82, 15.75)
  assert aot.hbm_refusal(old)[:2] == (20.5, 15.48)
  assert aot.hbm_refusal(RuntimeError("RESOURCE_EXHAUSTED: 512M"))[:2] == (None, None)
  assert aot.hbm_refusal(RuntimeError("INVALID_ARGUMENT: a shape")) is None


def test_lora_step_compiles_with_a_frozen_bf16_base_and_no_weight_gradients(tmp_path):
  # train.peft as the trainer reads it: rank-4 LoRA on every T5 projection, the base in bf16.
  got, out = _run_aot(tmp_path, "--gin.train.task_feature_lengths={'inputs': 64, 'targets': 16}",
                      "--gin.train.batch_size=8", "--gin.train.peft=@LoraConfig()",
                      "--gin.LoraConfig.rank=4", "--gin.LoraConfig.base_dtype='bfloat16'",
                      "--gin.LoraConfig.targets=['q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wo']")
  assert got.returncode == 0, got.stderr[-3000:]
  (train,) = json.loads(out.read_text())
  from flanjax.models import lora, t5  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin.parse_config_file(os.path.join(REPO, "gin_configs", "models", "tiny.gin"))
  cfg = t5.T5Config(vocab_size=1024)
  gin.clear_config()
  sites = lora.select(cfg, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"])
  n_lora = sum(4 * (math.prod(s.in_shape) + math.prod(s.out_shape)) for s in sites)
  # The state is the adapters' (fp32); the base, an argument, is held in bf16 (replicated).
  assert train["params_gib"] * 2**30 == pytest.approx(n_lora * 4, rel=1e-9)
  assert train["frozen_base_gib"] * 2**30 == pytest.approx(cfg.num_params() * 2, rel=1e-9)
  assert train["opt_state_gib"] * 2**30 < 0.05 * cfg.num_params() * 4
  # No weight gradients for the frozen base: XLA's FLOPs fall under the matmuls' forward
  # and backward count (full fine-tuning's step is 1-2x of it, the test above), to about
  # the forward and the input gradients (4 of 6 FLOPs per weight and token).
  d, f, hk = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv
  enc = cfg.num_encoder_layers * (4 * d * hk + 3 * d * f)
  dec = cfg.num_decoder_layers * (8 * d * hk + 3 * d * f) + d * cfg.vocab_size
  matmuls = 6 * (enc * 64 + dec * 16) * 8 / 4
  assert 0.6 < train["flops_per_device"] / matmuls < 1.0
  # The step times' count: full fine-tuning's (1.0-1.2x the matmuls, above) times 2/3.
  assert 2 / 3 < train["model_flops_per_device"] / matmuls < 2 / 3 * 1.2
  assert "frozen base" in got.stdout and "adapters" in got.stdout


def test_a_v4_topology_has_one_device_per_chip():
  # A v4 chip's two TensorCores are one JAX device (megacore), as on the hardware: v4-8 is
  # 4 devices of 32 GiB, not libtpu's default of 8 per-core devices.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_libtpu_path(), REPO) if p))
  code = ("from flanjax import aot; d = aot.topology_devices('v4:2x2x1'); "
          "print(len(d), d[0].device_kind)")
  got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=600, check=False)
  assert got.returncode == 0, got.stderr[-2000:]
  assert got.stdout.strip().splitlines()[-1] == "4 TPU v4"


def test_the_flash_kernel_compiles_for_the_topology(tmp_path):
  # attention_impl='flash' is refused on this CPU's own devices (tests/test_flash_tpu.py);
  # for a TPU topology its Pallas kernel lowers, under the mesh, in the trainer's step.
  got, out = _run_aot(tmp_path, "--gin.train.task_feature_lengths={'inputs': 128, 'targets': 16}",
                      "--gin.train.batch_size=8", "--gin.T5Config.attention_impl='flash'")
  assert got.returncode == 0, got.stderr[-3000:]
  (train,) = json.loads(out.read_text())
  assert train["devices"] == 4 and train["fits"]
