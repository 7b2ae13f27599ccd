"""The training loop's own state: a typed record saved as JSON (`state_json` in train_state.pt) in every checkpoint.

The JSON is the one facetrain has always written: the same keys in the same order (`json.dumps` of the fields), so
checkpoints written before this class existed load and resume, and checkpoints written now load in those versions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass
class LoopState:
    """Where the loop is and what it has seen; the data position follows from `step` (sampler.set_epoch)."""

    step: int = 0
    """Optimizer steps done (a skipped non-finite step counts)."""
    best_metric: float | None = None
    """The best train.val_metric so far (None before the first validation, or when it was not computable)."""
    best_step: int | None = None
    """The step whose weights <output_dir>/bundle holds (None before the first validation)."""
    untrained: dict | None = None
    """The validation metrics of the untrained model (measured once per run, before step 1)."""
    bad_steps: int = 0
    """Steps the NonFiniteGuard skipped so far (train.max_bad_steps stops the run)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoopState:
        """The state saved in a checkpoint. A key this version does not know (a newer facetrain's) is ignored; a
        missing one keeps its default (an older facetrain's)."""
        saved = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})
