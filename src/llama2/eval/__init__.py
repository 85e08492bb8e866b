"""Evaluation: text measures computed from answers (ROUGE-L, distinct-n, degenerate output)."""
