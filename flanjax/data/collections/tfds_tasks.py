"""FLAN 2021-style tasks read from TensorFlow Datasets that the user has prepared.

Each task ``tfds_<name>`` maps a TFDS example to template fields (premise,
hypothesis, question, passage ...), with "answer" as text and, for
classification, "options" as the label strings. Nothing is downloaded: a
dataset is read with ``download=False`` from ``tfds_data_dir.path`` (TFDS's
own default when unset), and a missing one is a one-line error naming the fix.

Our splits map to TFDS splits per task: train, validation (MNLI's
validation_matched; the test split where a set has no validation), and test
where its labels are public. Examples labelled -1 (no gold label) are
skipped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import gin
import numpy as np

from flanjax.data import templates as tmpl
from flanjax.data.tasks import TaskDef
from flanjax.errors import UserError

PREFIX = "tfds_"
CLASSIFY = ("zero_shot", "zero_shot_options", "few_shot", "few_shot_options")
# Tasks whose choices differ per example make no sense without their options.
CHOICE = ("zero_shot_options", "few_shot_options")
GENERATE = ("zero_shot", "few_shot")

YES_NO = ("yes", "no")
NLI3 = ("yes", "not enough information", "no")
SENTIMENT = ("negative", "positive")
TOPICS = ("world news", "sports", "business", "science and technology")


@gin.configurable
def tfds_data_dir(path: str | None = None) -> str | None:
  """Where prepared TFDS data lives; None is TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return path


@gin.configurable
def tfds_max_examples(per_split: int | None = None) -> int | None:
  """Reads at most this many examples of each split (FLAN 2021 capped training sets at 30k)."""
  if per_split is not None and int(per_split) <= 0:
    raise UserError(f"tfds_max_examples.per_split must be positive, not {per_split!r}")
  return None if per_split is None else int(per_split)


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("the tfds_* tasks need tensorflow-datasets; "
                    "pip install tensorflow-datasets") from None
  return tfds


def _builder(dataset: str):
  tfds = _tfds()
  try:
    return tfds.builder(dataset, data_dir=tfds_data_dir())
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"TFDS has no builder {dataset!r} (tensorflow-datasets "
                    f"{tfds.__version__}); upgrade tensorflow-datasets") from None


def _where(builder) -> str:
  return str(builder.data_dir_root)


