"""Layer access, residual hooks, loading and hashing on tiny random models of three layouts."""

from __future__ import annotations

import pytest
import torch

from probe_dpo import model as M
from probe_dpo.errors import UserError

torch.set_num_threads(1)


def _tiny(kind: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=2,
                                            num_key_value_heads=2, max_position_embeddings=64)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=2,
                                            max_position_embeddings=64)).eval()


def _peft(model):
    from peft import LoraConfig, get_peft_model

    target = {"LlamaForCausalLM": ["q_proj", "v_proj"], "GPT2LMHeadModel": ["c_attn"],
              "GPTNeoXForCausalLM": ["query_key_value"]}[type(model).__name__]
    return get_peft_model(model, LoraConfig(r=4, target_modules=target, init_lora_weights=False))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_hooks_match_hidden_states_on_each_layout(kind):
    model = _tiny(kind)
    assert M.num_layers(model) == 3 and M.hidden_size(model) == 32
    ids = torch.randint(0, 100, (2, 7))
    with torch.inference_mode():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        with M.residual_hooks(model, [0, 1, -1]) as store:
            model(input_ids=ids)
        early = M.forward_until(model, [1], input_ids=ids)
    # hidden_states[i + 1] is the output of layer i (the last one has the final norm applied)
    torch.testing.assert_close(store[0], ref[1])
    torch.testing.assert_close(store[1], ref[2])
    assert set(store) == {0, 1, 2} and store[2].shape == (2, 7, 32)
    assert not torch.allclose(store[2], ref[3])  # raw residual, not the final-normed state
    torch.testing.assert_close(early[1], ref[2])
    assert set(early) == {1}


def test_stop_early_skips_the_layers_above():
    model = _tiny("llama")
    ran = []
    model.model.layers[2].register_forward_pre_hook(lambda *a: ran.append(2))
    with torch.inference_mode():
        M.forward_until(model, [0, 1], input_ids=torch.randint(0, 100, (1, 5)))
    assert ran == []
    with torch.inference_mode():
        M.forward_until(model, [0, 1], stop_early=False, input_ids=torch.randint(0, 100, (1, 5)))
    assert ran == [2]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_hooks_work_through_peft_and_engine_wrappers(kind):
    model = _peft(_tiny(kind))
    assert M.num_layers(model) == 3
    ids = torch.randint(0, 100, (1, 6))
    with M.residual_hooks(model, [1], detach=False) as store:
        out = model(input_ids=ids)
    # gradients flow from the hooked state into the LoRA weights
    store[1].sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert out.logits.shape == (1, 6, 100)

    class Engine(torch.nn.Module):  # how DeepSpeedEngine / DDP hold the model
        def __init__(self, module):
            super().__init__()
            self.module = module

    engine = Engine(model)
    assert M.unwrap_model(engine) is model.get_base_model()
    assert M.get_layer(engine, -1) is M.get_layers(model)[2]


def test_only_with_grad_skips_no_grad_passes():
    model = _tiny("llama")
    ids = torch.randint(0, 100, (1, 4))
    with M.residual_hooks(model, [0], detach=False, only_with_grad=True) as store:
        with torch.no_grad():
            model(input_ids=ids)
        assert store == {}
        model(input_ids=ids)
        assert store[0].requires_grad


def test_layer_out_of_range_is_a_user_error():
    model = _tiny("gpt2")
    with pytest.raises(UserError, match=r"layer 3 is out of range: the model has 3 layers"):
        M.resolve_layer(model, 3)
    with pytest.raises(UserError, match="has 3 layers"):
        M.resolve_layers(model, [0, -4])
    assert M.resolve_layers(model, [-1, 0, 2]) == [2, 0]


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=f"cannot load a model from {tmp_path / 'nope'}: no such folder"):
        M.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"cannot load a model from {tmp_path / 'empty'}"):
        M.load_model(tmp_path / "empty")
    with pytest.raises(UserError, match="cannot load a tokenizer from"):
        M.load_tokenizer(tmp_path / "empty")


def test_model_hash_is_stable_and_sensitive(tmp_path, tiny_model_dir):
    model = M.load_model(tiny_model_dir)
    h = M.model_hash(model)
    assert h == M.model_hash(tiny_model_dir) == M.model_hash(M.load_model(tiny_model_dir, dtype="bfloat16"))
    assert M.arch_hash(model) == M.arch_hash(tiny_model_dir)
    assert M.model_hash(_peft(M.load_model(tiny_model_dir))) != h  # LoRA weights are part of the model
    with torch.no_grad():
        M.get_layer(model, -1).mlp.down_proj.weight.add_(0.01)
    assert M.model_hash(model) != h
    assert M.arch_hash(model) == M.arch_hash(tiny_model_dir)
    other = _tiny("llama")
    assert M.arch_hash(other) != M.arch_hash(model)
    tok = M.load_tokenizer(tiny_model_dir)
    assert tok.pad_token_id is not None


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path, tiny_model_dir, capfd):
    import json
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2  # the checkpoint's MLP weights no longer fit
    (folder / "config.json").write_text(json.dumps(config))
    capfd.readouterr()
    with pytest.raises(UserError) as info:
        M.load_model(folder)
    message = str(info.value)
    assert message.startswith(f"cannot load a model from {folder}: weight model.layers.")
    assert f"in the checkpoint but [{config['intermediate_size']}, " in message or \
        f", {config['intermediate_size']}] in the model" in message
    assert "\n" not in message and info.value.__cause__ is None
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err  # transformers' multi-line table is held back


def test_a_published_model_with_a_damaged_weight_is_refused(tmp_path, tiny_model_dir):
    from probe_dpo.storage import artifacts

    uri = str(tmp_path / "policy")
    artifacts.publish_dir(tiny_model_dir, uri)
    assert M.model_hash(M.load_model(uri)) == M.model_hash(tiny_model_dir)  # verified, then loaded
    weights = tmp_path / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        M.load_model(uri)
    assert str(info.value).startswith(f"storage {weights}: sha256 does not match its artifact's _MANIFEST.json")
    assert "\n" not in str(info.value)
