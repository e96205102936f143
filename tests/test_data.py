"""data: record sets in jsonl / parquet / save_to_disk folders, locally and on S3, and bad input."""

from __future__ import annotations

import pytest

from probe_dpo import data, storage
from probe_dpo.errors import UserError

PAIRS = [
    {"prompt": "Say hi", "chosen": "Hi there!", "rejected": "Go away.", "source": "a"},
    {"prompt": "Ünïcödé ✓", "chosen": "ok", "rejected": "no", "source": "b"},
    {"prompt": "p3", "chosen": "c3", "rejected": "r3", "source": "a"},
]


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.parquet"])
def test_round_trip(storage_root, name):
    uri = storage.join(storage_root, "sub", name)
    data.write_records(PAIRS, uri)
    back = data.read_records(uri, required=data.PAIR_COLUMNS, non_empty=data.PAIR_COLUMNS, what="pairs")
    assert back == PAIRS
    assert data.content_hash(back) == data.content_hash(PAIRS)


def test_save_to_disk_folder(tmp_path, storage_root):
    import datasets

    folder = tmp_path / "hf"
    datasets.Dataset.from_list(PAIRS * 2).select([0, 2, 4]).save_to_disk(str(folder))
    assert data.read_records(str(folder), required=data.PAIR_COLUMNS) == [PAIRS[0], PAIRS[2], PAIRS[1]]
    # the same folder on S3 (or copied locally) reads the same
    uri = storage.join(storage_root, "hf")
    for path in folder.iterdir():
        storage.write_bytes(storage.join(uri, path.name), path.read_bytes())
    assert data.read_records(uri) == [PAIRS[0], PAIRS[2], PAIRS[1]]


def test_dataset_dict_folder_asks_for_a_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict with splits train; point at one split"):
        data.read_records(str(tmp_path / "dd"))
    assert data.read_records(str(tmp_path / "dd" / "train")) == PAIRS


def test_folder_of_shards_and_json_array(tmp_path):
    data.write_records(PAIRS[:1], str(tmp_path / "shards" / "part-0.jsonl"))
    data.write_records(PAIRS[1:], str(tmp_path / "shards" / "part-1.parquet"))
    assert data.read_records(str(tmp_path / "shards")) == PAIRS
    storage.write_json(str(tmp_path / "arr.json"), PAIRS)
    assert data.read_records(str(tmp_path / "arr.json")) == PAIRS


