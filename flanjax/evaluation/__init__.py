"""Evaluation: generated answers scored by each task's metrics, rank classification.

  examples.py   a task's split as examples; answer options parsed from prompts
  harness.py    examples -> generations -> postprocess + metric_fns, rank
                classification, the majority-answer baseline; evaluate_suite
  report.py     TaskResult, progress, console / markdown tables, TensorBoard scalars
  scoring.py    log-likelihood of continuations for every model kind
  evaluator.py  evaluation during and at the end of training (one path: evaluate_suite)
  run.py        gin's `evaluate` (python -m flanjax.evaluate)
  lm_eval_adapter.py   EleutherAI's lm-evaluation-harness over a flanjax checkpoint
"""
