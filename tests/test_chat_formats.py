"""Prompt formats (flanjax/data/chat.py) and the readers of user data behind them.

Layouts of plain / alpaca / phi3 / chatml; hf_chat_template equal to transformers'
apply_chat_template on two real-world templates (Llama 3 Instruct's and Qwen2
Instruct's ChatML); on packed prefix-LM rows the loss covers exactly each response,
its end-of-turn marker and EOS; every format read from JSON lines and a JSON array,
`auto` detection; the run records its format and infer applies it; the BOS rule.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_data
from flanjax import config
from flanjax.data import cache, chat, hf_vocab, pipeline, sources, tasks
from flanjax.data.collections import user
from flanjax.errors import UserError
from flanjax.models import kinds

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template (2024-05 revision).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2-7B-Instruct's (ChatML, with a default system turn).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What colour is the sky?"},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "Green."}],
    [{"role": "user", "content": "Name a prime number."},
     {"role": "assistant", "content": "Seven is one."},
     {"role": "user", "content": "A larger one?"},
     {"role": "assistant", "content": "Eleven."},
     {"role": "user", "content": "Thanks. Now say hello."},
     {"role": "assistant", "content": "Hello!"}],
]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def _tokenizer_dir(path, specials, config, post_bos=None):
  """A byte-level BPE tokenizer folder with these special tokens and tokenizer_config."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  os.makedirs(path, exist_ok=True)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  text = [m["content"] for c in CONVERSATIONS for m in c] * 10
  tok.train_from_iterator(text, trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if post_bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{post_bos} $A", special_tokens=[(post_bos, tok.token_to_id(post_bos))])
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
  return str(path)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
  # As Llama 3 Instruct: the post-processor adds <|begin_of_text|>, EOS is <|eot_id|>.
  return _tokenizer_dir(
      tmp_path_factory.mktemp("llama3"),
      ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
       "<|eot_id|>"],
      {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
       "chat_template": LLAMA3_TEMPLATE}, post_bos="<|begin_of_text|>")


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
  # As Qwen2: no BOS; EOS <|endoftext|>, so <|im_end|> is an end-of-turn marker of its own.
  return _tokenizer_dir(
      tmp_path_factory.mktemp("chatml"), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
       "chat_template": CHATML_TEMPLATE})


def _auto(folder):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(folder)


# ------------------------------------------------------------------ layouts

