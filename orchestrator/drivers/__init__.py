"""Layer 4, job drivers: an ensemble job (ensemble_job.py) and a search (search_job.py,
search_choice.py, search_records.py); evaluation is the `ensemble` package's library."""