def _raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        data.read_records(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_path(storage_root):
    uri = storage.join(storage_root, "nope.jsonl")
    assert _raises("no such file", uri, what="preference pairs") == f"preference pairs {uri}: no such file or folder"


def test_missing_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data.write_records([{"prompt": "p", "chosen": "c"}], "pairs.jsonl")
    assert _raises("missing column", "pairs.jsonl", required=data.PAIR_COLUMNS) == \
        "pairs.jsonl: missing column 'rejected' (has: prompt, chosen)"


def test_empty_file(storage_root):
    uri = storage.join(storage_root, "empty.jsonl")
    storage.write_text(uri, "\n\n")
    assert _raises("empty", uri, what="preference pairs") == f"{uri}: empty (preference pairs needs at least one record)"


@pytest.mark.parametrize("bad", [None, "", "   ", []])
def test_empty_value_names_row_and_column(tmp_path, bad):
    uri = str(tmp_path / "pairs.parquet" if bad is None else tmp_path / "pairs.jsonl")
    records = [dict(PAIRS[0]), dict(PAIRS[1], chosen=bad), dict(PAIRS[2])]
    data.write_records(records, uri)
    assert _raises("is empty", uri, non_empty=data.PAIR_COLUMNS) == f"{uri}: row 2: column 'chosen' is empty"
    data.read_records(uri, required=data.PAIR_COLUMNS)  # present but empty is fine unless non_empty


def test_malformed_jsonl_names_line(storage_root):
    uri = storage.join(storage_root, "bad.jsonl")
    storage.write_text(uri, '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    assert _raises(r"line 3: not valid JSON", uri).startswith(f"{uri}: line 3: not valid JSON")
    storage.write_text(uri, '{"prompt": "a"}\n[1, 2]\n')
    assert _raises("expected a JSON object", uri) == f"{uri}: line 2: expected a JSON object, got list"


def test_corrupt_parquet_and_unknown_format(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    _raises(rf"{tmp_path}/x.parquet: not a readable parquet file", str(tmp_path / "x.parquet"))
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    assert data.read_records(str(tmp_path / "x.csv")) == [{"a": 1, "b": 2}]  # csv: through datasets
    (tmp_path / "x.txt").write_text("a,b\n1,2\n")
    _raises(r"x.txt: unsupported file: expected .jsonl, .parquet, .csv", str(tmp_path / "x.txt"))
    with pytest.raises(UserError, match=r"out.csv: cannot write records here"):
        data.write_records(PAIRS, str(tmp_path / "out.csv"))


def test_check_labels():
    data.check_labels([{"label": 0}, {"label": 0}, {"label": 1}, {"label": 1}])
    with pytest.raises(UserError) as info:  # a class with one row: refused before any extraction
        data.check_labels([{"label": 0}, {"label": 1}, {"label": 1}], what="probe-train.jsonl")
    assert str(info.value) == ("probe-train.jsonl: column 'label' has only 1 row(s) of class 0 "
                               "(at least 2 per class are needed)")
    with pytest.raises(UserError) as info:
        data.check_labels([{"label": 0}, {"label": 0}], what="probe-train.jsonl")
    assert str(info.value) == "probe-train.jsonl: column 'label' has a single class (0); a probe needs both"
    with pytest.raises(UserError, match="probe-train.jsonl: no records"):
        data.check_labels([], what="probe-train.jsonl")
    with pytest.raises(UserError, match=r"t.jsonl: row 2: no value in column 'y'"):
        data.check_labels([{"y": 1}, {"x": 0}], column="y", what="t.jsonl")


def test_content_hash():
    h = data.content_hash(PAIRS)
    assert len(h) == 16 and int(h, 16) >= 0
    assert data.content_hash([dict(reversed(list(r.items()))) for r in PAIRS]) == h  # key order ignored
    assert data.content_hash(PAIRS[::-1]) != h  # record order matters
    assert data.content_hash(PAIRS, columns=data.PAIR_COLUMNS) != h
    assert data.content_hash(PAIRS, columns=data.PAIR_COLUMNS) == data.content_hash(
        [{k: r[k] for k in data.PAIR_COLUMNS} for r in PAIRS])
    import numpy as np

    assert data.content_hash([{"x": np.int64(3), "v": np.array([1.5])}]) == data.content_hash([{"x": 3, "v": [1.5]}])


def test_check_numeric_and_pairs():
    data.check_numeric([{"score": 0.5}, {"score": 1}], ["score"], "s.jsonl")
    for bad in ("0.5", "high", True, float("nan"), [1]):
        with pytest.raises(UserError) as info:
            data.check_numeric([{"score": 0.1}, {"score": bad}], ["score"], "s.jsonl")
        assert str(info.value) == f"s.jsonl: row 2: column 'score' must be a finite number, got {bad!r}"
    with pytest.raises(UserError, match=r"s.jsonl: row 1: column 'score' is empty"):
        data.check_numeric([{"score": None}], ["score"], "s.jsonl")
    data.check_numeric([{"score": None}], ["score"], "s.jsonl", required=False)

    data.check_pairs(PAIRS, "p.jsonl")
    same = [dict(PAIRS[0]), {**PAIRS[1], "rejected": PAIRS[1]["chosen"] + "  "}, {**PAIRS[0], "rejected": PAIRS[0]["chosen"]}]
    with pytest.raises(UserError) as info:
        data.check_pairs(same, "p.jsonl")
    assert str(info.value) == ("p.jsonl: row 2: chosen and rejected are the same text (2 such row(s) of 3): "
                               "a preference pair needs two different responses")
    with pytest.raises(UserError, match=r"p.jsonl: row 1: column 'chosen_score' must be a finite number, got 'x'"):
        data.check_pairs([{**PAIRS[0], "chosen_score": "x"}], "p.jsonl")
    with pytest.raises(UserError, match=r"p.jsonl: row 1: column 'rejected' must be a string or a list of {role, content} messages, got int"):
        data.check_pairs([{**PAIRS[0], "rejected": 3}], "p.jsonl")
