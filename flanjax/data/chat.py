"""Prompt formats: how a conversation becomes training text and a prompt.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant",
"content": str}`` (an Alpaca record is one user turn, its ``input`` kept apart as
``"input"``, and one assistant turn). A prompt format renders it:

  plain             flanjax's own: "System: ...\\nUser: ...\\nAssistant:"; a lone
                    prompt at inference is passed as given
  alpaca            our wording of the Alpaca layout: "Below is an instruction ..."
                    (a system turn replaces that sentence), "### Instruction:",
                    "### Input:", "### Response:"
  phi3              <|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n
  chatml            <|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n
  hf_chat_template  the Jinja ``chat_template`` of a tokenizer folder, rendered by
                    transformers' own machinery (what ``apply_chat_template`` renders)

Training examples: every assistant turn k is one example. Its inputs are the
conversation before it, rendered up to and including the assistant header (the
generation prompt); its targets are the turn's content and the format's
end-of-turn marker (``<|im_end|>``, ``<|end|>``, the template's; none for plain
and alpaca, whose turns end with EOS). seqio closes every target with EOS, so
the loss covers exactly the response, its end-of-turn marker and that EOS (a response cut
to the target length keeps the marker and EOS as its last tokens: tasks.keep_target_end).
Earlier turns (their responses included) are context without loss. A
conversation longer than the input budget drops its oldest turns (a system
turn at the start is kept); a leading system turn or an Alpaca input still too
long is cut at its end (a last user turn too, only when it alone is too long), so
the question and the assistant header are always there.

The format a run trained with is recorded in its folder (``record``,
``from_record``) and wraps ``python -m flanjax.infer``'s prompts, whose
generations are cut at the end-of-turn marker (``cut``).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Sequence

from flanjax.data import sources
from flanjax.errors import UserError

ROLES = ("system", "user", "assistant")
NAMES = ("plain", "alpaca", "phi3", "chatml", "hf_chat_template")
# The named special tokens transformers passes to a chat template (special_tokens_map).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                  "cls_token", "mask_token")
# A conversation's history longer than this many characters per token of the input
# budget is cut before any tokenizing (no tokenizer packs more into one token).
CHARS_PER_TOKEN = 16
DEFAULT_BUDGET = 1024

Messages = Sequence[Mapping[str, str]]


def text_of(message: Mapping[str, str]) -> str:
  """A message's text, an Alpaca input appended after a blank line."""
  extra = message.get("input") or ""
  return message["content"] + (f"\n\n{extra}" if extra else "")


class PromptFormat:
  """Renders conversations: the prompt before an assistant turn, and its target."""

  name = ""
  end_of_turn = ""  # text that ends a response ("": EOS alone ends it)

  def render_prompt(self, messages: Messages) -> str:
    """The conversation so far, up to and including the assistant header."""
    raise NotImplementedError

  def example(self, messages: Messages, k: int, where: str = "") -> tuple[str, str]:
    """(inputs, targets) of assistant turn k of `messages` (`where` names it in errors)."""
    del where  # only a chat template can fail on a record
    return self.render_prompt(messages[:k]), messages[k]["content"] + self.end_of_turn

  def wrap(self, prompt: str) -> str:
    """A lone prompt as the model was trained to read it (inference)."""
    return self.render_prompt([{"role": "user", "content": prompt}])

  def cut(self, generation: str) -> str:
    """A generation up to the end-of-turn marker."""
    if self.end_of_turn and self.end_of_turn in generation:
      return generation[:generation.index(self.end_of_turn)]
    return generation

  def record(self) -> dict:
    return {"name": self.name, "end_of_turn": self.end_of_turn}

  @property
  def fingerprint(self) -> str:
    return json.dumps(self.record(), sort_keys=True)

  def __repr__(self):
    return f"<prompt format {self.name}>"


