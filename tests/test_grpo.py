"""GRPO against probes, for real: TRL's GRPOTrainer on the tiny model, and under Ray Train.

What is checked is the reward: it is the probe's score on the completion's own states (by a
separate forward per sequence), it moves with the policy's weights when the policy reads and
not when the frozen base reads, a reused TRL pass gives what the extra forward gives, the
random control cannot see the text; and a Ray Train run checkpoints, survives a killed
worker and reports the probe reward.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import inputs  # noqa: F401 - the shared fixture: probes on the tiny model, prompts

from probe_dpo.config import load_config
from probe_dpo.model import load_model, load_tokenizer
from probe_dpo.probes import ProbeSet
from probe_dpo.training import TrainConfig, train
from probe_dpo.training.grpo import RandomReward, build_grpo_trainer, grpo_arguments, probe_reward

torch.set_num_threads(1)

GENERATION = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
# prompts of one token length, so no prompt is left-padded and a forward per sequence sees the same positions
PROMPTS = [{"prompt": f"Tell me about thing {i}:"} for i in range(1, 9)]


def _trainer(inputs, tmp_path, *overrides, model=None):  # noqa: F811
    cfg = load_config(TrainConfig, None, [f"model={inputs['model']}", f"probes={inputs['probes']}", "method=probe-grpo",
                                          "train.batch_size=4", "train.max_steps=1", "grpo.generations=4",
                                          *overrides])
    args = grpo_arguments(cfg, GENERATION, output_dir=str(tmp_path / "t"))
    return build_grpo_trainer(model or load_model(inputs["model"]), load_tokenizer(inputs["model"]), PROMPTS, cfg,
                              args)


def _rollout(trainer):
    """Sample this trainer's completions of four prompts (TRL's own generation path)."""
    prompts = [p["prompt"] for p in PROMPTS[:4]]
    out = trainer._generate(prompts)
    return prompts, out[1], out[3]


def _by_hand(model, probes, prompt_ids, completion_ids, aggregation):
    """Each sequence alone (no padding): the probes on the mean of the completion's states."""
    from probe_dpo.model import residual_hooks

    out = []
    layers = sorted({p.layer for p in probes})
    for p_ids, c_ids in zip(prompt_ids, completion_ids):
        ids = torch.tensor([list(p_ids) + list(c_ids)])
        with torch.no_grad(), residual_hooks(model, layers) as store:
            model(input_ids=ids)
        probs = torch.stack([probe.prob(store[probe.layer][0, len(p_ids):].mean(0)) for probe in probes])
        out.append(float(probs.max() if aggregation == "max" else probs.mean()))
    return out


def test_probe_reward_is_the_probe_on_the_completions_states_and_moves_with_the_policy_only(inputs, tmp_path):  # noqa: F811
    probe_set = ProbeSet.load(inputs["probes"])
    policy = _trainer(inputs, tmp_path / "policy")
    frozen = _trainer(inputs, tmp_path / "frozen", "grpo.reader=frozen", model=policy.model)
    assert frozen._reader() is frozen.ref_model and policy._reader() is policy.model
    prompts, completion_ids, completions = _rollout(policy)
    frozen._rollout_prompt_ids = policy._rollout_prompt_ids
    want = _by_hand(policy.model, probe_set.train_probes, policy._rollout_prompt_ids, completion_ids,
                    probe_set.aggregation)
    got = policy._probe_reward(prompts, completions, completion_ids)
    assert got == pytest.approx([-w for w in want], abs=1e-5)
    assert frozen._probe_reward(prompts, completions, completion_ids) == pytest.approx(got, abs=1e-6)
    assert len(set(round(g, 6) for g in got)) > 1  # the completions differ, and so do their rewards

    with torch.no_grad():  # the policy's weights move; the frozen reader's (TRL's reference) do not
        for name, param in policy.model.named_parameters():
            if "layers.0.mlp" in name:
                param.add_(torch.randn_like(param) * 0.5)
    moved = policy._probe_reward(prompts, completions, completion_ids)
    assert max(abs(a - b) for a, b in zip(moved, got)) > 1e-3
    assert moved == pytest.approx([-w for w in _by_hand(policy.model, probe_set.train_probes,
                                                        policy._rollout_prompt_ids, completion_ids,
                                                        probe_set.aggregation)], abs=1e-5)
    assert frozen._probe_reward(prompts, completions, completion_ids) == pytest.approx(got, abs=1e-6)


