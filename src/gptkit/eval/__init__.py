"""Evaluation: perplexity (with bits per byte) and zero-shot tasks scored as lm-evaluation-harness does.

`tasks` reads the task files, `scoring` computes batched log-likelihoods, `perplexity` the sliding
window, `run` evaluates checkpoints and keeps a run's results (eval.json, eval.png).
"""

from gptkit.eval.run import EvalSettings, Evaluator, evaluate_checkpoints
from gptkit.eval.tasks import KNOWN_TASKS

__all__ = ["KNOWN_TASKS", "EvalSettings", "Evaluator", "evaluate_checkpoints"]
