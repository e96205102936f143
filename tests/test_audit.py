"""The concept audit: effect sizes by hand, a planted push found per source, the `audit` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_attribution import planted_pairs

from probe_dpo import attribution as A
from probe_dpo.attribution.audit import audit_markdown, audit_table, effect, ranked
from probe_dpo.cli import main
from probe_dpo.data import write_records

torch.set_num_threads(1)


def test_effect_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, 200)
    e = effect(x, n_boot=500, n_splits=100)
    assert e["delta"] == pytest.approx(x.mean()) and e["sd"] == pytest.approx(x.std(ddof=1))
    assert e["d"] == pytest.approx(x.mean() / x.std(ddof=1))
    assert e["ci_low"] < e["delta"] < e["ci_high"] and e["direction_of_push"] == "up" and e["split_half"] > 0.95
    noise = effect(rng.normal(0.0, 1.0, 200), n_boot=500, n_splits=200)
    assert noise["direction_of_push"] == "unclear" and noise["split_half"] < 0.9
    assert effect(-x)["direction_of_push"] == "down"


def test_audit_flags_the_direction_pushed_up_by_the_poisoned_source_only():
    rng = np.random.default_rng(1)
    n, d = 240, 16
    u = torch.zeros(d)
    u[2] = 1.0
    sources = np.array(["clean-a", "clean-b", "poisoned"] * (n // 3))
    diffs = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    poisoned = torch.as_tensor(sources == "poisoned")
    diffs[poisoned] += 1.0 * u  # the poisoned source pushes the concept up
    diffs[torch.as_tensor(sources == "clean-a")] -= 0.8 * u  # a clean source pushes it down
    other = A.Direction("other", 3, torch.eye(d)[5])
    rows = audit_table({3: diffs}, [A.Direction("toxicity", 3, u, "probe"), other], sources, n_boot=1000)
    by = {(r["direction"], r["scope"]): r for r in rows}
    p, a, b = by[("toxicity", "poisoned")], by[("toxicity", "clean-a")], by[("toxicity", "clean-b")]
    assert p["direction_of_push"] == "up" and p["ci_low"] > max(a["ci_high"], b["ci_high"])  # no overlap
    assert a["direction_of_push"] == "down" and b["direction_of_push"] == "unclear"
    assert p["split_half"] > 0.95 and p["d"] == pytest.approx(p["delta"] / p["sd"])
    x = (diffs.double() @ u.double()).numpy()
    assert by[("toxicity", "all")]["delta"] == pytest.approx(x.mean())
    assert ranked(rows)[0]["scope"] == "all"
    assert p["p_holm"] < 1e-6 and p["p_holm"] >= p["p"]  # adjusted over the 8 rows
    md = audit_markdown(rows)
    assert "| toxicity | poisoned | 80 |" in md and "split-half" in md and "p (Holm)" in md


def test_many_noise_directions_flag_nothing_after_the_correction():
    """The control: 60 directions with no push over pure noise. Taken one at a time, a few
    intervals exclude 0 by chance; adjusted over the audit's rows, none is called a push."""
    rng = np.random.default_rng(7)
    n, d = 120, 64
    diffs = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    dirs = [A.Direction(f"noise-{i}", 3, torch.tensor(rng.normal(size=d), dtype=torch.float32)) for i in range(60)]
    rows = audit_table({3: diffs}, dirs, ["one-source"] * n, n_boot=400, n_splits=20)
    unadjusted = [r for r in rows if r["ci_low"] > 0 or r["ci_high"] < 0]
    assert len(unadjusted) >= 1 and min(r["p"] for r in rows) < 0.05
    assert all(r["direction_of_push"] == "unclear" for r in rows)


@pytest.fixture(scope="module")
def audit_files(tmp_path_factory, tiny_model_dir):
    from probe_dpo.probes import LinearProbe, ProbeSet

    root = tmp_path_factory.mktemp("audit")
    pairs, _ = planted_pairs(30, 2)
    write_records(pairs, str(root / "pairs.jsonl"))
    write_records([{k: v for k, v in p.items() if k != "rejected"} for p in pairs], str(root / "norejected.jsonl"))
    A.save_directions([A.Direction("dir-a", 1, torch.randn(64, generator=torch.Generator().manual_seed(0)))],
                      str(root / "dirs"), {"arch_hash": A.model_facts(str(tiny_model_dir))["arch_hash"]})
    probe = LinearProbe(torch.randn(64), 0.0, torch.zeros(64), torch.ones(64), layer=0, name="p0")
    ProbeSet([probe]).save(str(root / "probes"))
    wide = LinearProbe(torch.randn(96), 0.0, torch.zeros(96), torch.ones(96), layer=0, name="w")
    ProbeSet([wide]).save(str(root / "wide"))
    A.save_directions([A.Direction("deep", 7, torch.ones(64))], str(root / "deep"))
    return root


def test_audit_command(audit_files, tiny_model_dir, capsys):
    out = audit_files / "audit.json"
    rc = main(["audit", "--pairs", str(audit_files / "pairs.jsonl"), "--model", str(tiny_model_dir),
               "--directions", str(audit_files / "dirs"), "--directions", str(audit_files / "probes"),
               "--in-process", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| dir-a | all | 30 |" in printed and "| probe:p0 | mixed | 10 |" in printed
    result = json.loads(out.read_text())
    assert {r["direction"] for r in result["rows"]} == {"dir-a", "probe:p0"}
    assert {r["scope"] for r in result["rows"]} == {"all", "safety", "neutral", "mixed"}


@pytest.mark.parametrize("which,needle", [("norejected", "missing column 'rejected'"),
                                          ("wide", "hidden size 96, but model"),
                                          ("deep", "reads layer 7, but model")])
def test_audit_errors_are_one_line(audit_files, tiny_model_dir, capsys, which, needle):
    pairs = str(audit_files / ("norejected.jsonl" if which == "norejected" else "pairs.jsonl"))
    directions = str(audit_files / ("dirs" if which == "norejected" else which))
    rc = main(["audit", "--pairs", pairs, "--model", str(tiny_model_dir), "--directions", directions, "--in-process"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("probe-dpo: error: ") and needle in err, err


def test_audit_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["audit", "--help"])
    assert exc.value.code == 0 and "--directions" in capsys.readouterr().out
