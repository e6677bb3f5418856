"""Evaluation: one registry (registry.py) of every evaluation, built from the
resolved spec and used alike by training, eval_main and analyze.

  core.py         batches of a split, stopping, float64 sums, router logits
  accuracy.py     accuracy and routing consistency across views (standard)
  stability.py    top-1 flip rates under pixel noise and shifts
  fewshot.py      linear few-shot accuracy of the pre-logits
  corruptions.py  the corruption suite (after ImageNet-C)
  attacks.py      PGD and the routing attack
  serving.py      the 'cheap' suite: K and capacity factor at serving time
  robustness.py   config.evaluate.robustness (which suites, on what)
  figures.py      routing maps and the analysis plots
"""
