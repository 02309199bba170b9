"""Fuzzing the readers of user data (issue 19): random bytes, a 1 MB record, 10,000 turns
in one chat, a JSON array of 100,000 records, mixed line endings.

Each case either registers and tokenizes or stops with one line. They run in a child
process under a memory cap (RLIMIT_AS: what the imports took plus 1.5 GiB; a quadratic
rendering of the 10,000-turn chat needs over 5 GB) and a timeout, so a case that hangs
or grows without bound fails the test instead of the machine. Two cases also go
through the real command.
"""

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import REPO, command_in_process

HEADROOM = 3 << 29  # 1.5 GiB above what the child holds after its imports
INPUT_LENGTH = 128

CHILD = r'''
import json, os, resource, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import gin, seqio
from flanjax import config
from flanjax.data import cache, tasks
from flanjax.data.collections import user
from flanjax.errors import UserError

def vm_size():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

cases, headroom, length = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
limit = vm_size() + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
vocab = seqio.ByteVocabulary()
for case in cases:
  cache.clear_caches()
  gin.bind_parameter("bad_records.policy", case.get("policy", "raise"))
  try:
    (d,), _ = user.user_data([{"name": "fuzz", "path": case["path"],
                               "format": case.get("format", "auto")}], prompt_format="chatml")
    tasks.register(d, vocab, input_length=length)
    tok = tasks.tokenized_split(d, "train", vocab, length)
    out = {"examples": len(tok.texts), "longest_input": int(tok.lengths("inputs").max()),
           "inputs": [t["inputs_pretokenized"] for t in tok.texts[-2:]]}
  except UserError as e:
    out = {"error": config.one_line(e)}  # as the commands print it
  print(json.dumps({"case": case["name"], **out}), flush=True)
try:  # the cap holds: more than it allows cannot be had
  bytearray(headroom + (1 << 29))
  print(json.dumps({"case": "cap", "error": "no MemoryError"}), flush=True)
except MemoryError:
  print(json.dumps({"case": "cap", "capped": True}), flush=True)
'''