def _py(x):
  """A numpy example from TFDS -> plain Python: str for bytes, lists for arrays."""
  if isinstance(x, Mapping):
    return {k: _py(v) for k, v in x.items()}
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return [_py(v) for v in x.tolist()] if x.ndim else _py(x.item())
  if isinstance(x, (list, tuple)):
    return [_py(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def _clean(text: str) -> str:
  return " ".join(text.split())


class Skip(Exception):
  """An example that cannot be used; the message is the reason, counted per reason."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One TFDS dataset as one task."""
  name: str  # the task is PREFIX + name
  dataset: str  # TFDS name, with config where it has several
  splits: Mapping[str, str]  # our split -> TFDS split
  family: str
  convert: Callable[[dict], dict]  # decoded example -> fields; raises Skip
  train_formats: Sequence[str] = CLASSIFY
  eval_format: str = "zero_shot_options"
  num_shots: int = 3
  label_key: str | None = "label"  # -1 here means unlabelled
  metric_fns: Sequence[Callable] | None = None
  description: str = ""

  @property
  def task(self) -> str:
    return PREFIX + self.name


def _labelled(answers: Sequence[str], options: Sequence[str], fields: Callable[[dict], dict]):
  """A converter for fixed label sets: label id -> answers[id], options shown in `options` order."""
  assert set(answers) == set(options)

  def convert(ex):
    out = fields(ex)
    out.update(answer=answers[ex["label"]], options=list(options))
    return out
  return convert


def _pair(a, b, key_a, key_b):
  return lambda ex: {a: _clean(ex[key_a]), b: _clean(ex[key_b])}


def _as_question(text: str) -> str:
  # BoolQ questions are lower case with no question mark.
  text = _clean(text).rstrip("?")
  return text[:1].upper() + text[1:] + "?"


def _imdb_text(ex):
  return {"text": _clean(ex["text"].replace("<br />", " "))}


def _copa(ex):
  # TFDS's COPA holds only "cause" and "effect" here.
  rel = "cause" if ex["question"] == "cause" else "effect"
  opts = [_clean(ex["choice1"]), _clean(ex["choice2"])]
  return dict(premise=_clean(ex["premise"]), relation=rel,
              question="What was the cause?" if rel == "cause" else "What happened as a result?",
              options=opts, answer=opts[ex["label"]])


def _winogrande(ex):
  opts = [_clean(ex["option1"]), _clean(ex["option2"])]
  return dict(sentence=_clean(ex["sentence"]), option1=opts[0], option2=opts[1],
              options=opts, answer=opts[ex["label"]])


def _squad(ex):
  answers = [a for a in ex["answers"]["text"] if a.strip()]
  if not answers:
    raise Skip("no answer")
  return dict(title=ex["title"].replace("_", " "), context=_clean(ex["context"]),
              question=_clean(ex["question"]), answer=_clean(answers[0]))


def _arc(ex):
  # One choice per label letter (A-E), in order; ARC never repeats a letter.
  by_label = {}
  for label, text in zip(ex["choices"]["label"], ex["choices"]["text"]):
    by_label.setdefault(label, _clean(text))
  if ex["answerKey"] not in by_label:
    raise Skip("answer key is not among the choices")
  return dict(question=_clean(ex["question"]), options=list(by_label.values()),
              answer=by_label[ex["answerKey"]])


def _openbookqa(ex):
  q = ex["question"]
  opts = [_clean(q[f"choice_{c}"]) for c in "ABCD"]
  return dict(question=_clean(q["stem"]), options=opts, answer=opts[ex["answerKey"]])


def squad_metrics(targets, predictions):
  """Exact match and token F1 (SQuAD normalization) against the target answer, in percent."""
  if not targets:
    return {"exact_match": 0.0, "f1": 0.0}
  em = f1 = 0.0
  for t, p in zip(targets, predictions):
    gold, pred = tmpl.normalize_text(t), tmpl.normalize_text(p)
    em += gold == pred
    common = sum((collections.Counter(gold) & collections.Counter(pred)).values())
    if common:
      prec, rec = common / len(pred), common / len(gold)
      f1 += 2 * prec * rec / (prec + rec)
    else:
      f1 += float(gold == pred)  # both empty
  return {"exact_match": 100.0 * em / len(targets), "f1": 100.0 * f1 / len(targets)}


TV = {"train": "train", "validation": "validation"}
TVT = {"train": "train", "validation": "validation", "test": "test"}
# Sets with no validation split: their (labelled) test split is our validation.
TT = {"train": "train", "validation": "test"}

_ENT_RTE = ("yes", "no")  # entailment, not_entailment
_ENT_MNLI = ("yes", "not enough information", "no")  # entailment, neutral, contradiction
_ENT_CB = ("yes", "no", "not enough information")  # entailment, contradiction, neutral

SOURCES: tuple[Source, ...] = (
    Source("rte", "glue/rte", TV, "nli",
           _labelled(_ENT_RTE, YES_NO, _pair("premise", "hypothesis", "sentence1", "sentence2")),
           description="GLUE RTE: does the premise entail the hypothesis"),
    Source("mnli", "glue/mnli", {"train": "train", "validation": "validation_matched"}, "nli",
           _labelled(_ENT_MNLI, NLI3, _pair("premise", "hypothesis", "premise", "hypothesis")),
           description="MultiNLI, validation on the matched genres"),
    Source("snli", "snli", TVT, "nli",
           _labelled(_ENT_MNLI, NLI3, _pair("premise", "hypothesis", "premise", "hypothesis")),
           description="SNLI; pairs without a gold label are skipped"),
    *(Source(f"anli_{r}", f"anli/{r}", TVT, "nli",
             _labelled(_ENT_MNLI, NLI3, _pair("premise", "hypothesis", "context", "hypothesis")),
             description=f"Adversarial NLI round {r[1]}") for r in ("r1", "r2", "r3")),
    Source("cb", "super_glue/cb", TV, "nli",
           _labelled(_ENT_CB, NLI3, _pair("premise", "hypothesis", "premise", "hypothesis")),
           description="SuperGLUE CommitmentBank"),
    Source("qnli", "glue/qnli", TV, "answer_sentence",
           _labelled(_ENT_RTE, YES_NO, _pair("question", "sentence", "question", "sentence")),
           description="GLUE QNLI: does the sentence answer the question"),
    Source("mrpc", "glue/mrpc", TV, "paraphrase",
           _labelled(("no", "yes"), YES_NO, _pair("sentence1", "sentence2", "sentence1", "sentence2")),
           description="GLUE MRPC paraphrase pairs"),
    Source("paws_wiki", "paws_wiki", TVT, "paraphrase",
           _labelled(("no", "yes"), YES_NO, _pair("sentence1", "sentence2", "sentence1", "sentence2")),
           description="PAWS (Wikipedia, labelled final, tokenized)"),
    Source("qqp", "glue/qqp", TV, "duplicate_questions",
           _labelled(("no", "yes"), YES_NO, _pair("question1", "question2", "question1", "question2")),
           description="GLUE Quora Question Pairs"),
    Source("sst2", "glue/sst2", TV, "sentiment",
           _labelled(SENTIMENT, SENTIMENT, lambda ex: {"text": _clean(ex["sentence"])}),
           description="GLUE SST-2 sentence sentiment"),
    Source("imdb", "imdb_reviews/plain_text", TT, "sentiment",
           _labelled(SENTIMENT, SENTIMENT, _imdb_text), num_shots=1,
           description="IMDB movie reviews; the test split is our validation"),
    Source("yelp_polarity", "yelp_polarity_reviews", TT, "sentiment",
           _labelled(SENTIMENT, SENTIMENT, lambda ex: {"text": _clean(ex["text"])}), num_shots=2,
           description="Yelp review polarity; the test split is our validation"),
    Source("boolq", "super_glue/boolq", TV, "boolq",
           _labelled(("no", "yes"), YES_NO,
                     lambda ex: {"passage": _clean(ex["passage"]),
                                 "question": _as_question(ex["question"])}), num_shots=1,
           description="SuperGLUE BoolQ yes/no questions"),
    Source("ag_news", "ag_news_subset", TT, "topic",
           _labelled(TOPICS, TOPICS, lambda ex: {"title": _clean(ex["title"]),
                                                 "text": _clean(ex["description"])}),
           description="AG News topics; the test split is our validation"),
    Source("copa", "super_glue/copa", TV, "cause_effect", _copa, train_formats=CHOICE,
           description="SuperGLUE COPA: the more plausible cause or effect"),
    Source("winogrande", "winogrande", {"train": "train_xl", "validation": "validation"},
           "fill_blank", _winogrande, train_formats=CHOICE,
           description="WinoGrande (XL training set)"),
    Source("openbookqa", "openbookqa", TVT, "mcqa", _openbookqa, train_formats=CHOICE,
           label_key="answerKey", description="OpenBookQA, question and four choices"),
    *(Source(f"arc_{lvl.lower()}", f"ai2_arc/ARC-{lvl}", TVT, "mcqa", _arc, train_formats=CHOICE,
             label_key="answerKey", description=f"AI2 ARC {lvl}") for lvl in ("Easy", "Challenge")),
    Source("squad", "squad/v1.1", TV, "extractive_qa", _squad, train_formats=GENERATE,
           eval_format="zero_shot", num_shots=1, label_key=None, metric_fns=(squad_metrics,),
           description="SQuAD v1.1; the target is the first gold answer"),
)


def missing_error(dataset: str, builder) -> UserError:
  where = _where(builder)
  return UserError(
      f"TFDS dataset {dataset} is not prepared in {where} (nothing is downloaded); "
      f"prepare it with `tfds build {dataset} --data_dir={where}`, or bind "
      "tfds_data_dir.path to the folder that holds it")


def _tfds_split(src: Source, split: str) -> str:
  n = tfds_max_examples()
  return src.splits[split] + (f"[:{n}]" if n else "")


def load(src: Source, split: str) -> list[dict]:
  """The examples of one of our splits as field dicts; unusable ones are counted and skipped."""
  tfds = _tfds()
  builder = _builder(src.dataset)
  try:
    ds = tfds.load(src.dataset, split=_tfds_split(src, split), data_dir=tfds_data_dir(),
                   download=False)
  except AssertionError as e:
    # TFDS asserts that prepared data exists ("Dataset x: could not find data in
    # <dir>"); any other assertion (a bad version, a builder bug) surfaces as it is.
    if "could not find data in" not in str(e):
      raise
    raise missing_error(src.dataset, builder) from None
  out, skipped = [], collections.Counter()
  for raw in tfds.as_numpy(ds):
    ex = _py(raw)
    if src.label_key and ex.get(src.label_key) == -1:
      skipped["unlabelled (label -1)"] += 1
      continue
    try:
      out.append(src.convert(ex))
    except Skip as e:
      skipped[str(e)] += 1
  if skipped:
    parts = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    print(f"data: {src.task}/{split} ({src.dataset} {src.splits[split]}): kept {len(out)}, "
          f"skipped {parts}", flush=True)
  return out


def fingerprint(src: Source) -> str:
  """Dataset, version, data folder and split sizes from the builder's info; reads no examples."""
  builder = _builder(src.dataset)
  sizes = {k: v.num_examples for k, v in sorted(builder.info.splits.items())}
  return f"{builder.info.full_name}|{builder.data_dir}|{sizes}|max={tfds_max_examples()}"


def task_defs() -> list[TaskDef]:
  return [
      TaskDef(name=s.task, load=functools.partial(load, s), splits=tuple(s.splits),
              templates=s.family, train_formats=tuple(s.train_formats),
              eval_format=s.eval_format, num_shots=s.num_shots,
              eval_only_splits=tuple(x for x in s.splits if x != "train"),
              fingerprint=functools.partial(fingerprint, s), metric_fns=s.metric_fns,
              description=f"{s.description} (TFDS {s.dataset})")
      for s in SOURCES
  ]