class Plain(PromptFormat):
  """'User: ...\nAssistant:' for conversations; a lone prompt is passed as given (FLAN's
  tasks are prompted with the text itself), unless the run trained on conversations alone
  (`conversation`, recorded by the run), whose prompts all had that layout."""
  name = "plain"
  ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

  def __init__(self, conversation: bool = False):
    self.conversation = conversation

  def render_prompt(self, messages):
    lines = [f"{self.ROLE_NAMES[m['role']]}: {text_of(m).strip()}" for m in messages]
    return "\n".join(lines + ["Assistant:"])

  def wrap(self, prompt):
    return super().wrap(prompt) if self.conversation else prompt

  def record(self):
    return dict(super().record(), conversation=True) if self.conversation else super().record()


class _Tagged(PromptFormat):
  """Each turn is header + text + end-of-turn + newline; the prompt ends with the
  assistant's header."""

  def header(self, role: str) -> str:
    raise NotImplementedError

  def render_prompt(self, messages):
    turns = [f"{self.header(m['role'])}{text_of(m)}{self.end_of_turn}\n" for m in messages]
    return "".join(turns) + self.header("assistant")


class ChatML(_Tagged):
  name = "chatml"
  end_of_turn = "<|im_end|>"

  def header(self, role):
    return f"<|im_start|>{role}\n"


class Phi3(_Tagged):
  name = "phi3"
  end_of_turn = "<|end|>"

  def header(self, role):
    return f"<|{role}|>\n"


class Alpaca(PromptFormat):
  """Our own wording of the Alpaca layout; a response ends with EOS."""
  name = "alpaca"
  PREAMBLE = ("Below is an instruction that states a task{}. Write a response that "
              "carries out the request.")
  WITH_INPUT = ", together with an input that gives further context"

  def render_prompt(self, messages):
    parts = []
    if not messages or messages[0]["role"] != "system":
      has_input = any(m.get("input") for m in messages)
      parts.append(self.PREAMBLE.format(self.WITH_INPUT if has_input else ""))
    for m in messages:
      if m["role"] == "system":
        parts.append(m["content"])
      elif m["role"] == "user":
        parts.append(f"### Instruction:\n{m['content']}")
        if m.get("input"):
          parts.append(f"### Input:\n{m['input']}")
      else:
        parts.append(f"### Response:\n{m['content']}")
    return "\n\n".join(parts + ["### Response:\n"])


class HFChatTemplate(PromptFormat):
  """A tokenizer's Jinja chat template, rendered by transformers' render_jinja_template
  with the tokenizer's named special tokens, as apply_chat_template(tokenize=False) does."""

  name = "hf_chat_template"

  def __init__(self, template: str, special_tokens: Mapping[str, str] | None = None,
               source: str = "chat_template"):
    if not isinstance(template, str) or not template.strip():
      raise UserError(f"{source}: the chat template is empty")
    self.template = template
    self.special_tokens = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
    self.source = source
    self.end_of_turn = self._probe_end_of_turn()

  def render(self, messages: Messages, add_generation_prompt: bool, where: str = "") -> str:
    from transformers.utils import chat_template_utils  # pylint: disable=g-import-not-at-top
    chat = [{"role": m["role"], "content": text_of(m)} for m in messages]
    try:
      out, _ = chat_template_utils.render_jinja_template(
          conversations=[chat], chat_template=self.template,
          add_generation_prompt=add_generation_prompt, **self.special_tokens)
    except Exception as e:  # pylint: disable=broad-except  (raise_exception, template bugs)
      msg = " ".join(str(e).split()) or type(e).__name__
      raise UserError(f"{where or 'a conversation'}: the chat template of {self.source} "
                      f"failed: {msg[:300]}") from None
    return out[0]

  def render_prompt(self, messages):
    return self.render(messages, add_generation_prompt=True)

  def _target(self, prompt: str, full: str, where: str) -> str:
    if not full.startswith(prompt):
      raise UserError(f"{where}: the chat template of {self.source} does not render the "
                      "conversation before an assistant turn as the start of the conversation "
                      "with it, so the turn cannot be a target; use another prompt format")
    target = full[len(prompt):].rstrip()
    eos = self.special_tokens.get("eos_token")
    if eos and target.endswith(eos):
      target = target[:-len(eos)].rstrip()  # seqio's EOS closes every target
    return target

  def example(self, messages, k, where=""):
    prompt = self.render(messages[:k], True, where)
    return prompt, self._target(prompt, self.render(messages[:k + 1], False, where), where)

  def _probe_end_of_turn(self) -> str:
    probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "RESPONSE"}]
    try:
      _, target = self.example(probe, 1, "a one-turn probe conversation")
    except UserError:
      return ""
    return target.split("RESPONSE", 1)[1] if "RESPONSE" in target else ""

  def record(self):
    return {"name": self.name, "end_of_turn": self.end_of_turn, "template": self.template,
            "special_tokens": self.special_tokens, "source": self.source}


