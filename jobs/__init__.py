"""Entry points users run: `python jobs/train_ensemble.py`, or through `ray job submit`."""
