"""Layer 3, members on Ray. One trainable, three hosts, two Tune trainables:

- `member_worker.run_member(work, session)`: what a member's training process does
  (resume, `train.member.train_member`, checkpoint, keep its final predictions), whoever
  hosts it; the host is a `Session`.
- Hosts: `in_trial.run_here` (a single-worker member in its Tune trial's process, with
  retries), `ray_train.train_loop_per_worker` (each Ray Train worker of a data-parallel
  member), `search_trial.SearchTrialSession` (a search trial, reporting to ASHA or PBT).
- Tune trainables: `launch.member_trial` (an ensemble's member: trains it on a host,
  finalises, records it) and `search_trial.search_trial` (one sampled trial of a search).
"""
