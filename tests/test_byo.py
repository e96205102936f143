"""Bring your own model and data: a model by hub id from the Hugging Face cache (offline), an S3
model folder without our manifest, data through ``datasets`` (save_to_disk, csv, jsonl on S3
with storage_options), TRL's conversational format with chat templates, and ``probe-dpo train``
/ ``probe-dpo attribute`` on all of it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from probe_dpo import data, storage
from probe_dpo.cli import main
from probe_dpo.errors import UserError

CONV_PAIRS = [
    {"prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
     "chosen": [{"role": "assistant", "content": f"Topic {i} is interesting and kind."}],
     "rejected": [{"role": "assistant", "content": f"Topic {i} is awful, stupid and boring."}],
     "source": "good" if i % 2 else "bad"}
    for i in range(12)
]


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """The tiny model as the hub would cache it: models--org--tiny/snapshots/<hash>/ + refs/main,
    with HF_HUB_CACHE pointing there and the hub offline."""
    root = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "models--probe-dpo-test--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "probe-dpo-test/tiny", repo / "snapshots" / commit


def test_model_by_hub_id_from_the_cache_offline(hub_cache):
    from probe_dpo.model import load_model, load_tokenizer, model_dir, model_facts

    model_id, snapshot = hub_cache
    assert os.path.samefile(model_dir(model_id), snapshot)
    facts = model_facts(model_id)
    assert {k: facts[k] for k in ("hidden_size", "num_layers")} == {"hidden_size": 64, "num_layers": 2}
    assert facts == model_facts(str(snapshot))  # the hub id reads the cached folder's config, arch_hash included
    lm, tok = load_model(model_id), load_tokenizer(model_id)
    assert lm.config.num_hidden_layers == 2 and tok("hello")["input_ids"]
    with pytest.raises(UserError) as info:
        model_dir("probe-dpo-test/absent")
    assert "\n" not in str(info.value) and "not in the Hugging Face cache" in str(info.value)
    assert "offline" in str(info.value)


def test_s3_model_folder_without_a_manifest(tiny_model_dir, s3_bucket, monkeypatch, tmp_path):
    from probe_dpo.model import load_model, model_dir

    monkeypatch.setenv("PROBE_DPO_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/someone-else/tiny"
    for f in sorted(tiny_model_dir.iterdir()):  # uploaded as plain objects, as `aws s3 cp` would
        storage.write_bytes(f"{uri}/{f.name}", f.read_bytes())
    assert not storage.is_complete(uri)
    local = model_dir(uri)
    assert (tmp_path / "cache") in __import__("pathlib").Path(local).parents
    assert load_model(uri).config.hidden_size == 64
    assert model_dir(uri) == local  # cached: an unchanged folder is not fetched again


def test_conversational_pairs_in_every_format(tmp_path, s3_bucket, monkeypatch):
    import datasets

    folder = str(tmp_path / "conv")
    datasets.Dataset.from_list(CONV_PAIRS).save_to_disk(folder)
    assert data.read_pair_records(folder) == CONV_PAIRS
    # the same data as jsonl on S3: read by datasets.load_dataset with the process's storage_options
    uri = f"{s3_bucket}/pairs/conv.jsonl"
    data.write_records(CONV_PAIRS, uri)
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):  # the real load_dataset, recording what it was given and returned
        result = real(*args, **kwargs)
        calls.append((kwargs.get("storage_options"), len(result)))
        return result

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert data.read_pair_records(uri) == CONV_PAIRS
    assert calls == [(calls[0][0], len(CONV_PAIRS))]  # read by datasets, not by the fallback reader
    assert calls[0][0]["endpoint_url"] == os.environ["AWS_ENDPOINT_URL"]
    # implicit prompt (TRL): the shared leading messages become the prompt
    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in CONV_PAIRS]
    data.write_records(implicit, str(tmp_path / "implicit.jsonl"))
    back = data.read_pair_records(str(tmp_path / "implicit.jsonl"))
    assert [(b["prompt"], b["chosen"], b["rejected"]) for b in back] == \
        [(p["prompt"], p["chosen"], p["rejected"]) for p in CONV_PAIRS]
    # csv through datasets
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nhi,hello,go away\nq,a,b\n")
    assert data.read_pair_records(str(tmp_path / "p.csv"))[0] == {"prompt": "hi", "chosen": "hello",
                                                                    "rejected": "go away"}
    with pytest.raises(UserError) as info:
        data.check_pairs([{"prompt": "p", "chosen": [{"role": "assistant", "content": "same"}],
                           "rejected": "same "}], "x.jsonl")
    assert "same text" in str(info.value)


def test_hub_dataset_id_offline_is_one_line(monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")
    with pytest.raises(UserError) as info:
        data.read_records("probe-dpo-test/absent-dataset:train", what="preference pairs")
    assert "\n" not in str(info.value) and "no such file or folder" in str(info.value)
    assert "no Hugging Face dataset 'probe-dpo-test/absent-dataset' in the local cache" in str(info.value)
    assert "org/name:split" in str(info.value)


@pytest.fixture
def hub_dataset_cache(tmp_path, monkeypatch):
    """A hub dataset ``probe-dpo-test/mini`` as ``datasets`` caches it once loaded
    (``org___name/<config>/<version>/<hash>/``: what it reads offline), in a fresh cache."""
    import glob

    import datasets
    import datasets.config

    rows = [{"prompt": f"p{i}", "chosen": "kind", "rejected": "rude"} for i in range(3)]
    source = tmp_path / "train.jsonl"
    data.write_records(rows, str(source))
    datasets.load_dataset("json", data_files=str(source), split="train", cache_dir=str(tmp_path / "built"))
    (built,) = [d for d in glob.glob(str(tmp_path / "built" / "json" / "*" / "*" / "*")) if os.path.isdir(d)]
    cached = tmp_path / "ds-cache" / "probe-dpo-test___mini" / "default" / "0.0.0" / os.path.basename(built)
    shutil.copytree(built, cached)
    (cached / "json-train.arrow").rename(cached / "mini-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")
    return rows


def _no_hub(monkeypatch):
    """Any load from the Hub, or question to it, fails the test."""
    import datasets
    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(HfApi, "dataset_info", refuse)


def _online(monkeypatch):
    import datasets.config

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def test_cached_hub_dataset_loads_offline(hub_dataset_cache):
    assert data.read_records("probe-dpo-test/mini") == hub_dataset_cache
    assert data.read_pair_records("probe-dpo-test/mini:train", what="data.pairs") == hub_dataset_cache


def test_mistyped_relative_path_is_one_line_without_retries(monkeypatch, tmp_path, hub_dataset_cache):
    """``data.pairs=my-data/pairs`` that does not exist: one line naming the key, at once, not
    12 lines of retries against the Hub over ~27 s."""
    import time

    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    real_load = datasets.load_dataset
    monkeypatch.chdir(tmp_path)
    _no_hub(monkeypatch)
    _online(monkeypatch)
    (tmp_path / "my-data").mkdir()  # its folder is here: a path, the Hub is not asked
    with pytest.raises(UserError) as info:
        data.read_records("my-data/pairs", what="data.pairs")
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.pairs my-data/pairs: no such file or folder")
    assert "my-data/ is a folder here" in message and "org/name or org/name:split" in message
    (tmp_path / "my-data").rmdir()

    def answer(exc):  # the Hub's one answer (no retries), then the message
        def dataset_info(self, name, **kwargs):
            calls.append(name)
            raise exc
        calls: list = []
        monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
        t0 = time.perf_counter()
        with pytest.raises(UserError) as info:
            data.read_records("my-data/pairs", what="data.pairs")
        assert calls == ["my-data/pairs"] and time.perf_counter() - t0 < 5
        assert "\n" not in str(info.value) and str(info.value).startswith("data.pairs my-data/pairs: no such file")
        return str(info.value)

    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(missing, "404")
    assert "no Hugging Face dataset 'my-data/pairs' on the Hub" in answer(missing)
    assert "the Hugging Face Hub cannot be reached" in answer(ConnectionError("Name or service not known"))
    # a real hub id still loads: cached (the Hub is not asked whether it has it), or the Hub has it (gated too)
    monkeypatch.setattr(datasets, "load_dataset", real_load)
    assert data.read_records("probe-dpo-test/mini") == hub_dataset_cache
    gated = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(gated, "401")

    def gated_info(self, name, **kwargs):
        raise gated

    monkeypatch.setattr(HfApi, "dataset_info", gated_info)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list([{"x": name}]))
    assert data.read_records("org/gated:test") == [{"x": "org/gated"}]


def test_chat_template_in_extraction_and_generation(tiny_model_dir):
    from probe_dpo.activations import tokenize
    from probe_dpo.chat import render_pair
    from probe_dpo.generation import GenerationSettings, generate
    from probe_dpo.model import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    assert tok.chat_template
    p, c = CONV_PAIRS[0]["prompt"], CONV_PAIRS[0]["chosen"]
    head, tail, special = render_pair(tok, p, c)
    whole = tok.apply_chat_template(p + c, tokenize=False)
    assert head + tail == whole and not special and "Tell me about topic 0." in head
    assert "kind" in tail and "Tell me" not in tail
    (ids, start), = tokenize(tok, prompts=[p], completions=[c], span="response")
    assert tok.decode(ids[:start]) == head and tok.decode(ids[start:]).strip() == tail.strip()
    (plain_ids, plain_start), = tokenize(tok, prompts=["Tell me about topic 0."], completions=[" ok"])
    assert plain_start < start  # a string prompt is raw text: no template around it
    lm = load_model(tiny_model_dir)
    out = generate(lm, [p, CONV_PAIRS[1]["prompt"]], 2, GenerationSettings(max_new_tokens=4), 0, tokenizer=tok,
                   progress=False)
    assert len(out) == 2 and all(len(o) == 2 for o in out)
    with pytest.raises(UserError, match="mix strings and message lists"):
        generate(lm, [p, "a string"], 1, GenerationSettings(max_new_tokens=2), 0, tokenizer=tok, progress=False)


def test_train_and_attribute_on_a_hub_id_and_a_save_to_disk_folder(hub_cache, tmp_path, ray_cluster, capsys):
    """`probe-dpo train method=dpo` and `probe-dpo attribute` on the cached model by id and the
    conversational pairs saved with datasets.save_to_disk."""
    import datasets

    model_id, _ = hub_cache
    pairs = str(tmp_path / "pairs")
    datasets.Dataset.from_list(CONV_PAIRS).save_to_disk(pairs)
    out = str(tmp_path / "dpo")
    assert main(["train", f"model={model_id}", "method=dpo", f"data.pairs={pairs}", f"out={out}",
                 "train.max_steps=2", "train.batch_size=2", "train.max_length=64", "distributed.workers=1",
                 "distributed.zero_stage=0"]) == 0, capsys.readouterr().err
    summary = json.loads(open(os.path.join(out, "train.json")).read())
    assert summary["rounds"][0]["train"]["global_step"] == 2 and summary["base_model"] == model_id
    run = json.loads(open(os.path.join(out, "policy", "training_run.json")).read())
    assert any("rewards/margins" in h for h in run["log_history"])
    # attribution: the diff-of-means direction from labelled conversational examples
    behaviour = [{"prompt": p["prompt"], "completion": p[key], "label": int(key == "rejected")}
                 for p in CONV_PAIRS for key in ("chosen", "rejected")]
    data.write_records(behaviour, str(tmp_path / "behaviour.jsonl"))
    att = str(tmp_path / "attr")
    assert main(["attribute", "--pairs", pairs, "--model", model_id, "--behaviour-data",
                 str(tmp_path / "behaviour.jsonl"), "--out", att, "--in-process", "--mitigate", "filter",
                 "layer=1", "ranking.top_k=4", "ranking.bootstrap=100", "clusters.k_max=3"]) == 0, capsys.readouterr().err
    results = json.loads(open(os.path.join(att, "results.json")).read())
    assert results["layer"] == 1 and results["direction"] == "diff-of-means"
    scores = data.read_records(os.path.join(att, "scores.parquet"))
    assert len(scores) == len(CONV_PAIRS)
    bad = [s["score"] for s in scores if s["source"] == "bad"]
    assert len(bad) == 6
