"""``runs/<run_id>/``: the one module that reads and writes run files.

``run_request.json`` (what was asked), ``run_record.json`` (what happened, see
:class:`broker.core.runs.RunRecord`) and ``artifacts.json``. Every file is
written whole (temp file + fsync + rename) with mode 0600: a record holds its
run's lease id. The run manager owns the records of runs it drives; the CLI
and the engines only read, except for a blocked run that never reached a broker.
"""

from __future__ import annotations

import json
from pathlib import Path

from broker.core.runs import Artifact, RunRecord, RunRequest, check_run_id
from broker.disk.store import StateDir, atomic_write, read_json
from broker.errors import InvalidRequest

__all__ = ["RunRecords"]

RECORD_FILE = "run_record.json"
REQUEST_FILE = "run_request.json"
ARTIFACTS_FILE = "artifacts.json"


class RunRecords:
    """Run files under a state dir."""

    def __init__(self, state: StateDir):
        self.root = state.runs_dir

    def run_dir(self, run_id: str) -> Path:
        return self.root / check_run_id(run_id)

    def create(self, request: RunRequest, record: RunRecord) -> None:
        """A new run: its request, then its first record."""
        run_dir = self.run_dir(record.run_id)
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(run_dir / REQUEST_FILE, request.model_dump_json(indent=2).encode())
        self.save(record)

    def save(self, record: RunRecord) -> None:
        atomic_write(self.run_dir(record.run_id) / RECORD_FILE, record.model_dump_json(indent=2).encode())

    def load(self, run_id: str) -> RunRecord:
        path = self.run_dir(run_id) / RECORD_FILE
        try:
            return RunRecord.model_validate(read_json(path))
        except FileNotFoundError:
            raise InvalidRequest(f"unknown run id {run_id!r} (no record in {self.root})", "run_id") from None
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"the record of {run_id} is unreadable: {str(exc)[:200]}", "run_id") from None

    def load_all(self) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
        """Every readable record (oldest first) and the unreadable ones with why."""
        records: list[RunRecord] = []
        unreadable: list[tuple[Path, str]] = []
        if not self.root.is_dir():
            return records, unreadable
        for path in sorted(self.root.glob(f"run-*/{RECORD_FILE}")):
            try:
                records.append(RunRecord.model_validate(read_json(path)))
            except (OSError, ValueError) as exc:
                unreadable.append((path, str(exc)[:200]))
        records.sort(key=lambda record: record.created_at)
        return records, unreadable

    def write_artifacts(self, record: RunRecord, artifacts: list[Artifact]) -> None:
        body = {
            "run_id": record.run_id,
            "artifact_dir": record.artifact_dir,
            "artifacts": [artifact.model_dump() for artifact in artifacts],
        }
        atomic_write(self.run_dir(record.run_id) / ARTIFACTS_FILE, json.dumps(body, indent=2).encode())

    def read_artifacts(self, run_id: str) -> list[Artifact] | None:
        """The artifacts recorded when the run ended; None before that."""
        try:
            body = read_json(self.run_dir(run_id) / ARTIFACTS_FILE)
        except FileNotFoundError:
            return None
        items = body.get("artifacts", []) if isinstance(body, dict) else []
        return [Artifact.model_validate(item) for item in items]
