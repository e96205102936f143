"""Record sets: the one reader of every data input (``read_records``) and the writer.

A record set is a list of plain dicts (one per row). ``read_records`` takes local jsonl /
parquet / csv files and folders of them, ``datasets.save_to_disk`` folders
(``datasets.load_from_disk``), files on S3 or any URI ``probe_dpo.storage`` takes (read with
``datasets.load_dataset`` and the ``storage_options`` of this process's S3 settings), and
Hugging Face dataset ids (``org/name`` or ``org/name:split``, through ``load_dataset`` and its
cache; offline mode honoured). Preference pairs use TRL's column names (``PAIR_COLUMNS``, plus
an optional ``source``) in TRL's standard format (strings) or conversational format (lists of
``{"role", "content"}`` messages; an implicit prompt is split off as TRL does). Bad input
raises ``UserError`` with one line naming the file and the column / row / line at fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from typing import Any, Sequence

from probe_dpo import storage
from probe_dpo.errors import UserError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
JSONL_SUFFIXES = (".jsonl", ".json-lines", ".jsonlines", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")


def read_records(uri: str, required: Sequence[str] = (), non_empty: Sequence[str] = (),
                 what: str = "data") -> list[dict]:
    """Read the records at ``uri`` and check them.

    ``uri`` is a ``.jsonl`` file (``.json`` may hold JSON lines or one array of objects), a
    ``.parquet`` or ``.csv`` file, a folder saved by ``datasets.Dataset.save_to_disk``, a folder of
    jsonl/parquet/csv shards (read in name order), any of them on S3, or a Hugging Face dataset id
    (``org/name``, ``org/name:split``; default split ``train``). ``required`` columns must exist;
    ``non_empty`` columns must exist and hold no None / blank string / empty list (rows are
    numbered from 1). ``what`` says what the data is for, in messages ("preference pairs").
    """
    uri = str(uri)
    lower = uri.lower().rstrip("/")
    if is_hub_dataset(uri):
        records = _load_hub(uri, what)
    elif not storage.exists(uri):
        raise UserError(f"{what} {uri}: no such file or folder")
    elif lower.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES) and _plain_remote(uri):
        records = _load_files(uri, what)  # someone else's file on S3: datasets with storage_options
    elif lower.endswith(CSV_SUFFIXES):
        records = _load_files(uri, what)
    elif lower.endswith(JSONL_SUFFIXES):
        records = _read_json_lines(uri)
    elif lower.endswith(PARQUET_SUFFIXES):
        records = _read_parquet(uri)
    else:
        records = _read_folder(uri, what)
    if not records:
        raise UserError(f"{uri}: empty ({what} needs at least one record)")
    check_columns(records, required, non_empty, uri)
    return records


_HUB_DATASET = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.\[\]%:+-]+)?$")


def is_hub_dataset(uri: str) -> bool:
    """True for a Hugging Face dataset id (``org/name[:split]``, or with an ``hf:`` prefix) that is
    not a local path and has no file suffix."""
    if uri.startswith("hf:") and not uri.startswith("hf://"):
        return True
    name = uri.split(":", 1)[0]
    return (bool(_HUB_DATASET.match(uri)) and not os.path.exists(os.path.expanduser(name))
            and not name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES + (".arrow",)))


HUB_ID_FORMS = "Hugging Face dataset ids are org/name or org/name:split"


def _load_hub(uri: str, what: str) -> list[dict]:
    """A hub dataset through ``datasets.load_dataset`` (its cache; offline mode honoured).

    A string that is neither a path nor in the cache is often a mistyped relative path: it gets
    one line at once (``_not_on_hub``) instead of ``datasets``' retries against the Hub."""
    import datasets

    name = uri[3:] if uri.startswith("hf:") else uri
    name, _, split = name.partition(":")
    if not _hub_cached(name):
        why = _not_on_hub(name)
        if why is not None:
            raise UserError(f"{what} {uri}: no such file or folder{why}; {HUB_ID_FORMS}")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each is this one line
        raise UserError(f"{what} {uri}: no such file or folder, and cannot load Hugging Face dataset {name!r} "
                        f"(split {split or 'train'}): {_first_line(exc)}") from None
    return ds.to_list()


def _hub_offline() -> bool:
    """Hub access is off: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` now, or as ``datasets`` read them."""
    import datasets.config as dconfig

    on = ("1", "true", "yes", "on")
    return (os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in on
            or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in on or bool(dconfig.HF_HUB_OFFLINE))


