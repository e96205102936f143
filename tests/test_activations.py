"""Extraction: pooling, response spans, padding independence, order; Ray-sharded = in-process."""

from __future__ import annotations

import pytest
import torch

from probe_dpo import activations as A
from probe_dpo import storage
from probe_dpo.errors import UserError
from probe_dpo.model import load_model, load_tokenizer, residual_hooks
from probe_dpo.storage import artifacts

torch.set_num_threads(1)

PROMPTS = ["The weather today is", "You are such a", "Once upon a time there was a", "Hi",
           "A long prompt about the history of the Roman empire and its many emperors, who", "Why"]
COMPLETIONS = [" sunny and warm.", " wonderful friend!", " princess", "", " ruled for years.", " not?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def pool(tiny_model_dir, ray_cluster):
    """Two CPU actors with the tiny model, shared by this module's sharded tests (start-up is slow)."""
    with A.ExtractorPool(str(tiny_model_dir), actors=2, threads_per_actor=1) as p:
        yield p


def _one_by_one(model, tok, layer, prompt, completion):
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.inference_mode(), residual_hooks(model, [layer]) as store:  # hooks = hidden_states (test_model)
        model(input_ids=ids)
    return store[layer][0], len(p)


def test_response_mean_matches_unpadded_forward(tiny):
    model, tok = tiny
    feats = A.extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[0], batch_size=4)
    assert feats[0].shape == (len(PROMPTS), 64)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        hs, start = _one_by_one(model, tok, 0, p, c)
        want = hs[start:].mean(0) if c else hs[start - 1]  # an empty completion: the last prompt token
        torch.testing.assert_close(feats[0][i], want, atol=1e-5, rtol=1e-4)


