"""Evaluators that run a model: the linear few-shot probe of Figures 2 and 4 (fewshot.py: the maths,
the ridge solver, FewShotEvaluator and its training callback), ReaL labels (real_labels.py) and the
VTAB-1k tasks and scores (vtab.py). The commands `mixer eval`, `mixer fewshot` and the VTAB suite of
`mixer finetune` use them (commands/)."""
