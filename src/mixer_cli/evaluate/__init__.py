"""Evaluation of trained models. The linear few-shot probe of Figures 2 and 4 is one evaluator
(fewshot.py: the maths, the ridge solver, FewShotEvaluator, and the training callback);
`mixer fewshot` wraps it in fewshot_command.py."""