def test_poolings_and_spans(tiny):
    model, tok = tiny
    stats = {}
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    mean_all = A.extract(model, tok, texts, layers=[-1, 0], batch_size=3, stats=stats)
    assert set(mean_all) == {0, 1} and stats["texts"] == len(texts) and stats["tokens"] > len(texts)
    last = A.extract(model, tok, texts, layers=[1], pooling="last", batch_size=2)
    none = A.extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[1], pooling="none")
    resp = A.extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[1])
    allspan = A.extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[1], span="all")
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.inference_mode():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(mean_all[0][i], hs[1][0].mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(last[1][i], A.extract(model, tok, [text], layers=[1], pooling="last")[1][0])
        hp, start = _one_by_one(model, tok, 1, PROMPTS[i], COMPLETIONS[i])
        if COMPLETIONS[i]:
            torch.testing.assert_close(none[1][i], hp[start:], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(resp[1][i], none[1][i].mean(0), atol=1e-5, rtol=1e-4)
        else:
            assert none[1][i].shape == (1, 64)
        torch.testing.assert_close(allspan[1][i], hp.mean(0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(resp[1], allspan[1])


def test_results_do_not_depend_on_batching_or_order(tiny):
    model, tok = tiny
    a = A.extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[0, 1], batch_size=1)
    b = A.extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[0, 1], batch_size=6)
    perm = [3, 1, 5, 0, 2, 4]
    c = A.extract(model, tok, prompts=[PROMPTS[i] for i in perm], completions=[COMPLETIONS[i] for i in perm],
                  layers=[0, 1], batch_size=4)
    for layer in (0, 1):
        torch.testing.assert_close(a[layer], b[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c[layer], b[layer][perm], atol=1e-5, rtol=1e-4)


def test_truncation_keeps_the_completion(tiny):
    model, tok = tiny
    enc = A.tokenize(tok, prompts=["word " * 50], completions=[" end of it"], max_length=8)
    ids, start = enc[0]
    assert len(ids) == 8 and ids[start:] == tok(" end of it", add_special_tokens=False)["input_ids"]


def test_bad_inputs_are_user_errors(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="layer 2 is out of range: the model has 2 layers"):
        A.extract(model, tok, ["x"], layers=[2])
    with pytest.raises(UserError, match="span 'response' needs prompts and completions"):
        A.extract(model, tok, ["x"], layers=[0], span="response")
    with pytest.raises(UserError, match="unknown pooling"):
        A.extract(model, tok, ["x"], layers=[0], pooling="max")
    with pytest.raises(UserError, match="2 prompts but 1 completions"):
        A.extract(model, tok, prompts=["a", "b"], completions=["c"], layers=[0])


def test_sharded_equals_in_process_and_restart_skips(tiny, tiny_model_dir, pool, storage_root):
    model, tok = tiny
    prompts = [f"{p} ({i})" for i in range(4) for p in PROMPTS]  # 24 inputs -> 5 shards of 5
    completions = COMPLETIONS * 4
    want = A.extract(model, tok, prompts=prompts, completions=completions, layers=[0, 1], batch_size=4)
    out = storage.join(storage_root, "acts")
    seen = []
    got = A.extract_sharded(str(tiny_model_dir), out, prompts=prompts, completions=completions, layers=[0, -1],
                            batch_size=3, shard_size=5, pool=pool, progress=seen.append)
    assert sorted(r["name"] for r in seen) == [f"shard-{k:05d}.safetensors" for k in range(5)]
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], want[layer], atol=1e-5, rtol=1e-5)
    manifest = storage.read_manifest(out)
    meta = manifest["metadata"]
    assert meta["layers"] == [0, 1] and meta["pooling"] == "mean" and meta["span"] == "response"
    assert len(meta["model_hash"]) == 16 and len(meta["data_hash"]) == 16
    assert sorted(manifest["files"]) == [s["name"] for s in meta["shards"]]
    assert meta["run"]["shards_written"] == 5 and meta["run"]["actors"] == 2

    # a crash after two shards: the manifest and three shards are gone; a restart redoes only those
    storage.remove(storage.join(out, storage.MANIFEST_NAME))
    for k in (1, 3, 4):
        storage.remove(storage.join(out, f"shard-{k:05d}.safetensors"))
    assert not storage.is_complete(out)
    seen.clear()
    again = A.extract_sharded(str(tiny_model_dir), out, prompts=prompts, completions=completions, layers=[0, 1],
                              batch_size=3, shard_size=5, pool=pool, progress=seen.append)
    assert sorted(r["name"] for r in seen) == [f"shard-{k:05d}.safetensors" for k in (1, 3, 4)]
    assert storage.read_manifest(out)["metadata"]["run"]["shards_skipped"] == 2
    torch.testing.assert_close(again[0], want[0], atol=1e-5, rtol=1e-5)
    # complete and same job: nothing runs; another job into the same folder needs overwrite
    seen.clear()
    A.extract_sharded(str(tiny_model_dir), out, prompts=prompts, completions=completions, layers=[0, 1],
                      batch_size=3, shard_size=5, pool=pool, progress=seen.append)
    assert seen == []
    with pytest.raises(UserError, match="already holds activations of another extraction"):
        A.extract_sharded(str(tiny_model_dir), out, prompts=prompts, completions=completions, layers=[0],
                          shard_size=5, pool=pool)


def test_sharded_per_token_with_its_own_actors(tiny, tiny_model_dir, ray_cluster, tmp_path):
    model, tok = tiny
    want = A.extract(model, tok, prompts=PROMPTS, completions=COMPLETIONS, layers=[1], pooling="none")
    got = A.extract_sharded(str(tiny_model_dir), str(tmp_path / "tok"), prompts=PROMPTS, completions=COMPLETIONS,
                            layers=[1], pooling="none", shard_size=4, actors=2)
    assert len(got[1]) == len(PROMPTS)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    feats, meta = A.load_activations(str(tmp_path / "tok"))
    assert meta["pooling"] == "none" and len(feats[1]) == len(PROMPTS)


def test_sharded_bad_layer_fails_before_starting(tiny_model_dir, ray_cluster, tmp_path):
    with pytest.raises(UserError, match="layer 5 is out of range: the model has 2 layers"):
        A.extract_sharded(str(tiny_model_dir), str(tmp_path / "x"), ["a"], layers=[5])
    assert not storage.exists(str(tmp_path / "x"))


def test_load_activations_refuses_a_damaged_shard(storage_root, tmp_path):
    """load_activations checks each shard against the manifest before parsing it."""
    from safetensors.torch import save

    folder = tmp_path / "acts"
    folder.mkdir()
    feats = {0: torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    (folder / "shard-00000.safetensors").write_bytes(save({"layer.0": feats[0]}))
    meta = {"kind": "activations", "layers": [0], "pooling": "mean",
            "shards": [{"name": "shard-00000.safetensors", "start": 0, "end": 3}]}
    uri = storage.join(storage_root, "acts")
    artifacts.publish_dir(folder, uri, meta)
    got, _ = A.load_activations(uri)
    torch.testing.assert_close(got[0], feats[0])
    manifest = storage.read_manifest(uri)
    fs, path = storage.filesystem(uri)
    shard = f"{path}/{manifest.get('files_at', '')}/shard-00000.safetensors".replace("//", "/")
    data = fs.cat_file(shard)
    fs.pipe_file(shard, data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte of the last value
    with pytest.raises(UserError) as info:
        A.load_activations(uri)
    assert str(info.value).startswith(f"storage {storage.join(uri, 'shard-00000.safetensors')}: sha256 ")
    assert "\n" not in str(info.value)