def _hub_cached(name: str) -> bool:
    """``name`` has been loaded before: ``datasets``' cache (``org___name/<config>/<version>/<hash>``,
    what it reads offline) or the hub's download cache (``datasets--org--name``) holds it."""
    import glob

    import datasets.config as dconfig
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    built = os.path.join(os.path.expanduser(str(dconfig.HF_DATASETS_CACHE)), "___".join(parts), "*", "*", "*")
    downloaded = os.path.join(os.path.expanduser(str(constants.HF_HUB_CACHE)), "datasets--" + name.replace("/", "--"))
    return any(os.path.isdir(p) for p in glob.glob(built)) or os.path.isdir(downloaded)


def _not_on_hub(name: str) -> str | None:
    """Why an uncached ``name`` cannot be a hub dataset (the rest of the one-line message), or None
    when the Hub has it: a local folder holds its first part (a path, mistyped), the Hub is
    offline, or one request (no retries) says the Hub has no such dataset or cannot be reached."""
    head = name.split("/", 1)[0]
    if os.path.isdir(os.path.expanduser(head)):
        return f" ({head}/ is a folder here: a path, not a hub id)"
    if _hub_offline():
        return f", and no Hugging Face dataset {name!r} in the local cache (the Hub is offline)"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=10)
    except GatedRepoError:
        return None  # it exists; load_dataset says what access it needs
    except RepositoryNotFoundError:
        return f", and no Hugging Face dataset {name!r} on the Hub (or it is private: log in or set HF_TOKEN)"
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, a timeout: one line, no retries
        return f", and the Hugging Face Hub cannot be reached to look for dataset {name!r} ({type(exc).__name__})"
    return None


def _plain_remote(uri: str) -> bool:
    """A remote file that is not a member of an artifact this project published (those are read
    through ``probe_dpo.storage``, which resolves their current version and checks their hashes)."""
    return storage.is_remote(uri) and storage.resolve_member(uri)[2] is None


