"""Training with LoRA: only the adapters train (the optimizer state holds them alone, the base
is bit-identical after the steps), every mesh of 8 simulated devices gives the one-device
losses, a run killed with SIGKILL resumes to the same losses, checkpoints hold the adapters
only, and a resume over another base is refused in one line."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import command_in_process, devices_env  # noqa: E402  pylint: disable=g-import-not-at-top
from test_lora import tiny_t5  # noqa: E402  pylint: disable=g-import-not-at-top
from test_train_e2e import _interrupt_when, run_beside  # noqa: E402  pylint: disable=g-import-not-at-top

torch = pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_lora_meshes_agree_with_one_device_and_only_adapters_train(builtin_vocab):
  env = devices_env(8)
  proc = subprocess.run([sys.executable, os.path.join(HERE, "_lora_mesh_worker.py")], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  ref = res["(1, 1, 1)"]
  assert len(ref["losses"]) == 3 and ref["losses"][-1] < ref["losses"][0]
  for shape in ("(8, 1, 1)", "(2, 2, 2)", "(1, 1, 8)"):
    assert res[shape]["losses"] == pytest.approx(ref["losses"], abs=1e-5), shape
  for shape, r in res.items():
    assert r["base_unchanged"], shape  # bit-identical base after the steps
    # Adam's state: mu and nu of each adapter leaf and one step count, nothing of the base.
    assert r["opt_size"] == 2 * r["adapter_size"] + 1, shape
    assert {tuple(s) for s in r["opt_leaf_shapes"]} == (
        {tuple(s) for s in r["adapter_leaf_shapes"]} | {()})
    assert r["adapter_size"] < 0.11 * r["base_size"]
    # A takes the kernel's input axis (embed -> fsdp), B its output axes (heads -> model).
    assert (r["a_spec"], r["b_spec"]) == ("('fsdp', None)", "(None, 'model', None)")


def _hf_dir(path, vocab, seed=0):
  tiny_t5(vocab_size=1024, seed=seed).save_pretrained(str(path))
  with open(vocab.sentencepiece_model_file, "rb") as f:
    (path / "spiece.model").write_bytes(f.read())
  return path


def _cmd(hf_dir, run_dir, steps=6):
  return [sys.executable, "-m", "flanjax.train", "--gin_file=runs/lora_flan_t5.gin",
          f"--gin.HF_DIR={hf_dir}", f"--gin.train.model_dir={run_dir}",
          "--gin.train.batch_size=4", "--gin.train.log_every_secs=0",
          "--gin.train.task_feature_lengths={'inputs': 64, 'targets': 16}",
          f"--gin.train.num_steps={steps}", "--gin.Checkpointer.every_steps=2",
          "--gin.train.eval_at_end=False", "--gin.LoraConfig.dropout=0.0"]


def _losses(run_dir):
  with open(os.path.join(run_dir, "train_losses.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_lora_run_killed_resumes_to_the_same_losses_and_refuses_another_base(tmp_path,
                                                                             builtin_vocab):
  hf_dir = _hf_dir(tmp_path / "base", builtin_vocab)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  # The uninterrupted run needs nothing of the killed one: it runs beside it (its start, the
  # imports and the data, takes one core while the other's takes the other).
  straight, killed = tmp_path / "straight", tmp_path / "killed"

  def kill_and_resume():
    assert _interrupt_when(_cmd(hf_dir, killed), env, 2, signal.SIGKILL)[0] == -signal.SIGKILL
    return subprocess.run(_cmd(hf_dir, killed), capture_output=True, text=True, env=env,
                          timeout=900)

  code, straight_out, again = run_beside(_cmd(hf_dir, straight), env, tmp_path / "straight.log",
                                         kill_and_resume, 900)
  assert code == 0, straight_out[-5000:]
  assert "LoRA: rank 8, alpha 16 on 36 modules" in straight_out
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in again.stdout
  a, b = _losses(straight), _losses(killed)
  assert sorted(b) == list(range(1, 7))
  for s in range(1, 7):
    assert a[s] == pytest.approx(b[s], abs=1e-5), (s, a[s], b[s])

  # The checkpoint holds the adapters and their optimizer state only.
  from flanjax.models import loading
  saved = loading.restore_numpy(str(straight / "checkpoints" / "6" / "state"))
  names = {"/".join(p) for p in _paths(saved["params"])}
  assert names and all(n.endswith(("/a", "/b")) for n in names)
  assert len(names) == 2 * 36
  info = json.loads((straight / "run_info.json").read_text())
  assert info["adapter"]["base"]["path"] == str(hf_dir)

  # orbax-to-peft: PEFT loads the run's adapters over the base; the run read by flanjax (merged
  # over its recorded base), the base + --adapter RUN and orbax-to-hf's merged export agree.
  import numpy as np
  import peft
  import transformers
  sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
  import convert_checkpoint  # pylint: disable=g-import-not-at-top
  convert_checkpoint.main(["orbax-to-peft", str(straight), str(tmp_path / "peft")])
  convert_checkpoint.main(["orbax-to-hf", str(straight), str(tmp_path / "merged")])
  base_t = transformers.T5ForConditionalGeneration.from_pretrained(str(hf_dir))
  merged_t = peft.PeftModel.from_pretrained(base_t, str(tmp_path / "peft")).merge_and_unload()
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(2, 1000, size=(2, 9)), rng.integers(2, 1000, size=(2, 5))
  hf_logits = lambda m: _t5_logits(m, enc, dec)  # noqa: E731
  ref = hf_logits(merged_t).numpy()
  exported = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "merged"))
  np.testing.assert_allclose(hf_logits(exported).numpy(), ref, atol=1e-4, rtol=1e-4)
  for loaded in (loading.load(str(straight)), loading.load(str(hf_dir), adapter=str(straight))):
    ours = np.asarray(loaded.model.apply({"params": loaded.params}, enc, dec))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

  # Another base under the same folder: refused in one line naming the adapter's base.
  other = _hf_dir(tmp_path / "other", builtin_vocab, seed=3)
  os.replace(other / "model.safetensors", hf_dir / "model.safetensors")
  # (It stops before training: its main in this process, not a process of its own.)
  from flanjax import train  # pylint: disable=g-import-not-at-top
  code, _, err = command_in_process(train.main, _cmd(hf_dir, straight, steps=8)[3:],
                                    builtin_vocab, train.__file__)
  assert code != 0
  last = err.strip().splitlines()[-1]
  assert "different adapter config" in last and "fingerprint" in last, last
  # So are infer and evaluate given that other model with --adapter RUN (they ran it).
  from flanjax.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=rf"its adapters were trained over {hf_dir}, and .* is "
                     r"another model \(its fingerprint differs\)"):
    loading.load(str(hf_dir), adapter=str(straight))


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def _fake_lora_run(tmp_path):
  """A LoRA run's folder as the trainer leaves it (run_info.json, checkpoints/2/state) holding
  PEFT's adapters on q and v of a tiny T5 saved in tmp_path/base; and that PeftModel."""
  import numpy as np
  import orbax.checkpoint as ocp
  import peft
  from flanjax.models import hf, lora
  from flanjax.run_folder import model_record
  from test_lora import _peft_wrap  # pylint: disable=g-import-not-at-top
  base_t = tiny_t5()
  base_t.save_pretrained(str(tmp_path / "base"))
  cfg, params, _ = hf.load(str(tmp_path / "base"))
  model = _peft_wrap(base_t, ["q", "v"])
  state = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  adapters, chosen, _ = lora.from_peft(state, cfg, "peft")
  run = tmp_path / "run"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(run / "checkpoints" / "2" / "state"),
             {"params": adapters, "step": np.asarray(2, np.int32)})
  ckptr.wait_until_finished()
  ckptr.close()
  described = lora.LoraConfig(rank=4, alpha=8.0, targets=["q", "v"]).describe()
  info = {"model": model_record(cfg), "adapter": dict(
      described, modules=len(chosen),
      base={"path": str(tmp_path / "base"), "fingerprint": lora.fingerprint(params)})}
  (run / "run_info.json").write_text(json.dumps(info))
  return run, model