def test_formats_render_the_documented_layouts():
  conv = CONVERSATIONS[0]
  expected = {
      "plain": ("System: You answer in one word.\nUser: What colour is the sky?\nAssistant: Blue."
                "\nUser: And grass?\nAssistant:", "Green."),
      "alpaca": ("You answer in one word.\n\n### Instruction:\nWhat colour is the sky?\n\n"
                 "### Response:\nBlue.\n\n### Instruction:\nAnd grass?\n\n### Response:\n", "Green."),
      "phi3": ("<|system|>\nYou answer in one word.<|end|>\n<|user|>\nWhat colour is the sky?<|end|>\n"
               "<|assistant|>\nBlue.<|end|>\n<|user|>\nAnd grass?<|end|>\n<|assistant|>\n",
               "Green.<|end|>"),
      "chatml": ("<|im_start|>system\nYou answer in one word.<|im_end|>\n<|im_start|>user\n"
                 "What colour is the sky?<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
                 "<|im_start|>user\nAnd grass?<|im_end|>\n<|im_start|>assistant\n", "Green.<|im_end|>"),
  }
  for name, want in expected.items():
    fmt = chat.get(name)
    assert fmt.example(conv, 4) == want, name
    # Every earlier example is the start of the later one: one conversation, one layout.
    for conv_ in CONVERSATIONS:
      turns = [k for k, m in enumerate(conv_) if m["role"] == "assistant"]
      for a, b in zip(turns, turns[1:]):
        inputs, target = fmt.example(conv_, a)
        later = fmt.example(conv_, b)[0]
        assert later.startswith(inputs) and later[len(inputs):].lstrip(" ").startswith(target)
  alpaca = chat.get("alpaca").example(
      [{"role": "user", "content": "Add the numbers.", "input": "2, 3"},
       {"role": "assistant", "content": "5"}], 1)
  assert alpaca == ("Below is an instruction that states a task, together with an input that "
                    "gives further context. Write a response that carries out the request.\n\n"
                    "### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n", "5")
  assert chat.get("plain").wrap("Hi") == "Hi"  # plain runs were never wrapped at inference
  assert chat.get("chatml").wrap("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  assert chat.get("chatml").cut("Blue.<|im_end|>\n<|im_start|>user") == "Blue."
  with pytest.raises(UserError, match="unknown prompt format 'vicuna'; choose one of plain"):
    chat.get("vicuna")


# ------------------------------------------------------------------ transformers' templates

@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_hf_chat_template_equals_apply_chat_template(which, llama3_dir, chatml_dir):
  folder = {"llama3": llama3_dir, "chatml": chatml_dir}[which]
  tok, fmt = _auto(folder), chat.load_hf_template(folder)
  for conv in CONVERSATIONS:
    for n in range(1, len(conv) + 1):
      for gen in (True, False):
        assert fmt.render(conv[:n], gen) == tok.apply_chat_template(
            conv[:n], tokenize=False, add_generation_prompt=gen), (which, n, gen)
    for k, m in enumerate(conv):
      if m["role"] != "assistant":
        continue
      inputs, target = fmt.example(conv, k)
      assert inputs == tok.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True)
      full = tok.apply_chat_template(conv[:k + 1], tokenize=False)
      # The response and its end of turn; the EOS token (Llama 3: <|eot_id|>) closes the target.
      assert full.rstrip() == inputs + target + ("<|eot_id|>" if which == "llama3" else "")
      assert target == m["content"] + fmt.end_of_turn
  assert fmt.end_of_turn == {"llama3": "", "chatml": "<|im_end|>"}[which]
  # Recorded and read back (the run folder's prompt_format.json) it renders the same.
  again = chat.from_record(json.loads(json.dumps(fmt.record())))
  assert again.render(CONVERSATIONS[1], True) == fmt.render(CONVERSATIONS[1], True)


def test_hf_template_errors_are_one_line(tmp_path):
  strict = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.first %}"
            "{{ raise_exception('Conversations must start with a user turn') }}{% endif %}"
            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{{ strftime_now('%Y') }}")
  fmt = chat.HFChatTemplate(strict, {}, "strict.jinja")
  with pytest.raises(UserError, match=r"^rec\.jsonl:3: the chat template of strict.jinja failed: "
                                      r"Conversations must start with a user turn$"):
    fmt.example([{"role": "assistant", "content": "x"}], 0, "rec.jsonl:3")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(UserError, match="no chat template"):
    chat.load_hf_template(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>",\n "chat_template": ')
  with pytest.raises(UserError, match=r"tokenizer_config.json:2: not valid JSON .*; fix the file, "
                                      "or copy it again from the tokenizer's folder$"):
    chat.load_hf_template(str(tmp_path))


# ------------------------------------------------------------------ fitting the input budget

def _every_format(llama3_dir, chatml_dir):
  """Every prompt format of chat.NAMES; hf_chat_template with both real-world templates."""
  fmts = [chat.get(n, d) for n in chat.NAMES
          for d in ((llama3_dir, chatml_dir) if n == "hf_chat_template" else (None,))]
  assert {f.name for f in fmts} == set(chat.NAMES)
  return fmts


def _assistant_header(fmt):
  # What follows the question: the user turn's end and the assistant's header.
  return fmt.render_prompt([{"role": "user", "content": "Q"}]).rsplit("Q", 1)[1]


QUESTION = "What is 2+2?"
POLICY = "Always follow the policy. "


def test_a_long_system_turn_or_input_is_cut_and_the_question_kept(llama3_dir, chatml_dir):
  fits = lambda text: len(text) <= 400  # pylint: disable=unnecessary-lambda-assignment
  system = [{"role": "system", "content": POLICY * 40},
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "4"}]
  alpaca = [{"role": "user", "content": QUESTION, "input": "word " * 500},
            {"role": "assistant", "content": "4"}]
  # A question too long alone is cut at its end, as before; a short system turn stays whole.
  long_question = [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": QUESTION + " and more" * 200},
                   {"role": "assistant", "content": "4"}]
  for fmt in _every_format(llama3_dir, chatml_dir):
    header = _assistant_header(fmt)
    for conv, kept in ((system, POLICY), (alpaca, "word word"),
                       (long_question, "Be brief.")):
      k = len(conv) - 1
      inputs, target = chat.fit_example(fmt, conv, k, fits, 100)
      assert fits(inputs), (fmt.name, inputs)
      assert inputs.endswith(header), (fmt.name, inputs[-80:])
      assert QUESTION in inputs and kept in inputs, (fmt.name, inputs)
      assert target == fmt.example(conv, k)[1]
    # The system turn and the input are cut at their ends, the question kept whole.
    assert (POLICY * 40) not in chat.fit_example(fmt, system, 2, fits, 100)[0]
    assert ("word " * 500).strip() not in chat.fit_example(fmt, alpaca, 1, fits, 100)[0]
    assert QUESTION + " and more" in chat.fit_example(fmt, long_question, 2, fits, 100)[0]


