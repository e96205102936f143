"""The `activations` and `probes` commands: real runs on the tiny model, and one-line errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from test_probes import labelled_records

from probe_dpo import storage
from probe_dpo.cli import main
from probe_dpo.data import write_records

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    out = {}
    for split, (n, seed) in {"train": (40, 11), "val": (20, 12), "test": (20, 13)}.items():
        out[split] = str(root / f"{split}.jsonl")
        write_records(labelled_records(n, seed), out[split])
    rows = labelled_records(5, 14)
    out["empty"] = str(root / "empty.jsonl")
    storage.write_text(out["empty"], "")
    out["single"] = str(root / "single.jsonl")
    write_records([{**r, "label": 0} for r in rows], out["single"])
    out["nocompletion"] = str(root / "nocompletion.jsonl")
    write_records([{k: v for k, v in r.items() if k != "completion"} for r in rows], out["nocompletion"])
    out["nolabel"] = str(root / "nolabel.jsonl")
    write_records([{k: v for k, v in r.items() if k != "label"} for r in rows], out["nolabel"])
    return out


@pytest.mark.parametrize("argv", [["activations", "extract"], ["probes", "train"], ["probes", "eval"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("probe-dpo: error: ") and needle in err, err


def test_activations_extract_command(tiny_model_dir, files, ray_cluster, tmp_path, capsys):
    out = str(tmp_path / "acts")
    rc = main(["activations", "extract", "--model", str(tiny_model_dir), "--data", files["test"], "--out", out,
               "--layers", "0,-1", "--actors", "1", "--shard-size", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layers [0, 1] (mean over response)" in printed and "2 shards, 2 written" in printed
    from probe_dpo.activations import load_activations

    feats, meta = load_activations(out)
    assert feats[1].shape == (60, 64) and meta["n"] == 60 and torch.isfinite(feats[1]).all()
    assert meta["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")  # --dtype auto
    # the same command again: recognised as complete without starting actors
    t0 = time.perf_counter()
    assert main(["activations", "extract", "--model", str(tiny_model_dir), "--data", files["test"], "--out", out,
                 "--layers", "0,1", "--actors", "1", "--shard-size", "32"]) == 0
    assert "already complete: nothing to do" in capsys.readouterr().out and time.perf_counter() - t0 < 3


def test_probes_train_and_eval_commands(tiny_model_dir, files, tmp_path, capsys):
    out = str(tmp_path / "probes")
    rc = main(["probes", "train", "--model", str(tiny_model_dir), "--train", files["train"], "--val", files["val"],
               "--test", files["test"], "--out", out, "c_grid=[0.1,1.0]", "train_probe.kind=layers"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| train-L0 | train | 0 |" in printed and "| train-L1 | train | 1 |" in printed
    assert "prompt-genre indicator" in printed and "score_other_judge" in printed
    report = json.loads(storage.read_text(storage.join(out, "report.json")))
    assert report["train_ensemble"]["test"] > 0.8 and storage.exists(storage.join(out, "report.md"))

    result = str(tmp_path / "eval.json")
    rc = main(["probes", "eval", "--model", str(tiny_model_dir), "--probes", out, "--data", files["test"],
               "--out", result])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| train-L0 | train | 0 |" in printed
    saved = json.loads(storage.read_text(result))
    assert saved["probes"]["train-L1"]["auroc"] == pytest.approx(
        next(r["test_auroc"] for r in report["probes"] if r["name"] == "train-L1"), abs=1e-6)


def test_wrong_layer_is_one_line(tiny_model_dir, files, tmp_path, capsys):
    rc = main(["activations", "extract", "--model", str(tiny_model_dir), "--data", files["test"],
               "--out", str(tmp_path / "a"), "--layers", "0,7"])
    assert rc == 2
    _one_line_error(capsys, "layer 7 is out of range: the model has 2 layers")
    rc = main(["probes", "train", "--model", str(tiny_model_dir), "--train", files["train"], "--val", files["val"],
               "--out", str(tmp_path / "p"), "layers=[-3]"])
    assert rc == 2
    _one_line_error(capsys, "layer -3 is out of range: the model has 2 layers")


@pytest.mark.parametrize("bad, needle", [
    ("empty", "empty"),
    ("single", "column 'label' has a single class"),
    ("nocompletion", "missing column 'completion'"),
    ("nolabel", "missing column 'label'"),
])
def test_bad_labelled_files_are_one_line(bad, needle, tiny_model_dir, files, tmp_path, capsys):
    rc = main(["probes", "train", "--model", str(tiny_model_dir), "--train", files[bad], "--val", files["val"],
               "--out", str(tmp_path / "p")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and files[bad] in err, err  # names the file and the field
    rc = main(["probes", "eval", "--model", str(tiny_model_dir), "--probes", str(tmp_path / "none"),
               "--data", files[bad]])
    assert rc == 2
    _one_line_error(capsys, "no probe set there")


def test_missing_inputs_and_bad_model(tmp_path, files, capsys):
    assert main(["probes", "train", "--out", str(tmp_path / "p")]) == 2
    _one_line_error(capsys, "needs --testbed DIR, or --model with --train and --val")
    assert main(["probes", "train", "--model", str(tmp_path / "nomodel"), "--train", files["train"],
                 "--val", files["val"], "--out", str(tmp_path / "p")]) == 2
    _one_line_error(capsys, f"cannot load a model from {tmp_path / 'nomodel'}: no such folder")