def _load_files(uri: str, what: str) -> list[dict]:
    """jsonl / parquet / csv through ``datasets.load_dataset`` (remote: with ``storage_options``)."""
    import datasets

    from probe_dpo.storage.backends import storage_options

    lower = uri.lower()
    builder = "csv" if lower.endswith(CSV_SUFFIXES) else "parquet" if lower.endswith(PARQUET_SUFFIXES) else "json"
    kwargs: dict[str, Any] = {"delimiter": "\t"} if lower.endswith(".tsv") else {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # no "Generating train split" bars: a read is one log line or none
    try:
        with _storage_online(uri):
            ds = datasets.load_dataset(builder, data_files=uri, split="train", storage_options=storage_options(uri),
                                       **kwargs)
    except Exception as exc:  # noqa: BLE001 - a parse or access error: one line naming the file
        if builder == "json":  # rows arrow cannot unify, or malformed: our reader names the line
            return _read_json_lines(uri)
        if builder == "parquet":
            return _read_parquet(uri)
        raise UserError(f"{what} {uri}: not readable as {builder} ({_first_line(exc)})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return ds.to_list()


@contextlib.contextmanager
def _storage_online(uri: str):
    """Let ``datasets`` reach the user's own object storage while the Hugging Face Hub stays offline.

    ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` mean "no Hub"; ``datasets`` (5.2) also refuses
    every fsspec URL under them ("Offline mode is enabled. Tried to reach s3://..."). For a
    non-Hub remote URI the flag is lifted for the one call (the Hub is not contacted: the data
    files are given, and the builder is a packaged one); Hub ids never go through here."""
    import datasets.config as dconfig

    saved = dconfig.HF_HUB_OFFLINE
    if storage.is_remote(uri) and not uri.startswith(("hf://", "hf:")):
        dconfig.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        dconfig.HF_HUB_OFFLINE = saved


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


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
        lines = [json.dumps(r, ensure_ascii=False, default=storage.json_default) + "\n" for r in records]
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


def is_messages(value: Any) -> bool:
    """True for TRL's conversational format: a non-empty list of ``{"role", "content"}`` dicts."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def message_text(value: Any) -> str:
    """The text of a string, or of a message list (its messages' contents, one per line): what a
    judge reads of a conversational completion."""
    if is_messages(value):
        return "\n".join(str(m.get("content") or "") for m in value)
    return "" if value is None else str(value)


def chat_value(value: Any) -> Any:
    """A prompt / completion / text as the extraction and generation code take it: a message list
    unchanged (rendered with the tokenizer's chat template there), anything else as a string."""
    return value if is_messages(value) else ("" if value is None else str(value))


def whole_text(record: dict) -> Any:
    """A record's whole text for ``span="all"``: ``text``, a conversation (``messages``), or
    ``prompt`` + ``completion`` (strings)."""
    if "text" in record:
        return chat_value(record["text"])
    if "messages" in record:
        return chat_value(record["messages"])
    return message_text(record.get("prompt")) + message_text(record.get("completion"))


def split_implicit_prompt(records: Sequence[dict]) -> list[dict]:
    """Pairs in TRL's implicit-prompt format (no ``prompt`` column; ``chosen`` / ``rejected`` are
    whole conversations) with the shared leading messages split off as the prompt, as TRL's
    ``extract_prompt`` does. Records that have a prompt are returned unchanged."""
    out = []
    for r in records:
        if "prompt" in r or not (is_messages(r.get("chosen")) and is_messages(r.get("rejected"))):
            out.append(r)
            continue
        chosen, rejected = r["chosen"], r["rejected"]
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        out.append({**r, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]})
    return out


def read_pair_records(uri: str, non_empty: Sequence[str] = PAIR_COLUMNS, what: str = "preference pairs") -> list[dict]:
    """Preference pairs in TRL's standard or conversational format (explicit or implicit prompt),
    checked with ``check_pairs`` before any compute."""
    records = split_implicit_prompt(read_records(uri, what=what))
    check_columns(records, PAIR_COLUMNS, non_empty, uri)
    check_pairs(records, uri)
    return records


def check_pairs(records: Sequence[dict], where: str) -> None:
    """``UserError`` (one line naming ``where`` and the row) unless every record is a usable DPO pair:
    ``prompt``/``chosen``/``rejected`` strings (TRL's standard format) or message lists (its
    conversational format), chosen and rejected different texts (an identical pair has no
    preference to learn: it is refused before any compute), score columns numeric."""
    for row, r in enumerate(records, start=1):
        for column in PAIR_COLUMNS:
            if not (isinstance(r.get(column), str) or is_messages(r.get(column))):
                raise UserError(f"{where}: row {row}: column '{column}' must be a string or a list of "
                                f"{{role, content}} messages, got {type(r.get(column)).__name__}")
        if "source" in r and r["source"] is not None and not isinstance(r["source"], str):
            raise UserError(f"{where}: row {row}: column 'source' must be a string, got {type(r['source']).__name__}")
    same = [row for row, r in enumerate(records, start=1)
            if message_text(r["chosen"]).strip() == message_text(r["rejected"]).strip()]
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
    text = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=storage.json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=storage.json_default) if isinstance(value, (list, dict)) else value


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


def _load_from_disk(uri: str) -> list[dict]:
    """A ``save_to_disk`` folder through ``datasets.load_from_disk`` (remote: ``storage_options``;
    an artifact this project published on S3: its current version's folder)."""
    import datasets

    from probe_dpo.storage.backends import storage_options

    where = uri
    if storage.is_remote(uri) and storage.is_complete(uri):
        files_at = storage.read_manifest(uri).get("files_at")
        where = storage.join(uri, files_at) if files_at else uri
    try:
        ds = datasets.load_from_disk(where, storage_options=storage_options(uri) or None)
    except Exception as exc:  # noqa: BLE001 - a damaged folder: one line naming it
        raise UserError(f"{uri}: not a readable datasets.save_to_disk folder ({_first_line(exc)})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{uri}: a DatasetDict with splits {', '.join(ds)}; point at one split folder")
    return ds.to_list()


def _read_folder(uri: str, what: str) -> list[dict]:
    """A ``save_to_disk`` folder or a folder of jsonl / parquet / csv shards."""

    names = storage.list_dir(uri)
    if "state.json" in names:
        return _load_from_disk(uri)
    if "dataset_dict.json" in names:
        splits = storage.read_json(storage.join(uri, "dataset_dict.json")).get("splits", [])
        raise UserError(f"{uri}: a DatasetDict with splits {', '.join(splits)}; point at one split folder, "
                        f"e.g. {storage.join(uri, splits[0] if splits else 'train')}")
    shards = [n for n in names if n.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES)]
    if not shards:
        kind = "folder" if names else "file"
        raise UserError(f"{what} {uri}: unsupported {kind}: expected .jsonl, .parquet, .csv, a folder of "
                        "them, a datasets.save_to_disk folder or a Hugging Face dataset id")
    records = []
    for name in shards:
        shard = storage.join(uri, name)
        lower = name.lower()
        records.extend(_load_files(shard, what) if lower.endswith(CSV_SUFFIXES) else
                       _read_parquet(shard) if lower.endswith(PARQUET_SUFFIXES) else _read_json_lines(shard))
    return records
