"""Output folders given as URIs: ``testbed build --out s3://...`` builds in the local cache and
publishes there (never a local folder named ``s3:``), a missing bucket fails before any compute,
and the experiment's local-only ``testbed_dir`` refuses a URI in one line. No Ray, no model: the
11-minute build itself (``testbed.build._build``) is replaced by a small fake testbed folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probe_dpo import storage
from probe_dpo.cli import main
from probe_dpo.errors import UserError


def _fake_build(calls: list):
    def build(cfg, out, key, threads, t0):  # testbed.build._build: the build itself, into a local folder
        assert isinstance(out, Path) and not str(out).startswith("s3:"), out
        calls.append(out)
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "config.json").write_text('{"model_type": "llama"}')
        (out / "data").mkdir(exist_ok=True)
        (out / "data" / "probe_train.jsonl").write_text('{"text": "a", "label": 1}\n')
        from probe_dpo.testbed import BUILD_VERSION

        info = {"config_hash": key, "build_version": BUILD_VERSION, "content_hash": "c0ffee",
                "files": {"model/config.json": {"bytes": 23}},
                "model": {"parameters": 1e6, "benign_perplexity": 12.0}, "base_toxicity_rate": {"j": 0.1},
                "threshold": 0.5}
        (out / "testbed.json").write_text(json.dumps(info))
        return info

    return build


def test_testbed_build_to_a_uri_publishes_from_the_cache(s3_bucket, tmp_path, monkeypatch, capsys):
    import probe_dpo.testbed.build as build

    calls: list = []
    monkeypatch.setattr(build, "_build", _fake_build(calls))
    monkeypatch.setenv("PROBE_DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    uri = f"{s3_bucket}/tb"
    assert main(["testbed", "build", "--out", uri]) == 0
    assert f"testbed ready in {uri}" in capsys.readouterr().out
    assert not (tmp_path / "s3:").exists()  # no local folder named after the URI
    (local,) = calls
    assert (tmp_path / "cache" / "testbeds") in local.parents
    from probe_dpo.testbed import read_testbed_info
    from probe_dpo.testbed.layout import TestbedPaths

    assert read_testbed_info(uri)["content_hash"] == "c0ffee"  # readers of a remote testbed find it
    assert storage.read_text(TestbedPaths(uri).data("probe_train")) == '{"text": "a", "label": 1}\n'
    assert storage.is_complete(TestbedPaths(uri).model)
    assert json.loads(storage.read_text(storage.join(TestbedPaths(uri).model, "config.json"))) == {
        "model_type": "llama"}
    assert main(["testbed", "build", "--out", uri]) == 0  # again: the cache's build, published as it is
    assert "cache hit" in capsys.readouterr().out and len(calls) == 1


def test_testbed_build_to_a_missing_bucket_fails_before_building(s3_server, tmp_path, monkeypatch, capsys):
    import probe_dpo.testbed.build as build

    calls: list = []
    monkeypatch.setattr(build, "_build", _fake_build(calls))
    monkeypatch.setenv("PROBE_DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["testbed", "build", "--out", "s3://no-such-bucket-probe-dpo/tb"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-bucket-probe-dpo" in err
    assert calls == [] and not (tmp_path / "s3:").exists()


def test_the_experiment_refuses_a_remote_testbed_dir_in_one_line(tmp_path, monkeypatch):
    from probe_dpo.workflows.experiment.stages import read_built_testbed

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="local testbed folder") as info:
        read_built_testbed("s3://my-bucket/tb")
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
