"""The ensemble, from a runs file: one folder per layer, as in `orchestrator/`.

- `core/` (layer 1): the ensemble math (`math.py`), which rows choose and which report
  (`protocol.py`), stored and recomputed predictions, scoring, costs, distillation's
  figure, the evaluation library (`evaluation.evaluate(runs, EvaluateOptions)` -> `Report`)
  and the servable ensemble (`serve.py`).
- `views/` (layer 2): the report as tables, CSV, JSON and plots; MLflow logging.
- `evaluate.py`, `predict.py`: the command lines (`python -m ensemble.evaluate`, `python -m
  ensemble.predict`), thin over the library.
"""
