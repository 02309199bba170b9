"""python -m flanjax.curate on the real data: each command, its references, its accounting."""

import collections
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, shared_data

from flanjax.curate import cli, dedup, generate, records, select
from flanjax.curate.rouge import RougePool


def _curate(*argv):
  assert cli.run([str(a) for a in argv]) == 0
  out = argv[argv.index("--out") + 1]
  with open(out, encoding="utf-8") as f:
    written = [json.loads(line) for line in f]
  with open(f"{out}.report.json", encoding="utf-8") as f:
    report = json.load(f)
  assert report["read"] == report["kept"] + sum(report["dropped"].values())
  assert report["kept"] == len(written) or argv[0] in ("self-instruct", "evolve")
  return written, report


def _response(rec):
  """The response's text, without the whitespace at its ends."""
  if "conversations" in rec:
    return "\n\n".join(t["value"].strip() for t in rec["conversations"] if t["from"] == "gpt")
  return rec["output"].strip()


# ------------------------------------------------------------------ ROUGE-L

def test_rouge_l_equals_rouge_score_and_the_filter_agrees():
  from rouge_score import rouge_scorer
  seeds = [r.instruction for r in records.read(
      str(shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl"))[0]]
  rng = np.random.default_rng(0)
  queries = seeds[:25] + [" ".join(rng.permutation(s.split())) for s in seeds[25:45]]
  queries += ["", "!!!", "Write a poem about the sea.", seeds[3] + " " + seeds[4]]
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  pool = RougePool(seeds)
  for q in queries:
    want = [scorer.score(q, s)["rougeL"].fmeasure for s in seeds]
    assert pool.scores(q).tolist() == want
    assert pool.max_score(q)[0] == max(want)
    assert (pool.max_score(q, above=0.7)[0] > 0.7) == (max(want) > 0.7)


# ------------------------------------------------------------------ QDIT

def _objective(emb, q, chosen, alpha, k):
  """The docstring's objective by hand: facility location averaged over the pool, quality
  (min-max scaled) averaged over the k to choose."""
  sim = emb @ emb.T
  qs = (q - q.min()) / (q.max() - q.min())
  return ((1 - alpha) * np.maximum(sim[:, chosen].max(1), 0).sum() / len(emb)
          + alpha * qs[chosen].sum() / k)


@pytest.mark.parametrize("alpha,nonneg", [(0.0, False), (0.0, True), (0.5, False), (0.7, True),
                                          (0.05, True), (0.2, False)])
def test_qdit_lazy_greedy_equals_brute_force(alpha, nonneg):
  rng = np.random.default_rng(int(alpha * 10) + nonneg)
  emb = rng.normal(size=(60, 12))
  emb = np.abs(emb) if nonneg else emb
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  q = rng.random(60)
  lazy = select.qdit(emb, q, 15, alpha, batch=4, progress=False)
  brute = select.brute_force_qdit(emb, q, 15, alpha)
  assert len(set(lazy)) == 15
  for k in range(1, 16):  # the same objective after every step (ties may pick either)
    assert abs(_objective(emb, q, lazy[:k], alpha, 15)
               - _objective(emb, q, brute[:k], alpha, 15)) < 1e-9
  assert lazy[:5] == brute[:5]


def test_brute_force_qdit_is_the_greedy_of_the_documented_objective():
  """Each step of the reference picks the candidate that maximises the docstring's objective
  evaluated by hand (quality averaged over k): a loop over every candidate here."""
  rng = np.random.default_rng(11)
  emb = np.abs(rng.normal(size=(40, 6)))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  q = rng.random(40)
  for alpha in (0.05, 0.3):
    chosen = []
    for _ in range(10):
      vals = [(_objective(emb, q, chosen + [j], alpha, 10), -j) for j in range(40) if j not in chosen]
      chosen.append(-max(vals)[1])
    assert select.brute_force_qdit(emb, q, 10, alpha) == chosen
    assert select.qdit(emb, q, 10, alpha, batch=3, progress=False) == chosen


def test_qdit_share_of_top_quality_picks_rises_with_alpha_on_the_real_pool():
  """alpha trades quality against diversity: on the real pool (score 4.5 is its best, 28%
  of it) the share of best-score picks among 100 grows step by step with alpha, from what
  diversity alone picks to all of them, not all-or-nothing after the first small alpha."""
  path = shared_data("instruction_pool") / "filtered_alpaca_1k_longest.json"
  recs = records.read(str(path))[0]
  emb = select.tfidf_embeddings([r.prompt for r in recs], 256)
  q = np.asarray([r.raw["score"] for r in recs], float)
  alphas = (0.0, 0.01, 0.05, 0.1, 1.0)
  share = [int((q[select.qdit(emb, q, 100, a, progress=False)] == q.max()).sum()) for a in alphas]
  assert share[-1] == 100 and share[0] < 50  # quality alone; diversity alone: a minority
  assert all(a < b for a, b in zip(share, share[1:])), share  # strictly rising, step by step
  assert share[1] < 50 < share[3] < 100, share  # intermediate alphas give intermediate mixes


def test_qdit_alpha_one_is_quality_top_k():
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(200, 8))
  q = rng.random(200)
  assert select.qdit(emb, q, 20, 1.0, progress=False) == list(np.argsort(-q, kind="stable")[:20])


# ------------------------------------------------------------------ select

def test_select_longest_over_the_pool_equals_sorting_by_response_length(tmp_path):
  files = sorted(shared_data("instruction_pool").glob("*.json"))
  pool = [r for f in files for r in json.loads(f.read_text())]
  out = tmp_path / "longest.jsonl"
  written, report = _curate("select", *files, "--method", "longest", "--k", 1000, "--out", out)
  want = sorted(range(len(pool)), key=lambda i: (-len(_response(pool[i])), i))[:1000]
  assert written == [pool[i] for i in want]
  assert report["dropped"] == {"not selected (longest)": len(pool) - 1000}
  fig = report["figures"]
  assert fig["selection"]["response_words_mean"] > fig["pool"]["response_words_mean"]
  assert fig["pool"]["leading_verbs"] and 0 < fig["coverage_mean_nearest_similarity"] <= 1


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "true"])
def test_a_score_that_is_not_a_finite_number_is_named_not_selected(tmp_path, bad):
  # json reads NaN and Infinity; unchecked, NaN sorted first and was kept as the best.
  path = tmp_path / "scored.jsonl"
  path.write_text("".join(
      f'{{"prompt": "question {i}", "completion": "answer {i}", "score": '
      f'{bad if i == 3 else i}}}\n' for i in range(6)))
  for method in ("quality", "qdit"):
    with pytest.raises(Exception, match=rf"scored.jsonl:4: (a non-finite|no numeric) 'score' "
                       rf"field \({'True' if bad == 'true' else bad.lower()[:3]}"):
      cli.run(["select", str(path), "--method", method, "--k", "2",
               "--out", str(tmp_path / "o.jsonl")])
  assert not (tmp_path / "o.jsonl").exists()


