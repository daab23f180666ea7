"""``groups/<ref>.json``: the one module that reads and writes group-lease records.

Each record is written whole (temp file + fsync + rename) with mode 0600: it
holds the group's lease id and its entries' lease ids, which are capabilities.
A record that does not parse is moved to ``corrupt/`` (never a crash loop).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from broker.core.groups import GroupRecord
from broker.disk.store import DIR_MODE, StateDir, atomic_write, read_json

__all__ = ["GroupRecords"]


class GroupRecords:
    def __init__(self, state: StateDir):
        self.root = state.root / "groups"
        self._corrupt = state.corrupt_dir

    def path(self, ref: str) -> Path:
        return self.root / f"{ref}.json"

    def save(self, record: GroupRecord) -> None:
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        atomic_write(self.path(record.ref), record.model_dump_json().encode())

    def remove(self, ref: str) -> None:
        """Delete a record (an ended group past its retention); gone already is fine."""
        self.path(ref).unlink(missing_ok=True)

    def load_all(self) -> tuple[list[GroupRecord], list[tuple[Path, str]]]:
        """Every record, and the corrupt ones moved aside (where to, why)."""
        records: list[GroupRecord] = []
        corrupt: list[tuple[Path, str]] = []
        try:
            names = sorted(entry.name for entry in os.scandir(self.root) if entry.name.endswith(".json"))
        except FileNotFoundError:
            return records, corrupt
        for name in names:
            path = self.root / name
            try:
                records.append(GroupRecord.model_validate(read_json(path)))
            except (OSError, ValueError) as exc:
                self._corrupt.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                moved = self._corrupt / f"group.{name}.{int(time.time())}"
                try:
                    path.replace(moved)
                except OSError:
                    moved = path
                corrupt.append((moved, str(exc)[:200]))
        return records, corrupt
