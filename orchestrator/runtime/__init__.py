"""Layer 3, members on Ray: the Tune layer (launch.py) and the processes that train a
member or a search trial (member_worker.py hosted by in_trial.py or ray_train.py;
search_trial.py)."""