def test_select_qdit_and_diverse_on_seed_tasks(tmp_path):
  seeds = shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl"
  with pytest.raises(Exception, match="no numeric 'score'"):
    cli.run(["select", str(seeds), "--method", "qdit", "--k", "10", "--out", str(tmp_path / "q")])
  fl, rep = _curate("select", seeds, "--method", "qdit", "--alpha", 0, "--k", 20,
                    "--out", tmp_path / "q.jsonl")
  recs = records.read(str(seeds))[0]
  emb = select.tfidf_embeddings([r.prompt for r in recs], 256)
  want = select.brute_force_qdit(emb, np.zeros(len(recs)), 20, 0.0)
  got = [next(i for i, r in enumerate(recs) if r.raw == w) for w in fl]
  assert abs(_objective(emb, np.arange(len(recs)) * 1.0, got, 0, 20)
             - _objective(emb, np.arange(len(recs)) * 1.0, want, 0, 20)) < 1e-6
  dv, rep = _curate("select", seeds, "--method", "diverse", "--k", 30, "--out", tmp_path / "d.jsonl")
  assert len(dv) == 30 and rep["figures"]["selection"]["mean_pairwise_similarity"] < 0.2


# ------------------------------------------------------------------ dedup

def test_dedup_finds_planted_exact_and_near_copies(tmp_path):
  pool = json.loads((shared_data("instruction_pool") / "filtered_alpaca_1k_score.json").read_text())
  base = pool[:120]
  planted = [dict(base[i]) for i in range(5)]  # exact copies
  near = []
  long = [i for i in range(5, len(base)) if len(base[i]["conversations"][1]["value"].split()) > 150]
  for i in long[:5]:  # one word of a long response changed
    rec = json.loads(json.dumps(base[i]))
    words = rec["conversations"][1]["value"].split(" ")
    words[len(words) // 2] = "zebra"
    rec["conversations"][1]["value"] = " ".join(words)
    near.append(rec)
  data = base + planted + near
  path = tmp_path / "pool.json"
  path.write_text(json.dumps(data))
  written, report = _curate("dedup", path, "--rouge", 0, "--out", tmp_path / "d.jsonl")
  assert report["dropped"]["exact duplicate"] == 5
  # The reference: exact Jaccard of word 5-gram shingles against every earlier record.
  recs = records.read(str(path))[0]
  sh = [dedup.shingles(r.text) for r in recs]
  brute = sum(1 for i in range(len(recs)) if dedup.normalised(recs[i].text) not in
              {dedup.normalised(recs[j].text) for j in range(i)}
              and any(dedup.jaccard(sh[i], sh[j]) >= 0.8 for j in range(i)))
  assert brute >= 5 and report["dropped"]["near duplicate (MinHash LSH)"] == brute
  assert len(written) == len(data) - 5 - brute


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_dedup_finds_every_pair_just_above_the_threshold_as_brute_force_does(tmp_path, threshold):
  """Near copies graded from just below to just above --jaccard: the LSH, whose proposals
  the exact Jaccard confirms, drops exactly those a brute-force loop over all earlier
  records finds. (datasketch's own bands found a pair at the threshold 40% of the time.)"""
  pool = json.loads((shared_data("instruction_pool") / "filtered_alpaca_1k_score.json").read_text())
  long = [r for r in pool if len(r["conversations"][1]["value"].split()) > 120][:40]
  rng = np.random.default_rng(0)
  data = []
  for i, rec in enumerate(long):
    data.append(rec)
    words = rec["conversations"][1]["value"].split(" ")
    text = dedup.shingles(" ".join(r["value"] for r in rec["conversations"]))
    target = threshold + (i % 8 - 2) * 0.02  # two below, six at or above
    for k in range(1, len(words)):  # the fewest changed words that bring it under target
      copy = list(words)
      for j in rng.choice(len(words), k, replace=False):
        copy[j] = f"w{i}x{j}"
      conv = [rec["conversations"][0], {**rec["conversations"][1], "value": " ".join(copy)}]
      if dedup.jaccard(text, dedup.shingles(" ".join(r["value"] for r in conv))) < target + 0.02:
        data.append({**rec, "conversations": conv})
        break
  path = tmp_path / "graded.json"
  path.write_text(json.dumps(data))
  written, report = _curate("dedup", path, "--jaccard", threshold, "--out", tmp_path / "g.jsonl")
  recs = records.read(str(path))[0]
  sh = [dedup.shingles(r.text) for r in recs]
  brute = [i for i in range(len(recs))
           if any(dedup.jaccard(sh[i], sh[j]) >= threshold for j in range(i))]
  scores = [max(dedup.jaccard(sh[i], sh[j]) for j in range(i)) for i in brute]
  assert len(brute) >= 20 and min(scores) < threshold + 0.03  # pairs close to the threshold
  assert report["dropped"]["near duplicate (MinHash LSH)"] == len(brute)
  assert len(written) == len(recs) - len(brute)
  assert report["figures"]["dedup"]["lsh_found_at_threshold"] >= dedup.LSH_RECALL


# ------------------------------------------------------------------ decontaminate

def test_decontaminate_finds_every_planted_gsm8k_test_question(tmp_path):
  cot = sorted(shared_data("flan_cot").glob("*_train.tsv"))
  test = [json.loads(line) for line in (shared_data("gsm8k") / "test.jsonl").read_text().splitlines()]
  planted = tmp_path / "planted.jsonl"
  planted.write_text("".join(json.dumps({"instruction": t["question"], "input": "",
                                         "output": "Let me work it out."}) + "\n" for t in test))
  out = tmp_path / "clean.jsonl"
  written, report = _curate("decontaminate", *cot, planted, "--drop", "--out", out)
  fig = report["figures"]["decontamination"]
  assert {"gsm8k:test", "mt_bench", "alpaca_eval"} <= set(fig["evaluation_sets"])
  assert any(s.startswith("bbh_") for s in fig["evaluation_sets"])
  assert any(s.startswith("mmlu_") for s in fig["evaluation_sets"])
  # A set not checked (a TFDS dataset not prepared here) is noted with its whole fix.
  for note in fig["notes"]:
    assert "tfds build" not in note or "--data_dir=" in note, note
  flagged = collections.defaultdict(list)
  for m in report["figures"]["matches"]:
    flagged[m["training_record"]].append(m)
  planted_hits = {w for w in flagged if w.startswith(str(planted))}
  assert len(planted_hits) == len(test)  # every planted question, and each one
  others = {w: ms for w, ms in flagged.items() if w not in planted_hits}
  # The rest: flan_cot records whose reported n-gram is in both texts (checked here).
  assert len(others) < 30
  texts = {r.where: r.text for f in cot for r in records.read(str(f))[0]}
  for w, ms in others.items():  # GSM8K's own training questions share phrasing with its test
    for m in ms:
      assert m["evaluation_set"] == "gsm8k:test" and "gsm8k_train.tsv" in w
      ex = test[m["evaluation_example"]]
      assert m["ngram"] in " ".join(records.words(texts[w]))
      assert m["ngram"] in " ".join(records.words(ex["question"] + " " + ex["answer"]))
  assert report["dropped"] == {"shares an n-gram with evaluation data": len(flagged)}
  assert len(written) == report["read"] - len(flagged)


def _mmlu_rows(subject="high_school_biology"):
  import csv  # pylint: disable=g-import-not-at-top
  path = shared_data("mmlu") / "test" / f"{subject}_test.csv"
  with open(path, encoding="utf-8") as f:
    return list(csv.reader(f))[1:]  # after the header row


def test_decontaminate_reads_every_turn_joins_fields_and_finds_short_questions(tmp_path):
  """A test question in a conversation's second user turn; an MMLU question shorter than n
  words with its choices on one line; a short AlpacaEval instruction: each found, each in a
  record that would otherwise pass, and nothing flagged among clean records."""
  test = [json.loads(line) for line in (shared_data("gsm8k") / "test.jsonl").read_text().splitlines()]
  rows = _mmlu_rows()
  words = lambda t: len(records.words(t))  # noqa: E731
  short_q = next(r for r in rows if 8 <= words(r[0]) < 13)
  short_q_long_choices = next(r for r in rows if 8 <= words(r[0]) < 13 and r is not short_q)
  alpaca = json.loads((shared_data("alpaca_eval") / "text_davinci_003_outputs.json").read_text())
  short_inst = next(a["instruction"] for a in alpaca if 8 <= words(a["instruction"]) < 13)
  pool = json.loads((shared_data("instruction_pool") / "filtered_alpaca_1k_score.json").read_text())
  clean = [r for r in pool[:40]]
  planted = [
      {"id": "second_turn", "conversations": [
          {"from": "human", "value": "Hi, can you help with maths?"},
          {"from": "gpt", "value": "Of course."},
          {"from": "human", "value": test[14]["question"]},
          {"from": "gpt", "value": "Let me think."}]},
      {"id": "mmlu_one_line", "conversations": [
          {"from": "human", "value": short_q[0] + " A. " + " B. ".join(short_q[1:5])},
          {"from": "gpt", "value": "I am not sure."}]},
      {"id": "mmlu_question_alone", "conversations": [
          {"from": "human", "value": "Q: " + short_q_long_choices[0]},
          {"from": "gpt", "value": "Something else."}]},
      {"id": "alpaca_eval_short", "conversations": [
          {"from": "human", "value": short_inst},
          {"from": "gpt", "value": "A different answer of ours."}]}]
  path = tmp_path / "pool.json"
  path.write_text(json.dumps(clean + planted))
  written, report = _curate("decontaminate", path, "--drop", "--out", tmp_path / "c.jsonl")
  assert [r.get("id") for r in written] == [r.get("id") for r in clean]
  hits = {m["training_record"]: m for m in report["figures"]["matches"]}
  assert set(hits) == {f"{path}[{len(clean) + i}]" for i in range(4)}
  fig = report["figures"]["decontamination"]
  assert fig["min_words"] == 8 and fig["examples_too_short_to_find"] >= 0
  # Short keys are found only word for word: one word changed and the question passes.
  changed = dict(planted[2], conversations=[
      {"from": "human", "value": "Q: " + short_q_long_choices[0].replace(" ", " zebra ", 1)},
      {"from": "gpt", "value": "Something else."}])
  path.write_text(json.dumps([changed]))
  written, report = _curate("decontaminate", path, "--drop", "--out", tmp_path / "d.jsonl")
  assert len(written) == 1


def test_curate_options_tasks_and_evaluation_inputs_are_checked(tmp_path):
  pool = shared_data("instruction_pool") / "filtered_alpaca_1k_score.json"
  out = str(tmp_path / "o.jsonl")
  for bad in (["decontaminate", str(pool), "--n", "0"], ["decontaminate", str(pool), "--common", "1"],
              ["dedup", str(pool), "--jaccard", "1.5"], ["select", str(pool), "--method", "qdit",
                                                          "--k", "5", "--alpha", "1.5"]):
    with pytest.raises(Exception, match="is outside"):
      cli.run(bad + ["--out", out])
  with pytest.raises(Exception, match=r"--tasks alpacaeval: no evaluation task.*alpaca_eval"):
    cli.run(["decontaminate", str(pool), "--tasks", "gsm8k", "alpacaeval", "--out", out])
  # What a command needs is checked before its inputs are read: a malformed input file
  # behind these never gets its own error.
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"foo": "a"}\n')  # matches no format: reading it is an error
  for bad, message in ((["select", "--method", "longest"], "select needs --k"),
                       (["decontaminate", "--tasks", "gsm9k"], "--tasks gsm9k: no evaluation task"),
                       (["evolve"], "evolve needs --checkpoint")):
    with pytest.raises(Exception, match=message):
      cli.run([bad[0], str(broken), *bad[1:], "--out", out])
  evaluation = shared_data("alpaca_eval") / "text_davinci_003_outputs.json"
  with pytest.raises(Exception, match="is evaluation data .alpaca_eval.*--allow_evaluation_data"):
    cli.run(["select", str(evaluation), "--method", "longest", "--k", "3", "--out", out])
  import os  # pylint: disable=g-import-not-at-top
  assert not os.path.exists(out)
  written, _ = _curate("select", evaluation, "--method", "longest", "--k", 3,
                       "--allow_evaluation_data", "--out", out)
  assert len(written) == 3