# ------------------------------------------------------------------ the loss mask, packed

LEN = {"inputs": 256, "targets": 64}


def _sharegpt_file(path):
  with open(path, "w", encoding="utf-8") as f:
    for conv in CONVERSATIONS:
      turns = [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in conv]
      f.write(json.dumps({"id": len(turns), "conversations": turns}) + "\n")
  return str(path)


@pytest.mark.parametrize("name", ["plain", "alpaca", "phi3", "chatml", "hf_llama3", "hf_chatml"])
def test_packed_rows_train_exactly_each_response_and_its_end_of_turn(
    name, tmp_path, builtin_vocab, llama3_dir, chatml_dir):
  folder = {"hf_llama3": llama3_dir, "hf_chatml": chatml_dir}.get(name)
  fmt_name = "hf_chat_template" if folder else name
  vocab = hf_vocab.HFTokenizerVocabulary.from_directory(llama3_dir) if name == "hf_llama3" \
      else builtin_vocab
  (d,), _ = user.user_data([{"name": f"mask_{name}", "path": _sharegpt_file(tmp_path / "c.jsonl")}],
                           prompt_format=fmt_name, chat_template=folder)
  tasks.register(d, vocab, input_length=LEN["inputs"])
  fmt = chat.get(fmt_name, folder)
  tok = _auto(folder) if folder else None
  expected = []  # (input ids, response ids) of every assistant turn, from the conversations
  for conv in CONVERSATIONS:
    for k, m in enumerate(conv):
      if m["role"] == "assistant":
        prompt = (tok.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True)
                  if tok else fmt.render_prompt(conv[:k]))
        expected.append((vocab.encode(prompt) + [vocab.eos_id],
                         vocab.encode(m["content"] + fmt.end_of_turn) + [vocab.eos_id]))
  stats = pipeline.packing.PackingStats()
  found = []
  for batch in pipeline.get_dataset(d.name, LEN, "train", batch_size=1, shuffle=False,
                                    num_epochs=1, kind="prefix_lm", stats=stats).as_numpy_iterator():
    seg, toks, w = (batch[k][0] for k in ("decoder_segment_ids", "decoder_target_tokens",
                                          "decoder_loss_weights"))
    for s in set(seg.tolist()) - {0}:
      m = seg == s
      found.append((list(toks[m][w[m] == 0]), list(toks[m][w[m] == 1])))
      assert np.all(np.diff(w[m]) >= 0)  # the prompt carries no loss, the response all of it
  assert sorted(found) == sorted(expected) and len(found) == 5
  assert stats.violations == 0


LONG = ("Sky blue comes from sunlight scattering off the molecules of the air: short "
        "wavelengths scatter far more than long ones, so blue light reaches the eye from "
        "every direction of the sky, while the sun itself looks yellow-white.")


