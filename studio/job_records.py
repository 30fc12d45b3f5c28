"""The job records on disk, the truth about every job: what it is, where it stands, where it runs.

One JSON file per job in its owner's workspace (`workspaces/<id>/jobs/<job>/job.json`) and, for the data folder,
the service file (`jobs-service.json`) saying which backend serves its jobs. The job service (`studio.jobs`)
writes them; anything may read them without a server, as `blockstudio jobs` does (this module imports no model
code, so the listing is quick).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from studio.workspace import is_workspace_id, workspace_id_like, workspaces_root

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running", "cancelling")
RESUMABLE = ("cancelled", "failed", "interrupted")
STATUSES = ACTIVE + RESUMABLE + ("done", "discarded")
SERVICE_FILE = "jobs-service.json"


@dataclass
class JobRecord:
    id: str
    owner: str
    method: str
    model: str
    name: str  # the package it writes: <workspace>/packages/<name>
    settings: dict[str, Any]
    status: str = "queued"
    step: int = 0
    total: int = 0
    losses: list[float] = field(default_factory=list)
    it_s: float | None = None
    eta_s: float | None = None
    samples: list[str] = field(default_factory=list)  # file names under jobs/<id>/samples/
    checkpoint_step: int | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    resumed_from: int | None = None
    runs: int = 0
    restart: bool = False  # the next run starts over: its checkpoint could not be read back
    kind: str = "training"  # or "lab": an adapter-lab experiment (method names the lab method)
    fraction: float = 0.0  # lab jobs: how far the run is, 0..1
    message: str = ""  # lab jobs: what the run is doing now
    elapsed_s: float | None = None  # lab jobs: seconds since the run started
    result: str | None = None  # lab jobs: the result folder under the job's folder, once done
    paused_at: int | None = None  # trained in chunks (ZeroGPU): the step its last chunk stopped at
    queued_at: float | None = None  # when it last joined the queue: the queue's order, on disk
    worker: dict[str, Any] | None = None  # where its last run ran: {"backend", "node", "pid", ...}

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """The record as a page may show it: without the owner, whose workspace id is a secret, and without the
        machine it runs on."""
        data = self.to_dict()
        del data["owner"], data["worker"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_records(home: Path, *, signed: bool = True) -> list[JobRecord]:
    """Every job record under the data folder `home`, oldest first; unreadable or misplaced ones are skipped.

    With `signed`, only records of workspaces this data folder issued (the server); without, any well-formed
    workspace id (an operator's listing, which must not create the signing key as a side effect).
    """
    root = workspaces_root(home)
    found = []
    for path in root.glob("*/jobs/*/job.json") if root.is_dir() else []:
        try:
            record = JobRecord.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            log.warning("skipping unreadable job record %s", path)
            continue
        if record.id != path.parent.name or record.owner != path.parent.parent.parent.name:
            continue
        if not (is_workspace_id(record.owner, home) if signed else workspace_id_like(record.owner)):
            continue
        found.append(record)
    return sorted(found, key=lambda r: r.created)


def queue_order(records: list[JobRecord]) -> list[JobRecord]:
    """The queued records in the order they run: by when they last joined the queue."""
    return sorted((r for r in records if r.status == "queued"), key=lambda r: (r.queued_at or r.created, r.created))


def read_service(home: Path) -> dict[str, Any] | None:
    """The service file of a data folder (who serves its jobs) with its `state`: `serving`, `stopped`, or `gone`
    (a server of this machine whose process ended without stopping); None when there is none."""
    try:
        data = json.loads((home / SERVICE_FILE).read_text())
    except (OSError, ValueError):
        return None
    kinds = {"backend": str, "slots": int, "workers": int, "gpus": int, "pid": int, "host": str,
             "updated": (int, float)}
    if not isinstance(data, dict) or not all(isinstance(data.get(k), t) for k, t in kinds.items()):
        return None
    state = "stopped" if data.get("stopped") else "serving"
    if state == "serving" and data["host"] == socket.gethostname() and not _process_alive(data["pid"]):
        state = "gone"
    return {**data, "state": state}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def operator_listing(home: Path, *, everything: bool = False) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """What `blockstudio jobs` shows, from the data folder alone: the service file, then the jobs running, the
    jobs waiting in queue order (`position` 1 is next) and the stopped ones, newest first (with `everything`,
    the finished and discarded ones too). Workspace ids are cut to their first characters: they are secrets."""
    records = read_records(home, signed=False)
    running = sorted((r for r in records if r.status in ("running", "cancelling")), key=lambda r: r.started or 0.0)
    waiting = queue_order(records)
    stopped = sorted((r for r in records if not r.active and (everything or r.resumable)), key=lambda r: r.created,
                     reverse=True)
    positions = {r.id: n for n, r in enumerate(waiting, 1)}
    rows = []
    for record in running + waiting + stopped:
        where = record.worker or {}
        worker = " ".join(str(part) for part in (where.get("node") or where.get("backend"),
                                                 f"pid {where['pid']}" if "pid" in where else None) if part)
        rows.append({"position": positions.get(record.id), "id": record.id, "status": record.status,
                     "kind": record.kind, "method": record.method, "model": record.model, "name": record.name,
                     "step": record.step, "total": record.total, "workspace": record.owner[:8] + "…",
                     "worker": worker or None, "created": record.created, "error": record.error})
    return read_service(home), rows