def test_curate_says_which_format_it_detected_and_offers_no_option_it_lacks(tmp_path, capsys):
  from flanjax.data import cache  # pylint: disable=g-import-not-at-top
  data = tmp_path / "pool.jsonl"
  data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n"
                          for w in ("yes", "no", "maybe")))
  cache.clear_caches()
  written, _ = _curate("select", data, "--method", "longest", "--k", 2,
                       "--out", tmp_path / "o.jsonl")
  out = capsys.readouterr().out
  assert [r["output"] for r in written] == ["maybe", "yes"]
  assert f"data: {data}: format alpaca (detected from its first record)" in out, out
  assert "'format'" not in out  # a training task's option: curate has none


def test_mixed_formats_keep_conversations_and_fields_and_seed_instances_add_up(tmp_path):
  sg = tmp_path / "sg.json"
  sg.write_text(json.dumps([{"id": "c1", "score": 5.0, "conversations": [
      {"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": "Paris."},
      {"from": "human", "value": "And its river?"}, {"from": "gpt", "value": "The Seine."}]}]))
  al = tmp_path / "al.jsonl"
  al.write_text(json.dumps({"id": "a1", "score": 4.0, "instruction": "Give a synonym of happy.",
                            "input": "", "output": "Joyful."}) + "\n")
  written, _ = _curate("dedup", sg, al, "--out", tmp_path / "m.jsonl")
  assert written[0] == {"id": "c1", "score": 5.0, "messages": [
      {"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "Paris."},
      {"role": "user", "content": "And its river?"},
      {"role": "assistant", "content": "The Seine."}]}
  assert written[1]["id"] == "a1" and written[1]["score"] == 4.0
  q, _ = _curate("select", tmp_path / "m.jsonl", "--method", "quality", "--k", 1,
                 "--out", tmp_path / "q.jsonl")
  assert q[0]["id"] == "c1"
  # A seed task of several instances is one record per instance, counted so.
  seeds = tmp_path / "seeds.jsonl"
  seeds.write_text("".join(json.dumps({"id": f"t{i}", "instruction": f"Task number {i} asks this.",
                                       "instances": [{"input": f"x{k}", "output": f"y{k}"}
                                                     for k in range(i + 1)]}) + "\n"
                           for i in range(3)))
  written, report = _curate("dedup", seeds, "--out", tmp_path / "s.jsonl")
  assert report["read"] == 6 and len(written) == 6


def test_dedup_keeps_one_task_with_other_inputs_and_rouge_compares_prompts(tmp_path):
  inputs = ("Cats sleep most of the day and hunt small animals at night in gardens.",
            "Ships carried grain and wine across the Mediterranean for many centuries.",
            "Rivers shape valleys slowly, moving sand and stones down toward the sea.")
  recs = [{"instruction": "Summarize the following text.", "input": t,
           "output": f"It is about {t.split()[0].lower()}."} for t in inputs]
  path = tmp_path / "same.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  written, _ = _curate("dedup", path, "--out", tmp_path / "d.jsonl")
  assert written == recs  # not duplicates: the same task on other inputs
  recs.append({"instruction": "Summarize the following text.", "input": inputs[0].replace(
      "small", "tiny"), "output": "Cats."})
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  written, report = _curate("dedup", path, "--rouge", 0.7, "--jaccard", 0, "--out", tmp_path / "e.jsonl")
  assert written == recs[:3] and report["dropped"] == {"prompt ROUGE-L > 0.7": 1}


def test_a_progress_file_cut_mid_line_resumes_and_appends_whole_lines(tmp_path):
  out = str(tmp_path / "gen.jsonl")
  key = {"command": "evolve", "seed": 0}
  log = generate.Log(out, key)
  log.append([{"i": 0}, {"i": 1}])
  with open(out + ".progress.jsonl", "a", encoding="utf-8") as f:
    f.write('{"i": 2, "verd')  # the process killed while writing
  log = generate.Log(out, key)
  assert [it["i"] for it in log.items] == [0, 1]
  log.append([{"i": 2}, {"i": 3}])
  assert [it["i"] for it in generate.Log(out, key).items] == [0, 1, 2, 3]
  with open(out + ".progress.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [{"progress_of": key}] + [{"i": i} for i in range(4)]


# ------------------------------------------------------------------ generation

def test_filters_of_self_instruct_and_evol_instruct():
  pool = RougePool(["Give three tips for staying healthy."])
  p = generate.instruction_problem
  assert p("Hi there", pool)[0] == "length outside 3-150 words"
  assert p(" ".join(["word"] * 151), pool)[0] == "length outside 3-150 words"
  assert p("Draw a plot of the sales numbers.", pool)[0] == "blacklisted keyword"
  assert p("- List three fruits please.", pool)[0] == "starts with punctuation"
  assert p("Éxplain how rain forms in clouds.", pool)[0] == "starts with a non-ASCII character"
  assert p("Give three tips for staying very healthy.", pool)[0].startswith("ROUGE-L > 0.7")
  assert p("Explain how rain forms in clouds.", pool) is None
  stats = collections.Counter()
  kept = generate.postprocess_instances([("a", "a"), ("x", ""), ("q", "1"), ("q", "2"),
                                         ("z", "ok"), ("z", "ok")], stats)
  assert kept == [("z", "ok")]
  assert stats == {"input equals output": 1, "empty output": 1, "same input, different outputs": 2}
  e = generate.evolution_problem
  assert e("Name a fruit.", "name a fruit", "Apple.")[0] == "no change from the original"
  assert e("Name a fruit.", "Name a red fruit.", "Sorry, I cannot.")[0] == "short apologetic answer"
  assert e("Name a fruit.", "Name a red fruit.", "it is the ...")[0].startswith("answer is only")
  assert e("Name a fruit.", "Rewritten request: name a red fruit.", "Apple")[0].startswith("copies")
  assert e("Name a fruit.", "Name a red fruit.", "An apple.") is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A curated file (QDIT over the real pool) trained through runs/user_data.gin for 3 steps."""
  tmp = tmp_path_factory.mktemp("curated")
  pool = shared_data("instruction_pool") / "filtered_alpaca_1k_score.json"
  _curate("select", pool, "--method", "qdit", "--k", 60, "--out", tmp / "curated.jsonl")
  test = (shared_data("gsm8k") / "test.jsonl").read_text().splitlines()[:4]
  with open(tmp / "curated.jsonl", "a", encoding="utf-8") as f:  # planted: train.decontamination
    for line in test:
      f.write(json.dumps({"conversations": [{"from": "human", "value": json.loads(line)["question"]},
                                            {"from": "gpt", "value": "18"}]}) + "\n")
  run = tmp / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "flanjax.train", "--gin_file=runs/user_data.gin",
       f"--gin.USER_FILE={tmp / 'curated.jsonl'}", "--gin.MIXTURE='user_data'",
       f"--gin.train.model_dir={run}", "--gin.train.num_steps=2", "--gin.train.batch_size=2",
       "--gin.T5Config.d_model=32", "--gin.T5Config.num_encoder_layers=1",
       "--gin.T5Config.num_decoder_layers=1", "--gin.T5Config.d_ff=64",
       "--gin.train.task_feature_lengths={'inputs': 64, 'targets': 32}",
       "--gin.train.log_every_secs=0", "--gin.train.eval_at_end=False",
       "--gin.train.decontamination='drop'"],
      capture_output=True, text=True, timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "format sharegpt (detected" in proc.stdout
  found = json.loads((run / "summary.json").read_text())["decontamination"]["user_data"]
  # The planted questions in the train split (validation_share holds a few out), nothing else.
  assert 1 <= found["matched"] <= 4 and found["by_set"] == {"gsm8k:test": found["matched"]}
  assert f"user_data: {found['matched']} of {found['examples']} training examples share" in proc.stdout
  return run


def test_self_instruct_end_to_end_and_resumes(tiny_run, tmp_path, capsys):
  seeds = shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl"
  out = tmp_path / "si.jsonl"
  common = ["self-instruct", seeds, "--checkpoint", tiny_run, "--batch_size", 4,
            "--max_decode_len", 8, "--instances", 1, "--out", out]
  _, first = _curate(*common, "--num", 4)
  log = (tmp_path / "si.jsonl.progress.jsonl").read_text().splitlines()[1:]  # after the header
  assert len(log) == 4 and first["read"] == 4
  written, second = _curate(*common, "--num", 8)  # continues: the first 4 are not redone
  log2 = (tmp_path / "si.jsonl.progress.jsonl").read_text().splitlines()[1:]
  assert log2[:4] == log and len(log2) == 8 and second["read"] == 8
  # --num counts candidates; the line says what OUT holds (instances of the kept tasks).
  assert (f"curate: wrote {len(written)} records ({second['kept']} tasks kept of 8 candidates) "
          f"to {out}") in capsys.readouterr().err
  verdicts = collections.Counter(json.loads(x)["verdict"] for x in log2)
  assert dict(verdicts) == {k: v for k, v in {**second["dropped"], "kept": second["kept"]}.items() if v}


def test_evolve_end_to_end(tiny_run, tmp_path, capsys):
  src = tmp_path / "four.jsonl"
  src.write_text("".join(json.dumps({"instruction": t, "input": "", "output": "ok"}) + "\n" for t in
                         ["Name a fruit.", "Sort these numbers: 3 1 2.", "Write a haiku.",
                          "Explain rain."]))
  out = tmp_path / "ev.jsonl"
  written, report = _curate("evolve", src, "--checkpoint", tiny_run, "--rounds", 2,
                            "--batch_size", 4, "--max_decode_len", 8, "--out", out)
  assert report["read"] == 8 and len(written) == report["kept"]
  assert all(w["operation"] in {**generate.DEPTH, **generate.BREADTH} for w in written)
  assert (f"curate: wrote {len(written)} records ({report['kept']} evolutions kept of 8 "
          f"candidates) to {out}") in capsys.readouterr().err


def test_quality_checkpoint_scores_in_the_runs_prompt_format(tiny_run):
  """The per-token log-likelihood of each response after the prompt as generation wraps it
  (the run's format), checked against scoring the wrapped texts directly."""
  from flanjax import infer  # pylint: disable=g-import-not-at-top
  from flanjax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  pool = shared_data("instruction_pool") / "filtered_alpaca_1k_score.json"
  recs = records.read(str(pool))[0][:6]
  fmt = infer.prompt_format(str(tiny_run), None)
  assert fmt.wrap(recs[0].prompt) != recs[0].prompt  # the run wraps its prompts
  got = generate.loglikelihood_quality(str(tiny_run), recs, batch_size=4)
  loaded = loading.load(str(tiny_run))

  def by_hand(prompts, responses):
    ctx = [loaded.kind.prompt_ids(loaded.vocab, p) for p in prompts]
    cont = [list(loaded.vocab.encode(r)) for r in responses]
    sums, _ = scoring.loglikelihood(loaded.model, loaded.params, loaded.kind, ctx, cont,
                                    batch_size=4, max_length=1024, max_target_length=512)
    return sums / np.asarray([max(len(c), 1) for c in cont])

  want = by_hand([fmt.wrap(r.prompt) for r in recs], [r.response + fmt.end_of_turn for r in recs])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  bare = by_hand([r.prompt for r in recs], [r.response + fmt.end_of_turn for r in recs])
  assert not np.allclose(got, bare, rtol=1e-5)  # the wrapping is what changed


# ------------------------------------------------------------------ review fixes

def _trainer_reads(path):
  """What the trainer sees: the format detected from the first line, and every line read
  in it without a bad record."""
  from flanjax.data import sources  # pylint: disable=g-import-not-at-top
  from flanjax.data.collections import user  # pylint: disable=g-import-not-at-top
  fmt = user.detect_format(str(path))
  reader = sources.Reader(str(path), "skip")
  examples = [e for where, rec in sources.read_json_or_jsonl(reader)
              for e in user.record_examples(reader, fmt, where, rec)]
  return fmt, examples, reader.done()


def test_seed_tasks_and_tsv_mixed_with_chat_are_written_as_chat_throughout(tmp_path):
  seeds = shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl"
  pool = shared_data("instruction_pool") / "filtered_alpaca_1k_score.json"
  out = tmp_path / "dr.jsonl"
  written, report = _curate("dedup", seeds, pool, "--rouge", 0.5, "--out", out)
  assert all(set(w) >= {"messages"} and "instruction" not in w for w in written)
  fmt, _, rep = _trainer_reads(out)
  assert fmt == "chat" and rep.num_skipped == 0 and rep.kept == len(written) == report["kept"]
  # A seed instance keeps its text: instruction and input as the user turn, output as the reply.
  task = json.loads(seeds.read_text().splitlines()[0])
  inst = task["instances"][0]
  assert written[0] == {"messages": [
      {"role": "user", "content": f"{task['instruction'].strip()}\n\n{inst['input'].strip()}"
       if inst["input"].strip() else task["instruction"].strip()},
      {"role": "assistant", "content": inst["output"].strip()}]}
  # FLAN CoT TSV rows beside a ShareGPT file: chat too, in file order.
  tsv = tmp_path / "aqua.tsv"
  tsv.write_text("".join((shared_data("flan_cot") / "aqua_train.tsv").read_text(
      encoding="utf-8").splitlines(keepends=True)[:30]), encoding="utf-8")
  sg = tmp_path / "sg.json"
  sg.write_text(json.dumps(json.loads(pool.read_text())[:20]))
  written, report = _curate("dedup", tsv, sg, "--out", tmp_path / "t.jsonl")
  fmt, _, rep = _trainer_reads(tmp_path / "t.jsonl")
  assert fmt == "chat" and rep.num_skipped == 0 and rep.kept == len(written) == 50
  # One format in, that format out: seed instances alone stay Alpaca.
  written, _ = _curate("dedup", seeds, "--out", tmp_path / "s.jsonl")
  assert _trainer_reads(tmp_path / "s.jsonl")[0] == "alpaca"


def _gen_args(command, inputs, out, **options):
  argv = [command, *map(str, inputs), "--checkpoint", "ckpt", "--out", str(out)]
  for k, v in options.items():
    argv += [f"--{k}", str(v)]
  return cli._parser().parse_args(argv)  # pylint: disable=protected-access


def test_a_progress_file_of_other_inputs_or_options_is_refused(tmp_path):
  four = tmp_path / "four.jsonl"
  four.write_text("".join(json.dumps({"instruction": f"Task {i}.", "input": "", "output": "ok"})
                          + "\n" for i in range(4)))
  two = tmp_path / "two.jsonl"
  two.write_text("".join(four.read_text().splitlines(keepends=True)[:2]))
  out = tmp_path / "ev.jsonl"
  progress = tmp_path / "ev.jsonl.progress.jsonl"
  log = generate.Log(str(out), generate.run_key(_gen_args("evolve", [four], out, rounds=2)))
  log.append([{"round": 1, "index": 3, "verdict": "kept"}])
  before = progress.read_bytes()
  # The earlier run's evolutions of record 3 would index a 2-record file (IndexError before).
  with pytest.raises(Exception, match=rf"{progress} continues a run of other inputs .*{four}.*"
                                      "delete it"):
    generate.Log(str(out), generate.run_key(_gen_args("evolve", [two], out, rounds=2)))
  with pytest.raises(Exception, match=r"continues a run with --seed 0, not 1; delete it .* --seed 0"):
    generate.Log(str(out), generate.run_key(_gen_args("evolve", [four], out, rounds=2, seed=1)))
  with pytest.raises(Exception, match=r"--rounds 2, not 1 \(it may only grow\)"):
    generate.Log(str(out), generate.run_key(_gen_args("evolve", [four], out, rounds=1)))
  assert progress.read_bytes() == before  # nothing lost by a refusal
  # The same inputs, copied elsewhere (compared by content), continue; --rounds may grow.
  copy = tmp_path / "copy.jsonl"
  copy.write_bytes(four.read_bytes())
  again = generate.Log(str(out), generate.run_key(_gen_args("evolve", [copy], out, rounds=3)))
  assert again.items == [{"round": 1, "index": 3, "verdict": "kept"}]
  with pytest.raises(Exception, match=r"--rounds 3, not 2"):  # the grown value is recorded
    generate.Log(str(out), generate.run_key(_gen_args("evolve", [four], out, rounds=2)))
  # Through the command: refused before the checkpoint is loaded (this one does not exist).
  with pytest.raises(Exception, match=rf"{progress} continues a run of other inputs"):
    cli.run(["evolve", str(two), "--checkpoint", str(tmp_path / "no_ckpt"), "--rounds", "3",
             "--out", str(out)])
  # A file with no item yet (a run stopped before its first batch) is simply restarted.
  progress.unlink()
  generate.Log(str(out), generate.run_key(_gen_args("evolve", [four], out)))
  fresh = generate.Log(str(out), generate.run_key(_gen_args("evolve", [two], out, seed=5)))
  assert fresh.items == [] and json.loads(progress.read_text())["progress_of"]["seed"] == 5
  # Self-instruct: --num may grow, not shrink; --instances must match.
  si = tmp_path / "si.jsonl"
  generate.Log(str(si), generate.run_key(_gen_args("self-instruct", [four], si, num=4))).append([{"i": 0}])
  generate.Log(str(si), generate.run_key(_gen_args("self-instruct", [four], si, num=8)))
  with pytest.raises(Exception, match=r"--num 8, not 4 \(it may only grow\)"):
    generate.Log(str(si), generate.run_key(_gen_args("self-instruct", [four], si, num=4)))
  with pytest.raises(Exception, match=r"--instances 2, not 3"):
    generate.Log(str(si), generate.run_key(_gen_args("self-instruct", [four], si, num=8, instances=3)))
  # A progress file without the record (an older flanjax) is refused, not trusted.
  (tmp_path / "old.jsonl.progress.jsonl").write_text('{"i": 0, "verdict": "kept"}\n')
  with pytest.raises(Exception, match=r"old.jsonl.progress.jsonl does not say .* delete it"):
    generate.Log(str(tmp_path / "old.jsonl"), generate.run_key(_gen_args("evolve", [four], out)))


def test_progress_rate_counts_only_this_process_work(monkeypatch, capsys):
  from flanjax.curate import report as report_lib  # pylint: disable=g-import-not-at-top
  clock = [1000.0]
  monkeypatch.setattr(report_lib.time, "time", lambda: clock[0])
  p = report_lib.Progress(100, "evolve", every=0)
  p.done = 50  # found done in the progress file
  clock[0] += 2
  p.update(2)
  line = capsys.readouterr().err
  # 2 done in 2 s: 1/s, and 48 left: 0:48 (before: 52 / 2 s = 26/s, ETA 0:01).
  assert "evolve: 52/100 (52%), 1.0/s, ETA 0:48" in line, line


def test_out_that_is_an_input_or_a_folder_is_refused(tmp_path):
  pool = tmp_path / "pool.json"
  pool.write_text(json.dumps(json.loads((shared_data("instruction_pool")
                                         / "filtered_alpaca_1k_score.json").read_text())[:30]))
  before = pool.read_bytes()
  with pytest.raises(Exception, match=rf"--out {pool} is the input {pool}.*give --out another"):
    cli.run(["dedup", str(pool), "--out", str(pool)])
  assert pool.read_bytes() == before and not (tmp_path / "pool.json.report.json").exists()
  with pytest.raises(Exception, match=r"--out .* is the input"):  # the same file by another name
    cli.run(["self-instruct", str(pool), "--checkpoint", str(tmp_path / "none"),
             "--out", str(tmp_path / "." / "pool.json")])
  outdir = tmp_path / "outdir"
  outdir.mkdir()
  with pytest.raises(Exception, match=rf"--out {outdir} is a folder; give the path of a JSON "):
    cli.run(["dedup", str(pool), "--out", str(outdir)])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir", "pool.json"]
  assert list(outdir.iterdir()) == []


def test_temperature_zero_and_an_empty_array_are_refused_in_curate_words(tmp_path):
  pool = shared_data("alpaca_seed_tasks") / "seed_tasks.jsonl"
  with pytest.raises(Exception, match=r"--temperature 0.0 is outside \(0.0, inf\)"):
    # No such checkpoint: the range is checked before anything loads.
    cli.run(["self-instruct", str(pool), "--checkpoint", str(tmp_path / "none"),
             "--temperature", "0", "--out", str(tmp_path / "o.jsonl")])
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  with pytest.raises(Exception) as e:
    cli.run(["dedup", str(empty), "--out", str(tmp_path / "o.jsonl")])
  msg = str(e.value)
  assert msg.startswith(f"{empty}: no record to curate (an empty JSON array") and "\n" not in msg
  assert "format" not in msg and "leave it out" in msg