def _turn(i):
  return {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "blah " * 40}


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("fuzz")
  rng = random.Random(19)
  noise = bytes(rng.getrandbits(8) for _ in range(200_000))
  files = {"random.bin": noise, "random_array.json": b"[" + noise,
           "nested.jsonl": b'{"messages": ' + b"[" * 100_000 + b"\n"}
  big = "word " * 200_000  # 1 MB in one user turn
  files["big.jsonl"] = "".join(json.dumps({"messages": m}) + "\n" for m in (
      [{"role": "user", "content": big}, {"role": "assistant", "content": "ok"}],
      [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
  files["long.jsonl"] = json.dumps({"messages": [_turn(i) for i in range(10_000)]}) + "\n"
  files["many.json"] = json.dumps([
      {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]}
      for i in range(100_000)])
  lines = [json.dumps({"prompt": f"Say {i}.", "completion": str(i)}) for i in range(30)]
  ends = ["\r\n", "\n", "\r"]
  files["mixed.jsonl"] = "".join(line + ends[i % 3] for i, line in enumerate(lines))
  lines[4] = lines[4][:-1]  # line 5, after a \r\n, a \n, a \r and a \r\n
  files["mixed_bad.jsonl"] = "".join(line + ends[i % 3] for i, line in enumerate(lines))
  for name, data in files.items():
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
  return d


def test_fuzzed_files_register_and_tokenize_or_stop_with_one_line_under_a_memory_cap(
    fuzz_files, tmp_path):
  d = fuzz_files
  cases = [
      {"name": "random_auto", "path": d / "random.bin"},
      {"name": "random_chat", "path": d / "random.bin", "format": "chat"},
      {"name": "random_skip", "path": d / "random.bin", "format": "chat", "policy": "skip"},
      {"name": "random_array", "path": d / "random_array.json", "format": "sharegpt"},
      {"name": "nested", "path": d / "nested.jsonl", "format": "chat"},
      {"name": "big", "path": d / "big.jsonl"},
      {"name": "long", "path": d / "long.jsonl"},
      {"name": "many", "path": d / "many.json"},
      {"name": "mixed", "path": d / "mixed.jsonl"},
      {"name": "mixed_bad", "path": d / "mixed_bad.jsonl"},
  ]
  spec = tmp_path / "cases.json"
  spec.write_text(json.dumps([{**c, "path": str(c["path"])} for c in cases]))
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  proc = subprocess.run([sys.executable, str(script), str(spec), str(HEADROOM), str(INPUT_LENGTH)],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env={**os.environ, "FLANJAX_CACHE": str(tmp_path / "cache")})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  out = {r["case"]: r for r in map(json.loads, (l for l in proc.stdout.splitlines()
                                                if l.startswith("{")))}
  assert out["cap"].get("capped"), out["cap"]
  errors = {k: r["error"] for k, r in out.items() if "error" in r}
  assert sorted(errors) == ["mixed_bad", "nested", "random_array", "random_auto", "random_chat",
                            "random_skip"]
  for name, msg in errors.items():
    assert "\n" not in msg and len(msg) < 600, (name, msg)
  assert errors["random_auto"].startswith(f"{d / 'random.bin'}: no record to detect the format")
  assert errors["random_chat"].startswith(f"{d / 'random.bin'}:1: bytes that are not UTF-8")
  assert errors["random_skip"].startswith(f"{d / 'random.bin'}: no usable records (")
  assert errors["random_array"].startswith(f"{d / 'random_array.json'}: bytes that are not UTF-8")
  assert errors["nested"].startswith(f"{d / 'nested.jsonl'}:1: JSON nested too deeply")
  assert errors["mixed_bad"].startswith(f"{d / 'mixed_bad.jsonl'}:5: not valid JSON")
  header = "<|im_start|>assistant\n"
  # Inputs always fit and always end with the assistant's header: a too-long last turn is
  # cut at its end, a too-long conversation drops its oldest turns.
  for name, n in (("big", 2), ("long", 5000), ("many", 100_000), ("mixed", 30)):
    assert out[name]["examples"] == n, out[name]
    assert out[name]["longest_input"] <= INPUT_LENGTH - 1
    assert all(t.endswith(header) for t in out[name]["inputs"])
  assert "turn 9998" in out["long"]["inputs"][-1] and "turn 9990" not in out["long"]["inputs"][-1]
  assert out["big"]["inputs"][0].startswith("<|im_start|>user\nword word")


def _train_args(tmp_path, data, *extra):
  return ["--gin_file=runs/user_data.gin",
          f"--gin.USER_FILE={data}", "--gin.MIXTURE='user_data'", "--gin.train.batch_size=4",
          "--gin.train.task_feature_lengths={'inputs': 96, 'targets': 64}",
          "--gin.T5Config.d_model=16", "--gin.T5Config.d_ff=32", "--gin.T5Config.num_heads=2",
          "--gin.T5Config.d_kv=8", "--gin.T5Config.num_encoder_layers=1",
          "--gin.T5Config.num_decoder_layers=1", "--gin.corpus_vocabulary.vocab_size=500",
          "--gin.train.log_every_secs=0", "--gin.train.eval_at_end=False",
          f"--gin.train.model_dir={tmp_path / 'run'}", "--gin.train.num_steps=1", *extra]


def _train(tmp_path, data, *extra):
  return subprocess.run(
      [sys.executable, "-m", "flanjax.train", *_train_args(tmp_path, data, *extra)],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      env={**os.environ, "FLANJAX_CACHE": str(tmp_path / "cache")})


def test_random_bytes_through_the_command_stop_with_one_line(fuzz_files, tmp_path, monkeypatch,
                                                              builtin_vocab):
  # The command's main in this process: it stops before training, and a process start would
  # cost more than the run (the next test starts the command as a process).
  from flanjax import train
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("FLANJAX_CACHE", str(tmp_path / "cache"))
  code, _, err = command_in_process(train.main, _train_args(tmp_path, fuzz_files / "random.bin"),
                                    builtin_vocab)
  assert code == 2 and "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if "error:" in line]
  assert len(lines) == 1 and f"{fuzz_files / 'random.bin'}: no record to detect" in lines[0]


def test_ten_thousand_turns_in_one_chat_train_through_the_command(fuzz_files, tmp_path):
  proc = _train(tmp_path, fuzz_files / "long.jsonl")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "format chat (detected" in proc.stdout and "lengths: all 5000 examples fit" in proc.stdout
  assert "step      1/1" in proc.stdout


# ------------------------------------------------------------------ format detection on valid files

ALPACA = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(2)]


def _detect_and_read(path, policy="raise"):
  """(detected format, records read, the read's report), in this process."""
  from flanjax.data import sources
  from flanjax.data.collections import user
  fmt = user.detect_format(str(path))
  reader = sources.Reader(str(path), policy)
  records = list(user.read_records(reader, fmt))
  return fmt, records, reader.report


def test_an_object_of_no_records_is_named_as_the_reader_names_it(tmp_path):
  from flanjax.data import sources
  from flanjax.errors import UserError
  path = tmp_path / "settings.json"
  path.write_text(json.dumps({"data": "train.jsonl", "epochs": 3}, indent=2))
  # Detection stops with the reader's own line (the keys and the fix), not "not valid JSON".
  want = (f"{path}: one JSON object (keys: data, epochs), not records; write one record per "
          "line (JSON lines) or a JSON array of records")
  with pytest.raises(UserError) as detected:
    _detect_and_read(path)
  with pytest.raises(UserError) as read:
    list(sources.read_json_or_jsonl(sources.Reader(str(path), "skip")))
  assert str(detected.value) == str(read.value) == want
  # Two lists of records: which one to train on is the user's call.
  path.write_text(json.dumps({"train": ALPACA, "test": ALPACA}, indent=2))
  with pytest.raises(UserError, match=r"settings.json: one JSON object with 2 lists of records "
                                      r"\(train, test\); write each list to a file of its own"):
    _detect_and_read(path)


@pytest.mark.parametrize("indent", [None, 2])
def test_records_wrapped_in_one_object_are_read_from_its_list(tmp_path, indent):
  # {"version": ..., "data": [...]}, as some dataset exports write them, on one line or many.
  path = tmp_path / "wrapped.json"
  path.write_text(json.dumps({"version": "1.0", "data": ALPACA}, indent=indent))
  fmt, records, report = _detect_and_read(path)
  assert fmt == "alpaca" and not report.skipped
  assert [r["answer"] for r in records] == ["0", "1"]
  from flanjax.data import sources
  where = [w for w, _ in sources.read_json_or_jsonl(sources.Reader(str(path)))]
  assert where == [f"{path}:data[0]", f"{path}:data[1]"]


def test_one_conversation_on_one_line_is_a_record_not_a_wrapper(tmp_path):
  # Its turns are a list of objects too; they are not records.
  path = tmp_path / "one.jsonl"
  conv = {"id": "a", "conversations": [{"from": "human", "value": "Hi?"},
                                       {"from": "gpt", "value": "Hello."}]}
  path.write_text(json.dumps(conv) + "\n")
  fmt, records, _ = _detect_and_read(path)
  assert fmt == "sharegpt" and len(records) == 1
  path.write_text(json.dumps({"dialog": conv["conversations"]}) + "\n")  # no format's keys
  with pytest.raises(Exception, match=r"one.jsonl:1: a record with keys \['dialog'\] matches no"):
    _detect_and_read(path)


@pytest.mark.parametrize("sep", ["\n", "", "\n\n"])
def test_pretty_printed_json_lines_are_read_object_by_object(tmp_path, sep):
  # json.dump(record, f, indent=2) per record, or objects run together on one line.
  path = tmp_path / "pretty.jsonl"
  recs = ALPACA + [{"instruction": "Say\n{2}.", "input": "", "output": "2"}]
  path.write_text(sep.join(json.dumps(r, indent=2 if sep else None) for r in recs) + "\n")
  fmt, records, report = _detect_and_read(path)
  assert fmt == "alpaca" and [r["answer"] for r in records] == ["0", "1", "2"]
  from flanjax.data import sources
  where = [w for w, _ in sources.read_json_or_jsonl(sources.Reader(str(path)))]
  if sep:  # each record named by the line it starts on
    starts = [i + 1 for i, line in enumerate(path.read_text().split("\n")) if line == "{"]
    assert where == [f"{path}:{n}" for n in starts]
  # A broken object cannot be skipped (where the next one starts is unknown): one line, the
  # line it starts on.
  text = path.read_text()
  cut = text.rindex('"output"')
  path.write_text(text[:cut] + text[cut + 1:])
  with pytest.raises(Exception) as e:
    _detect_and_read(path, policy="skip")
  assert "not valid JSON" in str(e.value) and "cannot be skipped" in str(e.value)
  assert str(e.value).startswith(f"{path}:")


def test_one_pretty_printed_record_is_a_file_of_one_record(tmp_path):
  path = tmp_path / "one.json"
  path.write_text(json.dumps(ALPACA[1], indent=2))
  fmt, records, report = _detect_and_read(path)
  assert fmt == "alpaca" and [r["answer"] for r in records] == ["1"] and not report.skipped


def test_a_malformed_first_line_of_json_lines_is_still_a_bad_line(tmp_path):
  path = tmp_path / "lines.jsonl"
  path.write_text('{"instruction": "x", "output": \n' + "\n".join(json.dumps(r) for r in ALPACA))
  fmt, records, report = _detect_and_read(path, policy="skip")
  assert fmt == "alpaca" and len(records) == 2 and report.skipped["malformed JSON lines"] == 1


def test_json_lines_after_a_blank_first_line_are_records(tmp_path):
  path = tmp_path / "blank_first.jsonl"
  path.write_text("\n" + json.dumps(ALPACA[0]) + "\n")
  fmt, records, report = _detect_and_read(path)
  assert fmt == "alpaca" and len(records) == 1 and not report.skipped
  path.write_bytes(b"\xef\xbb\xbf\r\n  \n" + json.dumps(ALPACA[1]).encode() + b"\n")  # BOM too
  assert len(_detect_and_read(path)[1]) == 1


def test_an_empty_array_is_said_to_hold_no_records(tmp_path):
  from flanjax.data import sources
  from flanjax.errors import UserError
  path = tmp_path / "empty.json"
  path.write_text("[ ]\n")
  assert sources.first_record(str(path)) == (str(path), None, "an empty JSON array: no records")
  with pytest.raises(UserError) as e:
    _detect_and_read(path)
  assert str(e.value).startswith(f"{path}: no record to detect the format from (an empty JSON "
                                 "array: no records)") and "\n" not in str(e.value)


def test_detection_passes_over_array_elements_that_are_not_objects(tmp_path):
  from flanjax.data import sources
  from flanjax.errors import UserError
  path = tmp_path / "null_first.json"
  path.write_text(json.dumps([None, *ALPACA], indent=1))
  assert sources.first_record(str(path))[:2] == (f"{path}[1]", ALPACA[0])
  # The null is a bad record as usual: counted and skipped, or stopping the run naming it.
  fmt, records, report = _detect_and_read(path, "skip")
  assert fmt == "alpaca" and len(records) == 2 and report.num_skipped == 1
  with pytest.raises(UserError, match=r"null_first.json\[0\]: a JSON NoneType, not an object"):
    _detect_and_read(path)
  # No object at all: one line naming what the elements are.
  path.write_text("[null, 1, [2]]")
  assert sources.first_record(str(path)) == (
      str(path), None, "no element is an object (element 0 is a JSON null)")
