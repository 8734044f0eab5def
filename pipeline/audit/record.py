"""audit.json, the audit's contract: its file name, format version, writing and reading.

`make audit` writes it; EXCLUDE and `make review` read it back; nothing else opens the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

AUDIT_FILE = "audit.json"
FORMAT_VERSION = 1


def write_record(folder: Path, record: Mapping[str, Any]) -> Path:
    """Writes `record` as `folder/audit.json` and returns its path."""
    path = Path(folder) / AUDIT_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_record(path: Path) -> dict[str, Any]:
    """The audit.json at `path` (or in the folder `path`), checked to be one this version writes."""
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_FILE
    try:
        record = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(
            f"Expected an audit.json of `make audit` (EXCLUDE, AUDIT_DIR). Received: {str(path)!r} ({err.strerror}). "
            "Run `make audit` with the same feature variables first."
        ) from None
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); rerun `make audit`.") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION or "findings" not in record:
        raise ConfigError(
            f"Expected an audit.json of format {FORMAT_VERSION} written by `make audit`. "
            f"Received: {path}. Rerun `make audit`."
        )
    return record


def excluded_ids(findings: Sequence[Mapping[str, Any]], clusters: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Train ids each excludable kind would leave out of training (see `load_exclusion`)."""
    out = {"duplicates": sorted({i for c in clusters for i in c["exclude"]})}
    for kind in ("label", "outlier"):
        out[kind] = sorted({i for f in findings if f["kind"] == kind for i in f.get("exclude", [])})
    return out