@pytest.mark.parametrize("name", ["plain", "alpaca", "chatml", "hf_llama3", "hf_chatml"])
def test_a_response_cut_to_the_target_length_keeps_its_end_of_turn_and_eos(
    name, tmp_path, builtin_vocab, llama3_dir, chatml_dir):
  folder = {"hf_llama3": llama3_dir, "hf_chatml": chatml_dir}.get(name)
  fmt_name = "hf_chat_template" if folder else name
  vocab = hf_vocab.HFTokenizerVocabulary.from_directory(folder) if folder else builtin_vocab
  # (Llama 3's <|eot_id|> is its EOS: no marker apart from EOS, which seqio keeps anyway.)
  convs = [[{"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": LONG}],
           [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]]
  path = tmp_path / "c.jsonl"
  path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
  (d,), _ = user.user_data([{"name": f"cut_{name}", "path": str(path)}],
                           prompt_format=fmt_name, chat_template=folder)
  tasks.register(d, vocab, input_length=64)
  eot = chat.get(fmt_name, folder).end_of_turn
  ends = tasks.end_ids(vocab, eot) if eot else ()
  assert bool(eot) == (name in ("chatml", "hf_chatml"))
  if eot and folder:  # a special token of its own
    assert list(ends) == list(vocab.encode(eot)) and len(ends) == 1
  elif eot:  # pieces, without the word-start piece the marker alone is encoded with
    assert vocab.decode(list(ends)) == eot and len(ends) < len(vocab.encode(eot))
  lengths = {"inputs": 64, "targets": 16}
  got = []
  for batch in pipeline.get_dataset(d.name, lengths, "train", batch_size=1, shuffle=False,
                                    num_epochs=1, kind="prefix_lm").as_numpy_iterator():
    seg, toks, w = (batch[k][0] for k in ("decoder_segment_ids", "decoder_target_tokens",
                                          "decoder_loss_weights"))
    got += [list(toks[(seg == s) & (w == 1)]) for s in sorted(set(seg.tolist()) - {0})]
  full = [list(vocab.encode(c[1]["content"] + eot)) for c in convs]
  assert len(full[0]) > 15 and len(full[1]) + 1 <= 16  # the first is cut, the second not
  room = 16 - 1 - len(ends)
  assert full[0][-len(ends) or len(full[0]):] == list(ends) or not ends
  cut = full[0][:room] + list(ends) + [vocab.eos_id]
  assert sorted(got) == sorted([cut, full[1] + [vocab.eos_id]])


# ------------------------------------------------------------------ readers

RECORDS = {
    "alpaca": [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
               {"instruction": "Reverse the word.", "input": "stop", "output": "pots"}],
    "prompt_completion": [{"prompt": "Capital of France?", "completion": " Paris"},
                          {"prompt": "Capital of Peru?", "completion": " Lima"}],
    "chat": [{"messages": c} for c in CONVERSATIONS],
    "sharegpt": [{"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]}
                                    for m in c]} for c in CONVERSATIONS],
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_format_reads_json_lines_and_a_json_array_and_is_detected(fmt, tmp_path, capsys):
  lines = tmp_path / f"{fmt}.jsonl"
  lines.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[fmt]), encoding="utf-8")
  array = tmp_path / f"{fmt}.json"
  array.write_text(json.dumps(RECORDS[fmt], indent=4), encoding="utf-8")  # pretty-printed
  rendered = []
  for path in (lines, array):
    for given in (fmt, "auto"):
      cache.clear_caches()
      (d,), _ = user.user_data([{"name": "u", "path": str(path), "format": given, "num_shots": 0}])
      rendered.append([(r["inputs"], r["targets"]) for r in tasks.render_split(d, "train")])
  assert all(r == rendered[0] for r in rendered) and len(rendered[0]) in (2, 5)
  assert f"{array}: format {fmt} (detected from its first record" in capsys.readouterr().out


def test_sharegpt_on_real_files_and_the_wrong_format_named_truly():
  path = shared_data("instruction_pool") / "fastchat_lima_1k.json"
  (d,), _ = user.user_data([{"name": "lima", "path": str(path)}], prompt_format="chatml")
  records = tasks.render_split(d, "train")
  raw = json.loads(path.read_text(encoding="utf-8"))
  assert len(records) == 1000 == len(raw)
  assert records[0]["inputs"] == ("<|im_start|>user\n" + raw[0]["conversations"][0]["value"].strip()
                                  + "<|im_end|>\n<|im_start|>assistant\n")
  assert records[0]["targets"] == raw[0]["conversations"][1]["value"].strip() + "<|im_end|>"
  # Named as chat, the JSON array is read as one (not ":1: not valid JSON") and the
  # record says what it lacks.
  cache.clear_caches()
  (d,), _ = user.user_data([{"name": "lima", "path": str(path), "format": "chat"}])
  with pytest.raises(sources.BadRecord, match=r"fastchat_lima_1k.json\[0\]: no field 'messages' "
                                              r"\(has \['conversations', 'id', 'score'\]\)"):
    tasks.raw_examples(d, "train")


