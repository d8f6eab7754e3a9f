"""Layer 1, the Ray-free core: runs.yaml, the contract between training and evaluation
(runs_file.py), a member's record made in one place (member.py), and the runs file of a
finished job (from_job.py)."""
