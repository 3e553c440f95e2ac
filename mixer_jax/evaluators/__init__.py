"""Evaluators run on a trained model: `fewshot` (big_vision's closed-form ridge-regression linear probe)."""
