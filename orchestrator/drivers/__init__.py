"""Layer 4, job drivers and evaluation: an ensemble job (ensemble_job.py) and a search
(search_job.py, search_choice.py, search_records.py); evaluation is the `ensemble` package."""
