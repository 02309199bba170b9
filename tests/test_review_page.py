"""The review page (flanjax/evaluation/review.py) and evaluate's prompt format: every value
HTML-escaped (a prompt holding <script> stays text), no network assets, filters by task and
outcome; python -m flanjax.evaluate's page holds each example's prompt, output, reference,
extracted answer and right/wrong, and its prompts are wrapped in the prompt format given
(or the run's recorded one, as infer does)."""

import html.parser
import json

import numpy as np
import pytest

from flanjax.evaluation import review
from test_judge import tiny_t5  # noqa: F401  (a random T5 folder, the fixture)


class _Rows(html.parser.HTMLParser):
  """The table's rows (data-* attributes, cell texts unescaped), the scripts, the links."""

  def __init__(self):
    super().__init__()
    self.rows, self.scripts, self.links, self.options = [], 0, [], []
    self._cell = None

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "tr" and "data-task" in a:
      self.rows.append({"task": a["data-task"], "outcome": a["data-outcome"], "cells": []})
    elif tag == "td" and self.rows:
      self._cell = []
    elif tag == "script":
      self.scripts += 1
      self.links += [a["src"]] if "src" in a else []
    elif tag in ("link", "img", "iframe"):
      self.links.append(a.get("href") or a.get("src"))
    elif tag == "option":
      self.options.append(a.get("value"))

  def handle_endtag(self, tag):
    if tag == "td" and self._cell is not None:
      self.rows[-1]["cells"].append("".join(self._cell))
      self._cell = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell.append(data)


def _parse(text):
  p = _Rows()
  p.feed(text)
  return p


def test_everything_is_escaped_and_the_page_is_self_contained():
  evil = '<script>alert("x")</script> & "quotes" \'single\''
  rows = [{"task": 'task"><b>1', "prompt": evil, "output": "</pre></td></tr>", "reference": "R",
           "answer": "<A>", "score": "1 & 2", "outcome": "right"},
          {"task": "t2", "prompt": "p", "output": "o", "reference": None, "answer": "a",
           "score": "s", "outcome": "wrong"}]
  text = review.page("<title>", {"note": "</div><script>"}, rows)
  assert text.count("<script>") == 1  # ours, inline; the data's is text
  assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
  p = _parse(text)
  assert p.scripts == 1 and p.links == [] and "http" not in text
  assert [(r["task"], r["outcome"]) for r in p.rows] == [('task"><b>1', "right"), ("t2", "wrong")]
  assert p.rows[0]["cells"] == [rows[0][k] for k in review.COLUMNS]  # every value round-trips
  assert p.rows[1]["cells"][3] == ""  # None shows empty
  assert {'task"><b>1', "t2", "right", "wrong"} <= set(p.options)  # the filters


def test_control_characters_of_raw_generations_are_shown_not_written():
  raw = "ok\x00nul \x01\x17 tab\there\nline \x7f \x85"
  text = review.page("t", {}, [{"task": "t", "prompt": raw, "output": raw, "reference": "r",
                                "answer": "a", "score": "s", "outcome": "right"}])
  bad = [c for c in text if (ord(c) < 32 and c not in "\t\n\r") or 0x7F <= ord(c) < 0xA0]
  assert bad == []
  assert "ok\u2400nul \u2401\u2417 tab\there" in text and "\u2421 \ufffd" in text


@pytest.mark.parametrize("fmt", [None, "chatml"])
def test_evaluate_writes_the_page_in_the_prompt_format(tiny_t5, builtin_vocab, tmp_path, fmt):
  from flanjax import decoding
  from flanjax.data import chat, registry
  from flanjax.evaluation import examples, run
  task = "builtin_comparison"
  report = run.evaluate(checkpoint=tiny_t5, tasks=[f"{task}:validation"], max_examples=3,
                        input_length=256, decode=decoding.DecodeConfig(max_decode_len=4),
                        out_dir=str(tmp_path), name="rev", prompt_format=fmt,
                        register_fns=(registry.register_builtin,), log=lambda _: None)
  assert report["prompt_format"] == (fmt or "plain")
  p = _parse((tmp_path / "rev.html").read_text(encoding="utf-8"))
  assert p.scripts == 1 and p.links == []
  raw = examples.load_examples(task, "validation", builtin_vocab, 256, 3)
  wrap = chat.get(fmt or "plain").wrap
  assert len(p.rows) == 3
  for row, ex in zip(p.rows, raw):
    _, prompt, output, reference, answer, score = row["cells"]
    assert row["task"] == f"{task}:validation"
    assert prompt == wrap(ex.inputs)  # chatml: <|im_start|>user ... <|im_start|>assistant
    assert reference == ex.targets
    right = answer.split("  (gold: ")[0] == answer.split("  (gold: ")[1][:-1]
    assert row["outcome"] == ("right" if right else "wrong") and score.startswith("generated")
  assert "examples_kept" not in json.dumps(report)
  # The table's score is the share of right rows (exact match of the extracted answers).
  t = report["tasks"][0]
  assert t["score"] == pytest.approx(100 * np.mean([r["outcome"] == "right" for r in p.rows]))