_SIMPLE = {f.name: f for f in (Plain(), Alpaca(), Phi3(), ChatML())}


def _token_text(value):
  if isinstance(value, Mapping):  # a serialised AddedToken
    value = value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
  data = sources.load_json(path, "fix the file, or copy it again from the tokenizer's folder")
  if not isinstance(data, dict):
    raise UserError(f"{path}: not a JSON object")
  return data


def load_hf_template(path: str) -> HFChatTemplate:
  """The chat template of a tokenizer folder (chat_template.jinja, else the
  chat_template of tokenizer_config.json, as transformers reads them), of a
  tokenizer_config.json, or of a .jinja file; with the folder's special tokens."""
  path = os.path.abspath(os.path.expanduser(path))
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = path if path.endswith(".json") else os.path.join(folder, "tokenizer_config.json")
  config = _read_json(config_path) if os.path.isfile(config_path) else {}
  jinja = path if path.endswith(".jinja") else os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(jinja) and not path.endswith(".json"):
    with open(jinja, encoding="utf-8") as f:
      template, source = f.read(), jinja
  else:
    template, source = config.get("chat_template"), config_path
    if isinstance(template, list):  # [{"name", "template"}]: the default one
      template = next((t.get("template") for t in template
                       if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str):
      raise UserError(f"{path}: no chat template (neither chat_template.jinja nor a "
                      "'chat_template' in tokenizer_config.json); give a tokenizer folder "
                      "that has one, or choose another prompt format")
  specials = {}
  for extra in (os.path.join(folder, "special_tokens_map.json"),):
    if os.path.isfile(extra):
      specials.update({k: _token_text(v) for k, v in _read_json(extra).items()})
  specials.update({k: _token_text(config.get(k)) for k in SPECIAL_TOKENS if k in config})
  specials = {k: v for k, v in specials.items() if k in SPECIAL_TOKENS and v is not None}
  return HFChatTemplate(template, specials, source)


def get(name: str, template_from: str | None = None) -> PromptFormat:
  """A prompt format by name; hf_chat_template reads `template_from` (a tokenizer folder,
  its tokenizer_config.json or a .jinja file)."""
  if name in _SIMPLE:
    return _SIMPLE[name]
  if name == "hf_chat_template":
    if not template_from:
      raise UserError("prompt format hf_chat_template needs a tokenizer folder with a chat "
                      "template: bind user_data.chat_template (or train.init_from)")
    return load_hf_template(template_from)
  raise UserError(f"unknown prompt format {name!r}; choose one of {', '.join(NAMES)}")


def from_record(record: Mapping) -> PromptFormat:
  """The format a run folder recorded (see record())."""
  name = record.get("name")
  if name == "plain" and record.get("conversation"):
    return Plain(conversation=True)
  if name == "hf_chat_template":
    return HFChatTemplate(record.get("template"), record.get("special_tokens"),
                          record.get("source") or "the run's recorded chat template")
  return get(str(name))


# ---------------------------------------------------------------- fitting a budget

def fit_example(fmt: PromptFormat, messages: Messages, k: int,
                fits: Callable[[str], bool] | None, input_budget: int | None,
                where: str = "") -> tuple[str, str]:
  """(inputs, targets) of turn k, its history shortened to fit the input budget.

  The oldest turns go first (a leading system turn stays, the kept history starts
  at a user turn). What is then still too long is cut at its end, the question last:
  a leading system turn and an Alpaca input are cut so that the last turn's text fits
  whole; only a last turn too long alone is cut too (see _cut_to_fit). Texts far
  longer than the budget are cut by characters before any tokenizing, so a
  conversation of thousands of turns costs what its last budget's worth does.
  """
  max_chars = CHARS_PER_TOKEN * (input_budget or DEFAULT_BUDGET)
  lead = 1 if k > 0 and messages[0]["role"] == "system" else 0
  head = list(messages[:lead])
  if head and fits is not None:  # more characters than this never fit: not tokenized
    head = [{**head[0], "content": head[0]["content"][:max_chars]}]
  start, chars = k, 0  # walk back from the target turn, never copying the whole history
  while start > lead and chars + len(messages[start - 1]["content"]) <= max_chars:
    start -= 1
    chars += len(messages[start]["content"])
  history = list(messages[min(start, max(lead, k - 1)):k])

  def render(kept):
    return fmt.example(kept + [messages[k]], len(kept), where)

  drop = _fewest_dropped(history, lambda d: fits is None or fits(render(head + history[d:])[0]))
  while drop < len(history) - 1 and history[drop]["role"] == "assistant":
    drop += 1  # the kept history starts with a user turn
  kept = head + history[drop:]
  if fits is None or not kept or fits(render(kept)[0]):
    return render(kept)
  return render(_cut_to_fit(kept, len(head) > 0 and len(kept) > 1, max_chars,
                            lambda shorter: fits(render(shorter)[0])))


def _cut_to_fit(kept: list, has_system: bool, max_chars: int,
                ok: Callable[[list], bool]) -> list:
  """`kept` with the leading system turn's text, the last turn's input and, only if it
  is too long alone, the last turn's text cut at their ends until ok(kept).

  Each of these is kept up to a common number of characters c, the largest with which
  the prompt fits (the question whole, when it fits so): what is short stays whole and
  what makes the prompt too long is cut, so a long system turn or input no longer
  pushes the question out.
  """
  system, last = kept[0], kept[-1]
  sys_text = system["content"][:max_chars] if has_system else ""
  extra = (last.get("input") or "")[:max_chars]
  text = last["content"][:max_chars]

  def cut(c, n):  # system text and input up to c characters, the last turn's text up to n
    out = list(kept)
    if has_system:
      out[0] = {**system, "content": sys_text[:c]}
    out[-1] = {**last, "content": text[:n], **({"input": extra[:c]} if "input" in last else {})}
    return out

  if ok(cut(0, len(text))):  # the question fits alone: cut only what is around it
    c = _most_kept(max(len(sys_text), len(extra)), lambda c: ok(cut(c, len(text))))
    return cut(c, len(text))
  c = _most_kept(max(len(sys_text), len(extra), len(text)), lambda c: ok(cut(c, c)))
  return cut(c, c)


def _fewest_dropped(history: list, ok: Callable[[int], bool]) -> int:
  """The smallest d in [0, len - 1] with ok(d) (ok is monotone), else len - 1."""
  lo, hi = 0, max(0, len(history) - 1)
  while lo < hi:
    mid = (lo + hi) // 2
    if ok(mid):
      hi = mid
    else:
      lo = mid + 1
  return lo


def _most_kept(n: int, ok: Callable[[int], bool]) -> int:
  """The largest m in [0, n] with ok(m) (ok is monotone decreasing), else 0."""
  lo, hi = 0, n
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if ok(mid):
      lo = mid
    else:
      hi = mid - 1
  return lo
