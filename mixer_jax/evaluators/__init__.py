"""Evaluators, as big_vision's: one class per `type` of a `config.evals` entry ('classification' by default).

  Evaluator(predict_fn, mesh, *, variables_shardings, defaults, **fields)
    predict_fn(variables, images) -> (logits, out) runs the model in inference mode (`out` holds `pre_logits`);
    variables_shardings: the variables' NamedShardings (the train state's, or replicated);
    defaults: the run's `dataset`, `data_dir`, `batch_size` (global) and `loss`, for the fields an entry leaves
      out (each evaluator's docstring says which it takes);
    fields: the entry's own, less `type`.
  The constructor builds the evaluator's data streams and jitted step once, so a bad field fails before training.
  run(variables) yields (metric, value) pairs over one pass of its data; every process calls it and gets the
  same values. summary(metrics) is the text of the log line.

This package owns the evaluations. It must not train, checkpoint or write metrics: the caller names the metrics
`<entry name>/<metric>` and writes them.
"""
from mixer_jax.evaluators import classification, fewshot

EVALUATORS = {'classification': classification.Evaluator, 'fewshot': fewshot.Evaluator}


def from_config(evals, predict_fn, mesh, **context) -> dict:
  """{entry name: evaluator} of `config.evals`; a ValueError in an entry names it."""
  out = {}
  for name, cfg in evals.items():
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
    try:
      out[name] = EVALUATORS[cfg.pop('type', 'classification')](predict_fn, mesh, **context, **cfg)
    except ValueError as error:
      raise ValueError(f'config.evals.{name}: {error}') from None
  return out
