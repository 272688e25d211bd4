"""Evaluation of frozen Mixers: the linear few-shot probe of the paper's Figures 2 and 4."""
