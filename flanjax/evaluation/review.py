"""A page to read an evaluation or a judge's verdicts by eye: one self-contained HTML file.

Per example: the task, the prompt, the output, the reference, the extracted answer and
the score or verdict, with filters by task and by outcome (right / wrong; a judge's win,
loss, tie, flipped, unparsed) and a text search. Everything is escaped on the server
(html.escape), the page's CSS and JS are inline, and it loads nothing from the network.
"""

from __future__ import annotations

import html
import json
import os
from typing import Sequence

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:4px 6px;
vertical-align:top;text-align:left}th{background:#f3f3f3;position:sticky;top:0}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.35 monospace;
max-height:22em;overflow:auto}tr.right td.o{background:#e6f6e6}tr.wrong td.o{background:#fbe3e3}
tr.flipped td.o,tr.tie td.o{background:#fff6d6}tr.unparsed td.o{background:#eee}
#bar{margin:.6em 0}#bar select,#bar input{margin-right:1em}.sum{white-space:pre-wrap;
background:#f8f8f8;padding:.5em;border:1px solid #ddd;font:12px monospace}
"""

JS = """
function flt(){var t=document.getElementById('ft').value,o=document.getElementById('fo').value,
q=document.getElementById('fq').value.toLowerCase(),n=0;
document.querySelectorAll('tbody tr').forEach(function(r){
var ok=(!t||r.dataset.task===t)&&(!o||r.dataset.outcome===o)&&
(!q||r.textContent.toLowerCase().indexOf(q)>=0);r.style.display=ok?'':'none';if(ok)n++;});
document.getElementById('shown').textContent=n;}
"""

COLUMNS = ("task", "prompt", "output", "reference", "answer", "score")


# Control characters (a model's raw bytes) are parse errors in HTML, and NUL is refused by
# strict readers: shown as their Unicode pictures (U+2400..), C1 ones as U+FFFD.
_CONTROLS = {**{c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n\r"}, 0x7F: 0x2421,
             **{c: 0xFFFD for c in range(0x80, 0xA0)}}


def escape(value) -> str:
  """Text for an HTML page: markup escaped, control characters made visible."""
  return html.escape("" if value is None else str(value), quote=True).translate(_CONTROLS)


_e = escape


def _options(values, label) -> str:
  opts = "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in values)
  return f'<option value="">{_e(label)}</option>{opts}'


def page(title: str, summary, rows: Sequence[dict], headers: Sequence[str] = COLUMNS) -> str:
  """rows: {"task", "outcome", and a value per header}; summary: text or a JSON-able object."""
  tasks = sorted({str(r.get("task", "")) for r in rows})
  outcomes = sorted({str(r.get("outcome", "")) for r in rows})
  summary_text = summary if isinstance(summary, str) else json.dumps(summary, indent=1,
                                                                     ensure_ascii=False)
  body = []
  for r in rows:
    cells = []
    for h in headers:
      v = r.get(h)
      cls = ' class="o"' if h == headers[-1] else ""
      cells.append(f"<td{cls}><pre>{_e(v)}</pre></td>")
    body.append(f'<tr class="{_e(r.get("outcome", ""))}" data-task="{_e(r.get("task", ""))}" '
                f'data-outcome="{_e(r.get("outcome", ""))}">{"".join(cells)}</tr>')
  head = "".join(f"<th>{_e(h)}</th>" for h in headers)
  return (
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
      f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
      f"<h1>{_e(title)}</h1><details><summary>summary</summary>"
      f"<div class=\"sum\">{_e(summary_text)}</div></details>"
      f"<div id=\"bar\">task <select id=\"ft\" onchange=\"flt()\">{_options(tasks, 'all')}"
      f"</select> outcome <select id=\"fo\" onchange=\"flt()\">{_options(outcomes, 'all')}"
      "</select> search <input id=\"fq\" oninput=\"flt()\"> "
      f"<span id=\"shown\">{len(rows)}</span> of {len(rows)} shown</div>"
      f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
      f"<script>{JS}</script></body></html>\n")


def write_page(path: str, text: str) -> str:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


# ---------------------------------------------------------------- evaluation

def evaluation_rows(results) -> list[dict]:
  """Rows of every example each TaskResult kept (TaskResult.examples)."""
  rows = []
  for r in results:
    for ex in getattr(r, "examples_kept", None) or []:
      score = f"generated: {'right' if ex['correct'] else 'wrong'}"
      if ex.get("rank_choice") is not None:
        score += (f"\nrank classification: {ex['rank_choice']} "
                  f"({'right' if ex['rank_correct'] else 'wrong'})")
      rows.append({"task": f"{r.task}:{r.split}", "prompt": ex["inputs"],
                   "output": ex["prediction"], "reference": ex["target"],
                   "answer": f"{ex['answer']!s}  (gold: {ex['gold']!s})", "score": score,
                   "outcome": "right" if ex["correct"] else "wrong"})
  return rows


def evaluation_page(title: str, report: dict, results) -> str:
  summary = {k: report[k] for k in ("checkpoint", "source", "kind", "step", "decode",
                                    "prompt_format", "seconds", "summary") if k in report}
  summary["tasks"] = [{k: t[k] for k in ("task", "split", "examples", "score",
                                         "rank_classification")} for t in report["tasks"]]
  return page(title, summary, evaluation_rows(results))


# ---------------------------------------------------------------- the judge

def pairwise_page(summary: dict, records: Sequence[dict]) -> str:
  rows = []
  a, b = summary["a"]["name"], summary["b"]["name"]
  for r in records:
    said = (f"A = {a} first: {r['a_first']['verdict']}\n{r['a_first']['raw']}\n\n"
            f"A = {b} first: {r['b_first']['verdict']}\n{r['b_first']['raw']}")
    outcome = {"a": "a wins", "b": "b wins"}.get(r["outcome"], r["outcome"])
    rows.append({"task": r.get("dataset", "pairwise"), "prompt": r["instruction"],
                 "output a": r["output_a"], "output b": r["output_b"], "judge": said,
                 "outcome": outcome, "verdict": outcome})
  return page(f"pairwise: {a} vs {b}", summary, rows,
              ("task", "prompt", "output a", "output b", "judge", "verdict"))


def grade_page(summary: dict, records: Sequence[dict]) -> str:
  rows = []
  for r in records:
    score = r["score"]
    rows.append({"task": f"{r.get('category')} turn {r['turn']}", "prompt": r["question"],
                 "output": r["answer"], "reference": r.get("reference"),
                 "judge": r.get("raw"),
                 "score": "unparsed" if score is None else score,
                 "outcome": "unparsed" if score is None else f"score {score:>2}"})
  return page("MT-Bench grades", summary, rows,
              ("task", "prompt", "output", "reference", "judge", "score"))
