"""The built-in vocabulary is trained on training text only (no validation or held-out leak)."""

from flanjax.data.collections import builtin


def test_builtin_vocabulary_text_is_the_train_split_only():
  text = builtin.all_text()
  train = []
  for fam in builtin.FAMILIES:
    for r in builtin.rendered_examples(fam.name, "train"):
      train += [r["inputs"], r["targets"]]
  assert text == train
  held = {r["inputs"] for fam in builtin.FAMILIES
          for split in ("validation", "heldout_templates")
          for r in builtin.rendered_examples(fam.name, split)}
  # Held-out prompts (other templates, other examples) are not in what the vocabulary sees.
  assert len(held - set(text)) > 0.9 * len(held)
