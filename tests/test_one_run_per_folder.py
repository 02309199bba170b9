"""Two `python -m flanjax.train` on one model folder: the second is refused, the first finishes."""

import json
import os
import subprocess
import sys
import time

from test_train_e2e import TINY


def test_second_run_on_a_folder_exits_2_and_the_first_finishes(tmp_path, builtin_vocab):
  model_dir = tmp_path / "run"
  cmd = [sys.executable, "-m", "flanjax.train", *TINY, f"--gin.train.model_dir={model_dir}",
         "--gin.train.num_steps=12", "--gin.train.eval_at_end=False"]
  first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not (model_dir / ".lock").exists():
      assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
      time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
  last = second.stderr.strip().splitlines()[-1]
  assert f"pid {first.pid}" in last and ".lock" in last, last
  assert "training:" not in second.stdout  # refused before any work on the folder
  assert first.returncode == 0, out[-2000:] + err[-2000:]
  # Every step once: the second run wrote nothing.
  with open(model_dir / "train_losses.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 13))
  assert not os.path.exists(model_dir / ".lock")  # released at the end


def test_a_runs_sentencepiece_vocabulary_with_extra_ids_reads_back_the_same(tmp_path, builtin_vocab):
  """T5's sentinels (extra ids) are appended by seqio on loading: the run keeps the model
  file without them and run_info's fingerprint says how many; a folder written before that
  (the pieces with the sentinels baked in) reads back the same too."""
  import seqio  # pylint: disable=g-import-not-at-top
  from flanjax.data import tasks  # pylint: disable=g-import-not-at-top
  from flanjax.run_folder import RunFolder  # pylint: disable=g-import-not-at-top
  v = seqio.SentencePieceVocabulary(builtin_vocab.sentencepiece_model_file, extra_ids=24)
  info = {"vocabulary": tasks.vocab_fingerprint(v)}
  run = RunFolder(str(tmp_path / "run"))
  run.save_vocabulary(v)
  text = "Is seven <extra_id_3> odd?"
  back = run.load_vocabulary(info)
  assert tasks.vocab_fingerprint(back) == info["vocabulary"]
  assert back.vocab_size == v.vocab_size and back.encode(text) == v.encode(text)
  with open(f"{run.vocab_dir}/spiece.model", "wb") as f:  # the older layout
    f.write(v.sp_model)
  old = run.load_vocabulary(info)
  assert old.vocab_size == v.vocab_size and old.encode(text) == v.encode(text)
  # An export (hf.save) writes the file as it came too: no sentinel among its pieces, where
  # seqio's sp_model has all 24 (transformers' T5 tokenizer adds them again on loading).
  from flanjax import run_folder  # pylint: disable=g-import-not-at-top
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  for data, sentinels in ((hf.spiece_bytes(v), 0), (v.sp_model, 24)):
    (tmp_path / "spiece.model").write_bytes(data)
    assert run_folder._extra_pieces(str(tmp_path / "spiece.model")) == sentinels  # pylint: disable=protected-access