def test_reward_forms_match_the_penalty_forms_and_the_threshold():
    from probe_dpo.probes.probe import LinearProbe

    probe = LinearProbe(torch.tensor([1.0, 0.0]), 0.0, torch.zeros(2), torch.ones(2), layer=0)
    states = {0: torch.tensor([[[2.0, 5.0], [0.0, 1.0]], [[-1.0, 0.0], [-3.0, 0.0]]])}
    mask = torch.tensor([[1, 0], [1, 1]])  # pooled: logits 2.0 and -2.0
    logit = torch.tensor([2.0, -2.0])
    torch.testing.assert_close(probe_reward(states, mask, [probe], form="logit"), -logit)
    torch.testing.assert_close(probe_reward(states, mask, [probe], form="prob"), -torch.sigmoid(logit))
    torch.testing.assert_close(probe_reward(states, mask, [probe], form="bce"),
                               -torch.nn.functional.softplus(logit))
    torch.testing.assert_close(probe_reward(states, mask, [probe], form="threshold", threshold=0.8),
                               torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(probe_reward(states, mask, [probe], form="threshold", threshold=0.9),
                               torch.tensor([0.0, 0.0]))


def test_frozen_reader_reuses_trls_reference_pass_and_it_reads_what_the_extra_forward_reads(inputs, tmp_path):  # noqa: F811
    logs = {}
    for reader in ("policy", "frozen"):
        trainer = _trainer(inputs, tmp_path / reader, f"grpo.reader={reader}", "grpo.beta=0.04", "seed=3")
        trainer.train()
        logs[reader] = [h for h in trainer.state.log_history if "loss" in h][0]
    assert logs["policy"]["probe_reads/extra"] == 1.0 and "probe_reads/reused" not in logs["policy"]
    assert logs["frozen"]["probe_reads/reused"] == 1.0 and "probe_reads/extra" not in logs["frozen"]
    # step 1: the same weights sample the same completions, read once by an extra forward and once by TRL's pass
    assert logs["frozen"]["probe/prob"] == pytest.approx(logs["policy"]["probe/prob"], abs=1e-6)
    assert logs["frozen"]["rewards/probe/mean"] == pytest.approx(-logs["frozen"]["probe/prob"], abs=1e-6)


def test_random_reward_is_blind_to_the_text_and_seeded():
    class State:
        global_step = 5

    reward = RandomReward(seed=7)
    a = reward(["p"] * 4, ["you idiot", "lovely day", "x", "y"], trainer_state=State())
    b = reward(["q"] * 4, ["the garden", "shut up", "z", "w"], trainer_state=State())
    assert a == b and len(set(a)) == 4 and all(0.0 <= v < 1.0 for v in a)
    State.global_step = 6
    assert reward(["p"] * 4, ["you idiot", "lovely day", "x", "y"], trainer_state=State()) != a
    assert RandomReward(seed=8)(["p"] * 4, ["a"] * 4, trainer_state=State()) != \
        reward(["p"] * 4, ["a"] * 4, trainer_state=State())


def test_judge_reward_is_minus_the_judges_score():
    from probe_dpo.judges import get_judge
    from probe_dpo.training.grpo import JudgeReward

    texts = ["you are a fucking idiot", "the garden is lovely in spring"]
    got = JudgeReward("profanity-check")(["p", "p"], texts)
    assert got == pytest.approx([-s for s in get_judge("profanity-check").score(texts)])
    assert got[0] < got[1]


def test_probe_grpo_on_ray_train_checkpoints_resumes_after_a_killed_worker_and_reports_the_probe_reward(
        inputs, ray_cluster, tmp_path):  # noqa: F811
    def cfg(out, *fault: str) -> TrainConfig:
        return load_config(TrainConfig, None, [
            f"model={inputs['model']}", f"probes={inputs['probes']}", f"data.prompts={inputs['prompts']}",
            f"out={out}", "method=probe-grpo", "grpo.generations=4", "sampling.max_new_tokens=6",
            "train.batch_size=2", "train.max_steps=3", "train.lr=1e-3", "distributed.workers=2",
            "distributed.zero_stage=2", "distributed.checkpoint_steps=1", "distributed.max_failures=1", *fault])

    out, clean = tmp_path / "probe-grpo", tmp_path / "uninterrupted"
    summary = train(cfg(out, "fault.crash_at_step=2", "fault.crash_rank=1"))
    m = summary["rounds"][0]["train"]
    # rank 1 exits at the end of step 2, before that step's checkpoint: the group resumes from step 1's
    assert m["global_step"] == 3 and m["resumed"] is True and m["resumed_from_step"] == 1, m
    assert m["first_rewards/probe/mean"] == pytest.approx(-m["first_probe/prob"], abs=1e-6)
    assert 0.0 < m["last_probe/prob"] < 1.0
    history = json.loads((out / "policy" / "training_run.json").read_text())["log_history"]
    assert sorted(h["step"] for h in history if "loss" in h) == [1, 2, 3]  # each step once across the restart
    assert (out / "policy" / "model.safetensors").exists() and (out / "prompts.jsonl").exists()
    # the resumed run is the uninterrupted one: step 2's rollouts are sampled again from the
    # checkpoint's RNG state, so the same completions, rewards and weights come out
    want = train(cfg(clean))["rounds"][0]["train"]
    assert want["resumed"] is False and want["global_step"] == 3
    assert m["last_probe/prob"] == pytest.approx(want["last_probe/prob"], abs=1e-5)
    assert m["last_loss"] == pytest.approx(want["last_loss"], rel=1e-3, abs=1e-5)
    got_w = load_file(str(out / "policy" / "model.safetensors"))
    want_w = load_file(str(clean / "policy" / "model.safetensors"))
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], atol=1e-5, rtol=1e-4)


def test_grpo_groups_must_divide_the_step_and_penalty_is_refused(inputs, tmp_path):  # noqa: F811
    from probe_dpo.errors import UserError
    from probe_dpo.training import prepare

    base = [f"model={inputs['model']}", f"probes={inputs['probes']}", f"data.prompts={inputs['prompts']}",
            f"out={tmp_path}", "method=probe-grpo"]
    with pytest.raises(UserError, match="not a multiple of grpo.generations=4"):
        prepare(load_config(TrainConfig, None, [*base, "train.batch_size=3", "distributed.workers=1"]))
    with pytest.raises(UserError, match="grpo.reward_weight"):
        prepare(load_config(TrainConfig, None, [*base, "penalty.weight=1"]))
    plan = prepare(load_config(TrainConfig, None, [*base, "train.batch_size=2", "distributed.workers=2"]))
    assert len(plan.prompts) == 12 and plan.probes is not None
