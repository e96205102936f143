"""Record sets: read and write jsonl / parquet files and ``datasets.save_to_disk`` folders.

A record set is a list of plain dicts (one per row). Files may be local or remote (any URI
that ``probe_dpo.storage`` takes). Preference pairs use TRL's column names (``PAIR_COLUMNS``,
plus an optional ``source``). Bad input raises ``UserError`` with one line naming the file and
the column / row / line at fault.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Sequence

from probe_dpo import storage
from probe_dpo.errors import UserError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
JSONL_SUFFIXES = (".jsonl", ".json-lines", ".jsonlines", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_records(uri: str, required: Sequence[str] = (), non_empty: Sequence[str] = (),
                 what: str = "data") -> list[dict]:
    """Read the records at ``uri`` and check them.

    ``uri`` is a ``.jsonl`` file (``.json`` may hold JSON lines or one array of objects), a
    ``.parquet`` file, a folder saved by ``datasets.Dataset.save_to_disk``, or a folder of
    jsonl/parquet shards (read in name order). ``required`` columns must exist; ``non_empty``
    columns must exist and hold no None / blank string / empty list (rows are numbered from 1).
    ``what`` says what the data is for, in messages ("preference pairs", "probe-train data").
    """
    uri = str(uri)
    lower = uri.lower().rstrip("/")
    if not storage.exists(uri):
        raise UserError(f"{what} {uri}: no such file or folder")
    if lower.endswith(JSONL_SUFFIXES):
        records = _read_json_lines(uri)
    elif lower.endswith(PARQUET_SUFFIXES):
        records = _read_parquet(uri)
    else:
        records = _read_folder(uri, what)
    if not records:
        raise UserError(f"{uri}: empty ({what} needs at least one record)")
    check_columns(records, required, non_empty, uri)
    return records


def check_columns(records: Sequence[dict], required: Sequence[str] = (), non_empty: Sequence[str] = (),
                  where: str = "data") -> None:
    """``UserError`` naming ``where`` if a column is missing, or a ``non_empty`` one is empty in a row."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    for column in (*required, *non_empty):
        if column not in columns:
            raise UserError(f"{where}: missing column '{column}' (has: {', '.join(columns) or 'none'})")
    for row, record in enumerate(records, start=1):
        for column in non_empty:
            value = record.get(column)
            if value is None or (isinstance(value, (str, list, dict)) and not
                                 (value.strip() if isinstance(value, str) else value)):
                raise UserError(f"{where}: row {row}: column '{column}' is empty")


def write_records(records: Sequence[dict], uri: str) -> None:
    """Write records as ``.jsonl`` or ``.parquet`` (by extension), atomically."""
    uri = str(uri)
    lower = uri.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(list(records)), buffer)
        storage.write_bytes(uri, buffer.getvalue())
    elif lower.endswith(JSONL_SUFFIXES):
        lines = [json.dumps(r, ensure_ascii=False, default=_plain) + "\n" for r in records]
        storage.write_text(uri, "".join(lines))
    else:
        raise UserError(f"{uri}: cannot write records here: use a .jsonl or .parquet name")


def check_labels(records: Sequence[dict], column: str = "label", what: str = "data", min_per_class: int = 2) -> None:
    """``UserError`` unless ``column`` is present in every record and holds at least two classes,
    each with at least ``min_per_class`` rows (one example of a class cannot be both fitted and
    checked: it is refused before any activation is extracted)."""
    if not records:
        raise UserError(f"{what}: no records")
    for row, record in enumerate(records, start=1):
        if record.get(column) is None:
            raise UserError(f"{what}: row {row}: no value in column '{column}'")
    counts: dict[Any, int] = {}
    for r in records:
        counts[_hashable(r[column])] = counts.get(_hashable(r[column]), 0) + 1
    classes = sorted(counts, key=repr)
    if len(classes) < 2:
        raise UserError(f"{what}: column '{column}' has a single class ({classes[0]}); a probe needs both")
    rare = [c for c in classes if counts[c] < min_per_class]
    if rare:
        raise UserError(f"{what}: column '{column}' has only {counts[rare[0]]} row(s) of class {rare[0]} "
                        f"(at least {min_per_class} per class are needed)")


