"""Evaluation of trained models: `mixer eval` (checkpoint_eval.py, with ReaL labels in real_labels.py),
VTAB-1k (vtab.py), `mixer report` (report.py), and the linear few-shot probe of Figures 2 and 4 as
one evaluator (fewshot.py: the maths, the ridge solver, FewShotEvaluator and the training callback)
that `mixer fewshot` wraps (fewshot_command.py)."""
