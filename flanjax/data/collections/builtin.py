"""The built-in collection: procedurally generated instruction tasks.

Needs no data and no network, so the default job runs anywhere. Every family
has a generator of structured examples, eight templates in our own wording
(the last two are held out of training and only used in evaluation), and the
formats it trains on. Splits:

  train               examples for training, training templates, mixed formats
  validation          unseen examples, training templates, the eval format
  heldout_templates   unseen examples, held-out templates, the eval format

Under a template mode other than instructions (templates.template_mode) the
inputs are the family's raw input fields (Family.fields), options one per
line, and for dataset_name the task's name first; targets are unchanged.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from flanjax.data import cache
from flanjax.data import templates as tmpl
from flanjax.data.templates import Template, render

# The registered task of a family is TASK_PREFIX + its name (registry.BUILTIN_PREFIX).
TASK_PREFIX = "builtin_"

NUM_HELDOUT_TEMPLATES = 2
SPLIT_SIZES = {"train": 4000, "validation": 150, "heldout_templates": 150}
SPLIT_SEEDS = {"train": 1, "validation": 2, "heldout_templates": 3}
NUM_SHOTS = 2

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris",
         "Jonas", "Kemi", "Liam", "Maya", "Noor", "Oscar", "Priya"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "shells",
         "cards", "cookies", "stamps"]
WORDS = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach",
              "pear", "plum", "melon"],
    "animal": ["cat", "dog", "horse", "tiger", "rabbit", "sheep", "mouse",
               "eagle", "whale", "goat"],
    "vehicle": ["car", "bus", "train", "truck", "bicycle", "boat", "plane",
                "tram", "scooter", "van"],
    "color": ["red", "blue", "green", "yellow", "purple", "gray", "black",
              "white", "brown", "pink"],
}
SUBJECTS = ["The film", "This restaurant", "The hotel", "The book", "This phone",
            "The concert", "Our guide", "The service", "The game", "This album"]
POSITIVE = ["wonderful", "delightful", "excellent", "superb", "charming",
            "fantastic", "brilliant", "lovely", "impressive", "great"]
NEGATIVE = ["awful", "boring", "terrible", "dreadful", "disappointing",
            "mediocre", "annoying", "poor", "dull", "horrible"]
ADVERBS = ["truly", "really", "quite", "absolutely", "rather", "simply"]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  generate: Callable[[random.Random], dict]
  templates: Sequence[Template]
  train_formats: Sequence[str]
  eval_format: str
  # The string that identifies an example's content, for train/eval de-duplication.
  key: Callable[[dict], str] = lambda ex: repr(sorted(ex.items()))
  # The raw inputs without a template (no_template, dataset_name modes); default: the
  # fields the templates name, in order of first appearance.
  input_fields: Sequence[str] | None = None

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(self.input_fields or tmpl.input_fields(self.templates))

  @property
  def train_templates(self):
    return self.templates[:-NUM_HELDOUT_TEMPLATES]

  @property
  def heldout_templates(self):
    return self.templates[-NUM_HELDOUT_TEMPLATES:]


# ---------------------------------------------------------------- generators

def _arithmetic(rng: random.Random) -> dict:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  a = rng.randint(2, 20)
  if rng.random() < 0.5:
    b = rng.randint(1, 9)
    c = a + b
    story = f"{name} has {a} {item} and gets {b} more."
    rationale = f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {c}."
  else:
    b = rng.randint(1, a - 1)
    c = a - b
    story = f"{name} has {a} {item} and gives away {b}."
    rationale = f"{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {c}."
  return dict(story=story, name=name, item=item, rationale=rationale, answer=str(c))


def _comparison(rng: random.Random) -> dict:
  a, b = rng.sample(range(0, 100), 2)
  big = max(a, b)
  return dict(a=str(a), b=str(b), options=[str(a), str(b)], answer=str(big),
              rationale=f"{big} is more than {min(a, b)}.")


def _parity(rng: random.Random) -> dict:
  n = rng.randint(0, 99999)
  ans = "even" if n % 2 == 0 else "odd"
  return dict(number=str(n), options=["even", "odd"], answer=ans,
              rationale=f"The last digit of {n} is {n % 10}, which is {ans}.")


def _sentiment(rng: random.Random) -> dict:
  positive = rng.random() < 0.5
  words = POSITIVE if positive else NEGATIVE
  subject = rng.choice(SUBJECTS)
  first, second = rng.sample(words, 2)
  review = f"{subject} was {rng.choice(ADVERBS)} {first}"
  if rng.random() < 0.5:
    review += f" and {second}"
  review += "."
  ans = "positive" if positive else "negative"
  return dict(review=review, options=["positive", "negative"], answer=ans,
              rationale=f"The review calls it {review.split(' was ')[1].rstrip('.')}.")


def _category(rng: random.Random) -> dict:
  target, *others = rng.sample(sorted(WORDS), 3)
  choices = [rng.choice(WORDS[target])] + [rng.choice(WORDS[o]) for o in others]
  answer = choices[0]
  rng.shuffle(choices)
  return dict(category=target, words=", ".join(choices), options=choices,
              answer=answer, rationale=f"A {answer} is a {target}.")


def _list_reverse(rng: random.Random) -> dict:
  pool = [w for ws in WORDS.values() for w in ws]
  items = rng.sample(pool, rng.randint(2, 4))
  answer = ", ".join(reversed(items))
  return dict(items=", ".join(items), answer=answer,
              rationale=f"Reading the list from the end gives {answer}.")


# ---------------------------------------------------------------- templates
T = Template

FAMILIES = [
    Family(
        name="arithmetic",
        generate=_arithmetic,
        templates=[
            T("{story} How many {item} does {name} have now?"),
            T("Word problem: {story} How many {item} are left with {name}?"),
            T("Solve this: {story} What is the number of {item} {name} ends up with?"),
            T("{story}\nQuestion: how many {item} does {name} have?"),
            T("Read the story and answer with a number.\n{story} How many {item} now?"),
            T("{story} Count the {item} {name} holds at the end."),
            # held out
            T("Here is a short story: {story} After that, how many {item} does {name} own?"),
            T("Math question. {story} Give the final count of {item}."),
        ],
        train_formats=["cot", "few_shot_cot", "zero_shot"],
        eval_format="cot",
        # The story holds the numbers; item and name are only the templates' question.
        input_fields=["story"],
    ),
    Family(
        name="comparison",
        generate=_comparison,
        templates=[
            T("Which number is larger, {a} or {b}?\n{options}"),
            T("Pick the bigger number: {a} or {b}.\n{options}"),
            T("Of {a} and {b}, which is greater?\n{options}"),
            T("Compare {a} and {b}. Which one is the larger value?\n{options}"),
            T("Question: is {a} or {b} the higher number?\n{options}"),
            T("{a} versus {b}: name the larger one.\n{options}"),
            # held out
            T("Tell me the maximum of {a} and {b}.\n{options}"),
            T("Two numbers, {a} and {b}. Which is more?\n{options}"),
        ],
        train_formats=["zero_shot_options", "zero_shot", "few_shot_options"],
        eval_format="zero_shot_options",
    ),
    Family(
        name="parity",
        generate=_parity,
        templates=[
            T("Is {number} even or odd?\n{options}"),
            T("Decide whether the number {number} is even or odd.\n{options}"),
            T("{number}: even or odd?\n{options}"),
            T("Classify the parity of {number}.\n{options}"),
            T("Question: what is the parity of the number {number}?\n{options}"),
            T("Is the integer {number} divisible by two (even) or not (odd)?\n{options}"),
            # held out
            T("Say whether {number} is an even number or an odd number.\n{options}"),
            T("Number: {number}\nParity?\n{options}"),
        ],
        train_formats=["zero_shot_options", "zero_shot", "few_shot_options"],
        eval_format="zero_shot_options",
    ),
    Family(
        name="sentiment",
        generate=_sentiment,
        templates=[
            T("Review: {review}\nIs this review positive or negative?\n{options}"),
            T("What is the sentiment of the following review?\n{review}\n{options}"),
            T("{review}\nDid the writer like it?\n{options}"),
            T("Classify the sentiment: \"{review}\"\n{options}"),
            T("Read this review and tell me if it is positive or negative. {review}\n{options}"),
            T("Sentiment analysis.\nText: {review}\n{options}"),
            # held out
            T("\"{review}\" How does the reviewer feel?\n{options}"),
            T("Is the tone of this text positive or negative? {review}\n{options}"),
        ],
        train_formats=["zero_shot_options", "zero_shot", "few_shot_options"],
        eval_format="zero_shot_options",
    ),
    Family(
        name="category",
        generate=_category,
        templates=[
            T("Which of these is a {category}: {words}?\n{options}"),
            T("From the list {words}, pick the {category}.\n{options}"),
            T("Words: {words}. Which word names a {category}?\n{options}"),
            T("Find the {category} among {words}.\n{options}"),
            T("Question: {words}. One of them is a {category}. Which one?\n{options}"),
            T("Choose the word that is a {category}: {words}\n{options}"),
            # held out
            T("Here are three words: {words}. Which is a kind of {category}?\n{options}"),
            T("Select the {category} from: {words}\n{options}"),
        ],
        train_formats=["zero_shot_options", "zero_shot", "few_shot_options"],
        eval_format="zero_shot_options",
    ),
    Family(
        name="list_reverse",
        generate=_list_reverse,
        templates=[
            T("Reverse the order of this list: {items}"),
            T("Write the list backwards: {items}"),
            T("List: {items}\nGive the items in reverse order."),
            T("Put these words in the opposite order: {items}"),
            T("Reverse: {items}"),
            T("Take the list {items} and reverse it."),
            # held out
            T("Starting from the last item, rewrite this list: {items}"),
            T("Invert the order of the items {items}."),
        ],
        train_formats=["zero_shot", "few_shot"],
        eval_format="zero_shot",
    ),
]
FAMILIES_BY_NAME = {f.name: f for f in FAMILIES}


# ---------------------------------------------------------------- rendering

@cache.in_process
def raw_examples(family: str, split: str) -> tuple[dict, ...]:
  """Structured examples of one split; eval splits share nothing with train."""
  fam = FAMILIES_BY_NAME[family]
  rng = random.Random(f"{family}/{split}/{SPLIT_SEEDS[split]}")
  seen = set()
  if split != "train":
    seen = {fam.key(ex) for ex in raw_examples(family, "train")}
    for other in SPLIT_SIZES:  # eval splits are disjoint from each other too
      if other not in ("train", split) and SPLIT_SEEDS[other] < SPLIT_SEEDS[split]:
        seen |= {fam.key(ex) for ex in raw_examples(family, other)}
  out = []
  attempts = 0
  while len(out) < SPLIT_SIZES[split]:
    attempts += 1
    if attempts > 100 * SPLIT_SIZES[split]:
      raise RuntimeError(f"builtin family {family}: cannot draw {SPLIT_SIZES[split]} "
                         f"unseen examples for split {split}")
    ex = fam.generate(rng)
    k = fam.key(ex)
    if split != "train" and k in seen:
      continue
    seen.add(k)
    out.append(ex)
  return tuple(out)


def split_mode(split: str, mode: str | None = None) -> str:
  """The template mode of a split: `mode` if given, else gin's (template_mode: the
  training mode for train, the evaluation mode for the others)."""
  if mode is not None:
    return tmpl.check_mode(mode, "mode")
  train_mode, eval_mode = tmpl.template_mode()
  return train_mode if split == "train" else eval_mode


def rendered_examples(family: str, split: str, mode: str | None = None) -> tuple[dict, ...]:
  """(inputs, targets, answer, template, format) records for a split, in a template mode
  (default: gin's for the split, see split_mode)."""
  return _rendered(family, split, split_mode(split, mode))


@cache.in_process
def _rendered(family: str, split: str, mode: str) -> tuple[dict, ...]:
  fam = FAMILIES_BY_NAME[family]
  examples = raw_examples(family, split)
  pool = raw_examples(family, "train")
  rng = random.Random(f"render/{family}/{split}")
  out = []
  for i, ex in enumerate(examples):
    if split == "train":
      t_idx = rng.randrange(len(fam.train_templates))
      template = fam.train_templates[t_idx]
      fmt = fam.train_formats[rng.randrange(len(fam.train_formats))]
    elif split == "validation":
      t_idx = i % len(fam.train_templates)
      template, fmt = fam.train_templates[t_idx], fam.eval_format
    else:
      t_idx = len(fam.train_templates) + i % NUM_HELDOUT_TEMPLATES
      template, fmt = fam.templates[t_idx], fam.eval_format
    exemplars = []
    if fmt.startswith("few_shot"):
      # Exemplars come from train and never include the example itself.
      while len(exemplars) < NUM_SHOTS:
        j = rng.randrange(len(pool))
        # Compared by content: a duplicate of the question is no exemplar either.
        if fam.key(pool[j]) != fam.key(ex) and pool[j] not in exemplars:
          exemplars.append(pool[j])
    inputs, targets = render(template, ex, fmt, exemplars,
                             options_layout=("dash", "letters", "inline")[i % 3], mode=mode,
                             task_name=TASK_PREFIX + family, fields=fam.fields)
    out.append(dict(inputs=inputs, targets=targets, answer=ex["answer"],
                    options=list(ex.get("options") or []), template=t_idx, format=fmt))
  return tuple(out)


def all_text(splits=("train",), mode: str | None = None) -> list[str]:
  """The rendered strings of the collection's `splits`: what the vocabulary is trained on.

  Training text only by default: a vocabulary fitted to the validation and
  held-out-template text would leak them into the model's tokenization. mode:
  the template mode (default gin's for each split), so its vocabulary is keyed
  by the text of that mode.
  """
  text = []
  for fam in FAMILIES:
    for split in splits:
      for r in rendered_examples(fam.name, split, mode):
        text.extend([r["inputs"], r["targets"]])
  return text
