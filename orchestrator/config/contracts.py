"""What crosses a process boundary, typed: validated once where it is made, never turned
into a dict of string keys on the way.

- `JobContext`: a job driver's settings for every Tune trial it starts (an ensemble's
  members, or a search's bases), where its records go.
- `MemberWork`: one member for the process that trains it (a Ray Train worker or a Tune
  trial): its spec, its data and where it logs.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from orchestrator.base import storage
from orchestrator.config.schema import Data, ResolvedMember


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobContext(Contract):
    ensemble: str
    storage: str  # the job's storage root: a local folder or s3://
    data: Data
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    max_failures: int = 0
    members: dict[str, ResolvedMember] = {}  # by member key (an ensemble) or base name (a search)

    @property
    def member_dir(self) -> str:
        """<storage>/<ensemble>: the members' checkpoints, records and logs."""
        return storage.join(self.storage, self.ensemble)

    def record_uri(self, key: str) -> str:
        """A finished member's record (its `.failed` sibling for a failed one)."""
        return storage.join(self.member_dir, "members", f"{key}.json")

    def final_uri(self, key: str) -> str:
        """A finished member's stored weights and predictions: one copy, kept."""
        return storage.join(self.member_dir, "members", key)

    def training_uri(self, key: str) -> str:
        """A member's in-progress checkpoints (its trial's, or its Ray Train run's)."""
        return storage.join(self.member_dir, "train", key)

    def work(self, member: ResolvedMember, run_id: str | None, keep: bool = True) -> MemberWork:
        """`keep`: the member is kept (an ensemble's), its final files under `final_uri`; a
        search trial's stay with its Tune checkpoint."""
        return MemberWork(member=member, data=self.data, tracking_uri=self.tracking_uri, mlflow_run_id=run_id,
                          final_uri=self.final_uri(member.key) if keep else None)


class MemberWork(Contract):
    member: ResolvedMember
    data: Data
    tracking_uri: str = ""
    mlflow_run_id: str | None = None  # the member's MLflow run (rank 0 logs to it); None: not logged
    final_uri: str | None = None  # where its final predictions are written; None: in its final checkpoint