def _t5_logits(model, enc, dec):
  """A transformers T5's logits for encoder ids `enc` and decoder ids `dec`."""
  with torch.no_grad():
    return model.eval()(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits


def test_orbax_to_hf_takes_a_moved_base_and_refuses_a_soft_prompt(tmp_path):
  import numpy as np
  import transformers
  from flanjax.errors import UserError
  sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
  import convert_checkpoint  # pylint: disable=g-import-not-at-top
  run, model = _fake_lora_run(tmp_path)
  rng = np.random.default_rng(0)
  enc, dec = rng.integers(2, 96, size=(2, 9)), rng.integers(2, 96, size=(2, 5))
  logits = lambda m: _t5_logits(m, enc, dec)  # noqa: E731
  ref = logits(model).numpy()
  T5 = transformers.T5ForConditionalGeneration  # noqa: N806
  out = str(tmp_path / "hf")
  convert_checkpoint.main(["orbax-to-hf", str(run), out])  # over the recorded base
  np.testing.assert_allclose(logits(T5.from_pretrained(out)).numpy(), ref, atol=1e-4, rtol=1e-4)
  os.rename(tmp_path / "base", tmp_path / "moved")
  with pytest.raises(UserError, match=r"the adapters' base .*/base is not a directory; give the "
                     r"folder it moved to with --base BASE_DIR$"):
    convert_checkpoint.main(["orbax-to-hf", str(run), out, "--overwrite"])
  convert_checkpoint.main(["orbax-to-hf", str(run), out, "--overwrite", "--base",
                           str(tmp_path / "moved")])
  np.testing.assert_allclose(logits(T5.from_pretrained(out)).numpy(), ref, atol=1e-4, rtol=1e-4)
  # Another base given with --base: refused by its fingerprint, naming --base.
  tiny_t5(seed=5).save_pretrained(str(tmp_path / "other"))
  with pytest.raises(UserError, match=r"fingerprint differs\); give that base with --base"):
    convert_checkpoint.main(["orbax-to-hf", str(run), out, "--overwrite", "--base",
                             str(tmp_path / "other")])
  with pytest.raises(UserError, match="is not a LoRA training run"):
    convert_checkpoint.main(["orbax-to-hf", str(tmp_path / "moved"), out, "--overwrite",
                             "--base", str(tmp_path / "other")])
  # A prompt-tuning run: its soft prompt has no place in an HF folder; orbax-to-peft exports it.
  info = json.loads((run / "run_info.json").read_text())
  info["adapter"] = {"type": "prompt_tuning", "num_virtual_tokens": 4, "init": "random",
                     "base": info["adapter"]["base"]}
  (run / "run_info.json").write_text(json.dumps(info))
  with pytest.raises(UserError, match=r"is a prompt-tuning run, whose soft prompt an HF model "
                     r"folder cannot hold; export it with orbax-to-peft .*run OUT_DIR$"):
    convert_checkpoint.main(["orbax-to-hf", str(run), str(tmp_path / "hf2")])
  # So is a converted checkpoint that keeps a soft prompt (hf-to-orbax --adapter).
  from flanjax.models import hf, prompt_tuning
  cfg, params, _ = hf.load(str(tmp_path / "moved"))
  prompted = prompt_tuning.merge(params, np.zeros((4, cfg.d_model), np.float32))
  convert_checkpoint.write_orbax(str(tmp_path / "pt_orbax"), cfg, prompted)
  with pytest.raises(UserError, match=r"pt_orbax holds a soft prompt \(params/soft_prompt\)"):
    convert_checkpoint.main(["orbax-to-hf", str(tmp_path / "pt_orbax"), str(tmp_path / "hf2")])
  assert not os.path.exists(tmp_path / "hf2")


def test_resume_over_the_moved_base_is_a_note_and_another_base_refused(tmp_path, capsys):
  from flanjax.errors import UserError
  from flanjax.run_folder import RunFolder
  run = RunFolder(str(tmp_path))
  adapter = {"type": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"],
             "base_dtype": "float32", "modules": 4,
             "base": {"path": "/old/base", "fingerprint": "f00d"}}
  info = {"mixture": "m", "vocabulary": "v", "model": {"d_model": 8}, "kind": "t5",
          "adapter": adapter}
  run.write_run_info(info)

  def now(**changes):
    base = dict(adapter["base"], **changes.pop("base", {}))
    return dict(info, adapter=dict(adapter, base=base, **changes))
  run.check_run_info(now(base={"path": "/new/base"}))
  assert (f"note: {run.path}: the adapters' base (same fingerprint) is now /new/base (was "
          "/old/base)") in capsys.readouterr().out
  run.check_run_info(info)  # the same path: no note
  assert "note" not in capsys.readouterr().out
  with pytest.raises(UserError, match=r"different adapter config .*'fingerprint': 'f00d'.*"
                     r"'fingerprint': 'beef'"):
    run.check_run_info(now(base={"path": "/new/base", "fingerprint": "beef"}))
  with pytest.raises(UserError, match=r"different adapter config .*\{'rank': 4\}, now "
                     r"\{'rank': 8\}"):
    run.check_run_info(now(base={"path": "/new/base"}, rank=8))