def check_numeric(records: Sequence[dict], columns: Sequence[str], where: str, *, required: bool = True) -> None:
    """``UserError`` naming the row unless each of ``columns`` holds a finite number (JSON numbers,
    not strings; a missing or null value is an error only when ``required``)."""
    for row, record in enumerate(records, start=1):
        for column in columns:
            value = record.get(column)
            if value is None:
                if required:
                    raise UserError(f"{where}: row {row}: column '{column}' is empty (expected a number)")
                continue
            if finite_number(value) is None:
                raise UserError(f"{where}: row {row}: column '{column}' must be a finite number, got {value!r}")


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool or a string), else None."""
    import math

    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


SCORE_COLUMNS = ("score", "chosen_score", "rejected_score", "margin")


def check_pairs(records: Sequence[dict], where: str) -> None:
    """``UserError`` (one line naming ``where`` and the row) unless every record is a usable DPO pair:
    string ``prompt``/``chosen``/``rejected``, chosen and rejected different texts (an identical
    pair has no preference to learn: it is refused before any compute), score columns numeric."""
    for row, r in enumerate(records, start=1):
        for column in PAIR_COLUMNS:
            if not isinstance(r.get(column), str):
                raise UserError(f"{where}: row {row}: column '{column}' must be a string, "
                                f"got {type(r.get(column)).__name__}")
        if "source" in r and r["source"] is not None and not isinstance(r["source"], str):
            raise UserError(f"{where}: row {row}: column 'source' must be a string, got {type(r['source']).__name__}")
    same = [row for row, r in enumerate(records, start=1) if r["chosen"].strip() == r["rejected"].strip()]
    if same:
        raise UserError(f"{where}: row {same[0]}: chosen and rejected are the same text ({len(same)} such "
                        f"row(s) of {len(records)}): a preference pair needs two different responses")
    present = [c for c in SCORE_COLUMNS if any(c in r for r in records)]
    check_numeric(records, present, where, required=False)


def json_digest(obj: Any) -> str:
    """First 16 hex chars of the sha256 of ``obj`` as JSON with sorted keys: the cache keys and
    fingerprints of settings (values JSON cannot write are hashed by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_hash(records: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """First 16 hex chars of the sha256 of a canonical JSON of the records (order matters).

    With ``columns`` only those are hashed (missing ones as null). Used as the data hash on
    probe cards: equal records give equal hashes whatever file format they came from.
    """
    rows = [r if columns is None else {c: r.get(c) for c in columns} for r in records]
    text = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and dates (what parquet and datasets hand back)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")



def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=_plain) if isinstance(value, (list, dict)) else value


def _read_json_lines(uri: str) -> list[dict]:
    text = storage.read_text(uri)
    if uri.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{uri}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        for i, record in enumerate(records, start=1):
            if not isinstance(record, dict):
                raise UserError(f"{uri}: item {i}: expected a JSON object, got {type(record).__name__}")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{uri}: line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{uri}: line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _read_parquet(uri: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    try:
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{uri}: not a readable parquet file ({exc})") from None


def _read_folder(uri: str, what: str) -> list[dict]:
    """A ``save_to_disk`` folder (its arrow stream files, read with pyarrow) or a folder of shards."""
    import pyarrow as pa

    names = storage.list_dir(uri)
    if "state.json" in names:
        state = storage.read_json(storage.join(uri, "state.json"))
        files = [f["filename"] for f in state.get("_data_files", [])] if isinstance(state, dict) else []
        records: list[dict] = []
        for name in files:
            try:
                table = pa.ipc.open_stream(pa.BufferReader(storage.read_bytes(storage.join(uri, name)))).read_all()
            except (pa.ArrowException, OSError) as exc:
                raise UserError(f"{storage.join(uri, name)}: not a readable arrow file ({exc})") from None
            records.extend(table.to_pylist())
        return records
    if "dataset_dict.json" in names:
        splits = storage.read_json(storage.join(uri, "dataset_dict.json")).get("splits", [])
        raise UserError(f"{uri}: a DatasetDict with splits {', '.join(splits)}; point at one split folder, "
                        f"e.g. {storage.join(uri, splits[0] if splits else 'train')}")
    shards = [n for n in names if n.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)]
    if not shards:
        kind = "folder" if names else "file"
        raise UserError(f"{what} {uri}: unsupported {kind}: expected .jsonl, .parquet, a folder of "
                        "them, or a datasets.save_to_disk folder")
    records = []
    for name in shards:
        shard = storage.join(uri, name)
        records.extend(_read_parquet(shard) if name.lower().endswith(PARQUET_SUFFIXES) else _read_json_lines(shard))
    return records