def test_a_file_of_no_format_is_one_line_naming_file_record_and_formats(tmp_path):
  path = tmp_path / "odd.jsonl"
  path.write_text('\n{"question": "q", "answer": "a"}\n')
  with pytest.raises(UserError) as e:
    user.user_data([{"name": "odd", "path": str(path)}])
  msg = config.one_line(e.value)  # as the commands print it (gin adds a line)
  assert msg.startswith(f"{path}:2: a record with keys ['answer', 'question'] matches no format")
  assert "sharegpt ('conversations')" in msg and "alpaca ('instruction', 'output')" in msg
  one_object = tmp_path / "one.json"
  one_object.write_text(json.dumps({"data": RECORDS["alpaca"][0]}, indent=2))
  with pytest.raises(UserError, match=r"one.json: one JSON object \(keys: data\), not records"):
    list(user.read_records(sources.Reader(str(one_object), "raise"), "alpaca"))
  with pytest.raises(UserError, match="'templates' apply to the plain prompt format only"):
    user.user_data([{"name": "t", "path": str(path), "format": "alpaca", "templates": "none"}],
                   prompt_format="chatml")


def test_a_conversation_is_held_out_whole(tmp_path):
  convs = [[{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": "1"},
            {"role": "user", "content": "Go on."}, {"role": "assistant", "content": "2"}]
           for i in range(60)]
  path = tmp_path / "c.jsonl"
  path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
  (d,), _ = user.user_data([{"name": "held", "path": str(path), "validation_share": 0.3}])
  splits = {s: tasks.raw_examples(d, s) for s in ("train", "validation")}
  assert len(splits["train"]) + len(splits["validation"]) == 120 and splits["validation"]
  firsts = {s: {ex["messages"][0]["content"] for ex in exs} for s, exs in splits.items()}
  assert not firsts["train"] & firsts["validation"]



def test_a_validation_file_is_the_validation_split_and_the_training_file_trains_whole(
    tmp_path, capsys):
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "input": "",
                                       "output": str(i + 1)}) + "\n" for i in range(50)))
  valid = tmp_path / "valid.json"  # another format, detected on its own
  valid.write_text(json.dumps([{"prompt": f"Add {i} and 2.", "completion": str(i + 2)}
                               for i in range(7)], indent=2))
  (d,), _ = user.user_data([{"name": "own", "path": str(train), "validation_share": 0.3,
                             "validation_path": str(valid)}])
  assert d.splits == ("train", "validation")
  assert [r["answer"] for r in tasks.raw_examples(d, "train")] == [str(i + 1) for i in range(50)]
  assert [r["answer"] for r in tasks.raw_examples(d, "validation")] == [
      str(i + 2) for i in range(7)]
  # A missing validation file stops the run where the tasks are made, before any training.
  with pytest.raises(UserError, match=r"'own2', validation_path .*nope.jsonl does not exist"):
    user.user_data([{"name": "own2", "path": str(train),
                     "validation_path": str(tmp_path / "nope.jsonl")}])
  with pytest.raises(UserError, match="'validation_path' is one file of records"):
    user.user_data([{"name": "own3", "path": str(train), "validation_path": str(tmp_path)}])
  # The training file as its own validation file is refused; a file sharing some inputs
  # with it is counted (3 of 5: the inputs of training records 0, 1 and 2).
  with pytest.raises(UserError, match=r"'own4': validation_path .* is the training file"):
    user.user_data([{"name": "own4", "path": str(train), "validation_path": str(train)}])
  some = tmp_path / "some.jsonl"
  some.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "input": "",
                                      "output": "other"}) + "\n" for i in (0, 1, 2, 60, 61)))
  (d5,), _ = user.user_data([{"name": "own5", "path": str(train), "validation_path": str(some)}])
  capsys.readouterr()
  assert len(tasks.raw_examples(d5, "validation")) == 5
  assert (f"note: own5: 3 of 5 records of {some} have an input the training file also has"
          in capsys.readouterr().out)

# ------------------------------------------------------------------ BOS, as the tokenizer says

