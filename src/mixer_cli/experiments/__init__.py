"""Experiments of the paper beyond the tables: the permutation study of Sec. 3.4 (Figure 4)."""
