"""Fallbacks that hid real problems: only the condition they stand for takes them.

* tfds_tasks.load: TFDS's "not prepared" assertion is a one-line error naming
  the fix; any other AssertionError of TFDS surfaces as it is.
* GSM8K's numbers: a comma is a thousands separator only between groups of
  three digits ("1,234" is 1234, "3,4" is two numbers); the answer is the
  last number.
"""

import json
import re

import gin
import pytest

from conftest import shared_data
from flanjax.data.collections import gsm8k
from flanjax.errors import UserError

# ------------------------------------------------------------------ TFDS


@pytest.fixture
def tfds_mod():
  return pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def tfds_tasks(tfds_mod):
  from flanjax.data.collections import tfds_tasks as mod
  return mod


@pytest.fixture
def empty_data_dir(tmp_path):
  gin.bind_parameter("tfds_data_dir.path", str(tmp_path))
  try:
    yield str(tmp_path)
  finally:
    gin.bind_parameter("tfds_data_dir.path", None)


def _source(tfds_tasks, task):
  return {s.task: s for s in tfds_tasks.SOURCES}[task]


def test_a_dataset_not_prepared_is_the_one_line_error(tfds_tasks, empty_data_dir):
  with pytest.raises(UserError) as e:
    tfds_tasks.load(_source(tfds_tasks, "tfds_rte"), "train")
  msg = str(e.value)
  assert "\n" not in msg and "glue/rte is not prepared in" in msg and empty_data_dir in msg


@pytest.mark.parametrize("message", [
    "Dataset glue cannot be loaded at version 9.9.9, only: 2.0.0.",
    "Info should not been called before version has been defined.",
])
def test_any_other_tfds_assertion_surfaces_as_it_is(tfds_mod, tfds_tasks, message):
  def broken(self, split, decoders=None, read_config=None, **kwargs):
    raise AssertionError(message)
  with tfds_mod.testing.mock_data(as_dataset_fn=broken):
    with pytest.raises(AssertionError) as e:
      tfds_tasks.load(_source(tfds_tasks, "tfds_snli"), "train")
  assert not isinstance(e.value, UserError) and str(e.value) == message


# ------------------------------------------------------------------ GSM8K numbers

@pytest.mark.parametrize("text,number", [
    ("1,234", "1234"),
    ("3,4", "4"),  # two numbers, 3 and 4: the last one
    ("the numbers 3,4 and 5", "5"),
    ("12,34", "34"),
    ("1,2345", "2345"),  # not a thousands group: 1 and 2345
    ("$1,200.00", "1200"),
    ("-1,000", "-1000"),
    ("1,234,567.50", "1234567.5"),
    ("it is 1,234, not 5,678.", "5678"),
    ("So the answer is 3,000.", "3000"),
    ("answer: 1234", "1234"),
    ("no number", ""),
])
def test_normalize_number(text, number):
  assert gsm8k.normalize_number(text) == number


def test_final_number_of_lists_and_separators():
  assert gsm8k.final_number("I tried 3,4 then 5. So the answer is 3,4.") == "4"
  assert gsm8k.final_number("She pays $1,250 a month. So the answer is 1,250.") == "1250"
  assert gsm8k.final_number("#### 2,125") == "2125"
  # The answer's own sentence, not a number said after it.
  assert gsm8k.final_number("So the answer is 18. That is 2 more than 16.") == "18"
  assert gsm8k.final_number("So the answer is 45 (i.e. 3 dozen).") == "45"
  assert gsm8k.final_number("So the answer is 12. I double-checked with 5 steps.") == "12"
  assert gsm8k.final_number("So the answer is $1,200.50.\n\nQ: 7 apples") == "1200.5"
  assert gsm8k.final_number("So the answer is: eighteen. Or 18 in digits.") == "18"


THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


@pytest.fixture(scope="module")
def gsm8k_records():
  path = shared_data("gsm8k")
  recs = []
  for split in ("train", "test"):
    with open(path / f"{split}.jsonl", encoding="utf-8") as f:
      recs += [json.loads(line) for line in f]
  return recs


def test_real_answers_with_thousands_separators(gsm8k_records):
  """Every GSM8K reference answer (8,792 of them; 93 written as 1,080 or 109,200,000) gives
  its number; and a model output that writes it with separators gives the same."""
  with_commas = 0
  for r in gsm8k_records:
    tail = r["answer"].split("####")[-1].strip()
    if "," in tail:
      assert THOUSANDS.fullmatch(tail), tail  # the data groups by three
      with_commas += 1
    gold = tail.replace(",", "")
    assert gsm8k.final_number(r["answer"]) == gold
    assert gsm8k.parse(r)["answer"] == gold
    if re.fullmatch(r"-?\d+", gold):
      spelled = f"{int(gold):,}"
      out = f"{gsm8k.parse(r)['rationale']} So the answer is {spelled}."
      assert gsm8k.final_number(out) == gold, (out, gold)
      assert gsm8k.final_number(f"{r['question']} The answer: {spelled}") == gold
  assert with_commas >= 90


def test_real_rationale_with_a_comma_that_is_not_a_separator(gsm8k_records):
  """The test set's '$100,00' (a typo for $100,000) is not read as 10000."""
  hits = [r for r in gsm8k_records if "$100,00 " in r["answer"]]
  assert hits, "the record with '$100,00' is not in this copy of GSM8K"
  text = hits[0]["answer"].split("$100,00 ")[0] + "$100,00 "
  assert gsm8k.final_number(text) == "00"