def test_causal_prompts_start_with_bos_only_when_the_tokenizer_adds_it(tmp_path, llama3_dir):
  specials = ["<unk>", "<s>", "</s>"]
  cases = {"post_bos": ("<s>", {}), "none": (None, {}),
           # transformers 5 ignores add_bos_token beside tokenizer.json; so do we.
           "flag_only": (None, {"add_bos_token": True}), "flag_off": ("<s>", {"add_bos_token": False})}
  for name, (post, extra) in cases.items():
    folder = _tokenizer_dir(tmp_path / name, specials,
                            {"bos_token": "<s>", "eos_token": "</s>", **extra}, post_bos=post)
    vocab = hf_vocab.HFTokenizerVocabulary.from_directory(folder)
    for text in ("Name a prime number.", ""):
      want = _auto(folder)(text).input_ids or [vocab.bos_id]
      assert kinds.DECODER.prompt_ids(vocab, text) == want, (name, text)
    assert vocab.add_bos == (post is not None)
  # A chat template that writes BOS itself: not doubled, as apply_chat_template(tokenize=True).
  vocab = hf_vocab.HFTokenizerVocabulary.from_directory(llama3_dir)
  text = chat.load_hf_template(llama3_dir).wrap("Name a prime number.")
  ids = _auto(llama3_dir).apply_chat_template(
      [{"role": "user", "content": "Name a prime number."}], add_generation_prompt=True,
      tokenize=True, return_dict=True)["input_ids"]
  assert kinds.DECODER.prompt_ids(vocab, text) == ids and ids.count(vocab.bos_id) == 1


# ------------------------------------------------------------------ end to end

def test_a_run_records_its_format_and_infer_applies_it(tmp_path, llama3_dir, monkeypatch, capsys):
  """python -m flanjax.train on LIMA (ShareGPT, detected) with a decoder and the Llama 3
  chat template; infer wraps prompts in that template without being told."""
  data = shared_data("instruction_pool") / "fastchat_lima_1k.json"
  run = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "flanjax.train", "--gin_file=runs/user_data.gin",
       "--gin_file=models/llama_tiny.gin", "--gin.train.model_config=@DecoderConfig()",
       f"--gin.USER_FILE={data}", "--gin.PROMPT_FORMAT=hf_chat_template",
       f"--gin.user_data.chat_template={llama3_dir}", "--gin.MIXTURE='user_data'",
       f"--gin.train.model_dir={run}", "--gin.train.num_steps=2", "--gin.train.batch_size=2",
       "--gin.train.task_feature_lengths={'inputs': 96, 'targets': 32}",
       "--gin.DecoderConfig.d_model=32", "--gin.DecoderConfig.num_layers=1",
       "--gin.train.log_every_secs=0", "--gin.train.eval_at_end=False"],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f"{data}: format sharegpt (detected" in proc.stdout
  recorded = json.loads((run / "prompt_format.json").read_text())
  assert recorded["name"] == "hf_chat_template" and recorded["template"] == LLAMA3_TEMPLATE
  from flanjax import decoding, infer
  seen = []
  real_encode = decoding.Generator.encode
  monkeypatch.setattr(decoding.Generator, "encode",
                      lambda self, text: seen.append(text) or real_encode(self, text))
  assert infer.run(["--checkpoint", str(run), "Can brain cells move?", "--max_decode_len", "4"]) == 0
  want = _auto(llama3_dir).apply_chat_template(
      [{"role": "user", "content": "Can brain cells move?"}], tokenize=False,
      add_generation_prompt=True)
  assert seen == [want]
  assert "in the hf_chat_template prompt format" in capsys.readouterr().err
  seen.clear()
  infer.run(["--checkpoint", str(run), "Can brain cells move?", "--max_decode_len", "2",
             "--prompt_format", "plain"])
  assert seen == ["Can brain cells move?"]
  # judge and evaluate on the same run wrap their prompts in the recorded template too.
  head, tail = want.split("Can brain cells move?")
  answers = tmp_path / "a.jsonl"
  answers.write_text(json.dumps({"instruction": "Can brain cells move?", "output": "Yes."}) + "\n")
  other = tmp_path / "b.jsonl"
  other.write_text(json.dumps({"instruction": "Can brain cells move?", "output": "No."}) + "\n")
  from flanjax import judge
  seen.clear()
  assert judge.run(["pairwise", "--judge", str(run), "--a", str(answers), "--b", str(other),
                    "--mode", "loglik", "--resamples", "10", "--max_input_length", "512",
                    "--out", str(tmp_path / "judged")]) == 0
  assert json.loads((tmp_path / "judged" / "pairwise.json").read_text())["prompt_format"] == (
      "hf_chat_template")
  assert len(seen) == 2  # both orders
  assert all(s.startswith(head) and s.endswith(tail) and "Yes." in s and "No." in s for s in seen)
  from flanjax.data import registry
  from flanjax.evaluation import run as evaluation
  report = evaluation.evaluate(checkpoint=str(run), tasks=["builtin_comparison:validation"],
                               max_examples=1, input_length=256,
                               decode=decoding.DecodeConfig(max_decode_len=2),
                               out_dir=str(tmp_path / "eval"), name="fmt",
                               register_fns=(registry.register_builtin,), log=lambda _: None)
  assert report["prompt_format"] == "hf_chat_template"
  import html
  page = html.unescape((tmp_path / "eval" / "fmt.html").read_text(encoding="utf-8"))
  assert head in page and tail in page  # the prompt the review page shows is the wrapped one


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".zip"])
def test_a_compressed_file_is_named_compressed_not_mis_encoded(tmp_path, suffix):
  import bz2, gzip, lzma, zipfile  # noqa: E401  pylint: disable=g-import-not-at-top,multiple-imports
  text = json.dumps({"instruction": "Add 1 and 2.", "output": "3"}) + "\n"
  path = tmp_path / f"data{suffix}"
  if suffix == ".zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("data.jsonl", text)
  else:
    opener = {".jsonl.gz": gzip.open, ".jsonl.bz2": bz2.open, ".jsonl.xz": lzma.open}[suffix]
    with opener(path, "wt") as f:
      f.write(text)
  name = {".jsonl.gz": "gzip", ".jsonl.bz2": "bzip2", ".jsonl.xz": "xz", ".zip": "zip"}[suffix]
  with pytest.raises(UserError, match=rf"{path} is {name}-compressed; decompress it \("):
    user.user_data([{"name": "packed", "path": str(path)}])


@pytest.mark.parametrize("fmt_name", ["plain", "chatml"])
def test_alpaca_history_and_system_are_the_turns_before_the_instruction(tmp_path, fmt_name):
  # LLaMA-Factory's multi-turn Alpaca: history [[question, answer], ...] comes first; every
  # answer is a target, as in a chat file of the same turns.
  recs = [{"instruction": "And 3 more?", "input": "", "output": "8.",
           "system": "You count apples.", "history": [["I have 2 apples.", "Noted."],
                                                      ["Add 3.", "5."]]},
          {"instruction": "Reverse the word.", "input": "stop", "output": "pots"}]
  path = tmp_path / "hist.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  fmt = chat.get(fmt_name)
  (d,), _ = user.user_data([{"name": f"hist_{fmt_name}", "path": str(path), "num_shots": 0}],
                           prompt_format=fmt_name)
  got = [(r["inputs"], r["targets"]) for r in tasks.render_split(d, "train")]
  conv = [{"role": "system", "content": "You count apples."},
          {"role": "user", "content": "I have 2 apples."}, {"role": "assistant", "content": "Noted."},
          {"role": "user", "content": "Add 3."}, {"role": "assistant", "content": "5."},
          {"role": "user", "content": "And 3 more?"}, {"role": "assistant", "content": "8."}]
  want = [(fmt.render_prompt(conv[:k]), conv[k]["content"] + fmt.end_of_turn) for k in (2, 4, 6)]
  want.append((fmt.render_prompt([{"role": "user", "content": "Reverse the word.\n\nstop"}]),
               "pots" + fmt.end_of_turn))
  assert got == want
  bad = tmp_path / "bad_hist.jsonl"
  bad.write_text(json.dumps(dict(recs[1], history=[["only a question"]])) + "\n")
  with pytest.raises(UserError, match=r"bad_hist.jsonl:1: 'history' is not a list of "
                     r"\[question, answer\] string pairs"):
    tasks.raw_examples(user.user_data([{"name": "bad_hist", "path": str(bad)}])[0][0], "train")
