"""On-policy RL against probes: TRL's GRPOTrainer with a reward read from hidden states.

No RL framework lets a reward function see the policy's hidden states (TRL's reward functions
get prompts, completions and their token ids), yet that is the setting in which a monitor can
be learnt around: the policy is rewarded for what the probe reads on its OWN activations.
``ProbeGRPOTrainer`` adds that reward to ``GRPOTrainer``:

    reward(completion) = -probe_weight · f(probe logit on the completion's states)

with ``f`` the DPO penalty's forms (``prob``, ``logit``, ``bce``) or ``threshold`` (1 where the
probability reaches ``probe_threshold``: the monitor's verdict), the probes pooled over the
completion tokens as they were trained. ``probe_reader`` says whose states: ``policy`` (the
current weights, the ones that sampled the completion: what RL can evade) or ``frozen`` (a
frozen copy of the base model: the policy cannot move what it reads). TRL's ``beta`` is the
KL term to the reference; task rewards passed as ``reward_funcs`` add up with the probe's.

Where the states come from: TRL runs no-grad forwards over prompt + completion before it
scores (the reference model's when ``beta > 0``; the policy's when generation and optimisation
are misaligned, ``gradient_accumulation_steps % steps_per_generation != 0``). When the reader
is the model of such a pass, the reward reuses its states (hooks on the probes' layers, no
extra compute). Otherwise it runs one extra no-grad forward of the reader up to the deepest
probe layer. ``probe_reads`` in the metrics counts which happened (``reused`` / ``extra``).
In the default set-up (aligned steps) ``frozen`` with ``beta > 0`` reuses the reference pass,
``policy`` needs the extra forward: TRL's sampling pass (``generate``) never runs the last
sampled token and left-pads per batch, so it is not the probe's feature.

The ``classifier-grpo`` reward (``JudgeReward``) is minus a judge's score of the completion
text; the ``random-grpo`` control (``RandomReward``) is a seeded random number per completion
that no text can change.

Rollouts are TRL's own (``GRPOTrainer`` samples, keeps the token ids and the sampling
log-probabilities it needs), with the sampling settings of ``probe_dpo.generation``
(``sampling.max_new_tokens``, temperature, top-p/k). The reward reads only prompt and completion
ids, so it does not depend on the engine: TRL's vLLM mode (``trl.use_vllm=true``) would serve on a
GPU, but ``vllm==0.32`` needs ``transformers<5.20`` and the pinned stack has 5.23 (STACK.md), so
it is neither installed nor tested here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from trl import GRPOConfig, GRPOTrainer

from probe_dpo.objectives import probe_penalty

log = logging.getLogger(__name__)

REWARD_FORMS: tuple[str, ...] = ("prob", "logit", "bce", "threshold")
READERS: tuple[str, ...] = ("policy", "frozen")


@dataclass
class ProbeGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` + the probe reward's fields (``probe_*``) of ``ProbeGRPOTrainer``."""

    probe_path: str | None = field(default=None, metadata={
        "help": "A probe set folder or URI: its train probes give the reward. Read when probe_weight > 0, "
                "unless the trainer is given probes=."})
    probe_weight: float = field(default=0.0, metadata={
        "help": "Weight of the probe reward -f(probe logit). 0 (the default): plain TRL GRPO."})
    probe_form: Literal["prob", "logit", "bce", "threshold"] = field(default="prob", metadata={
        "help": "f: prob (sigmoid), logit, bce (-log(1-p)) or threshold (1 where p >= probe_threshold)."})
    probe_threshold: float = field(default=0.5, metadata={"help": "The probability a threshold reward flags at."})
    probe_reader: Literal["policy", "frozen"] = field(default="policy", metadata={
        "help": "Whose states the probe reads on the completion: the policy's own or a frozen base copy's."})
    probe_aggregation: Literal["mean", "max"] | None = field(default=None, metadata={
        "help": "How an ensemble of train probes is combined (None: the probe set's own setting)."})

    def __post_init__(self):
        super().__post_init__()
        if self.probe_weight is None or float(self.probe_weight) < 0:
            raise ValueError(f"probe_weight must be >= 0, got {self.probe_weight!r}")
        self.probe_weight = float(self.probe_weight)
        if self.probe_form not in REWARD_FORMS:
            raise ValueError(f"probe_form must be one of {', '.join(REWARD_FORMS)}, got {self.probe_form!r}")
        if self.probe_reader not in READERS:
            raise ValueError(f"probe_reader must be one of {', '.join(READERS)}, got {self.probe_reader!r}")
        if not 0.0 < float(self.probe_threshold) < 1.0:
            raise ValueError(f"probe_threshold must be in (0, 1), got {self.probe_threshold!r}")


# ---------------------------------------------------------------------------------------------
# Text rewards: the classifier baseline and the random control


class JudgeReward:
    """Minus a judge's score of each completion's text (the prompt is not judged)."""

    def __init__(self, judge: Any):
        from probe_dpo.judges import Judge, get_judge

        self.judge = judge if isinstance(judge, Judge) else get_judge(judge)
        self.__name__ = "judge"

    def __call__(self, prompts: Sequence, completions: Sequence, **_: Any) -> list[float]:
        from probe_dpo.data import message_text

        return [-float(s) for s in self.judge.score([message_text(c) for c in completions])]


class RandomReward:
    """A uniform [0, 1) number per completion from (seed, optimizer step, rank, position).

    The control that shows a GRPO run can leave the behaviour where it is: it has TRL's whole
    machinery (sampling, the group baseline, the KL term) and no information about the text."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.__name__ = "random"

    def __call__(self, prompts: Sequence, completions: Sequence, trainer_state: Any = None, **_: Any) -> list[float]:
        step = int(getattr(trainer_state, "global_step", 0) or 0)
        rank = int(os.environ.get("RANK", "0"))
        return np.random.default_rng([self.seed, step, rank]).random(len(completions)).tolist()


# ---------------------------------------------------------------------------------------------
# The probe reward inside GRPOTrainer


class ProbeGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer + a reward from probes on the completion's hidden states.

    Takes GRPOTrainer's arguments with ``args`` a ``ProbeGRPOConfig`` (``probe_weight=0`` or a
    plain ``GRPOConfig`` is plain GRPO), and optionally ``probes=`` (a ``ProbeSet`` or a list of
    probes) in place of ``args.probe_path`` and ``reader_model=`` (the frozen reader; default
    the reference model TRL builds when ``beta > 0``). ``reward_funcs`` (task rewards) may be
    omitted when the probe reward is on. The probe reward is logged as ``rewards/probe/mean``,
    the mean probe probability as ``probe/prob``."""

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, *, probes: Any = None,
                 reader_model: Any = None, **kwargs: Any):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else \
            [reward_funcs] if reward_funcs is not None else []
        self._probes = None
        if getattr(args, "probe_weight", 0.0) > 0:
            self._probes, self._aggregation = self._load_probes(args, probes)
            probe_reward = self._probe_reward
            funcs.append(probe_reward)
            if args.reward_weights is None:
                args.reward_weights = [1.0] * (len(funcs) - 1) + [args.probe_weight]
        elif probes is not None:
            raise ValueError("ProbeGRPOTrainer(probes=...) needs args=ProbeGRPOConfig(probe_weight > 0, ...)")
        if not funcs:
            raise ValueError("ProbeGRPOTrainer needs a reward: reward_funcs= or probe_weight > 0")
        self._rollout_prompt_ids: list[list[int]] | None = None
        self._captured: dict[int, torch.Tensor] | None = None
        self._captured_ids: torch.Tensor | None = None
        self._capturing = False
        super().__init__(model, funcs, args, **kwargs)
        if self._probes is not None:
            from probe_dpo.training.trainers import check_probes_fit

            check_probes_fit(self._probes, self.model)
            self._layers = sorted({p.layer for p in self._probes})
            self._reader_model = None
            if args.probe_reader == "frozen":
                self._reader_model = reader_model if reader_model is not None else self.ref_model
                if self._reader_model is None:
                    raise ValueError("probe_reader='frozen' needs a frozen model: beta > 0 (TRL's reference "
                                     "model) or reader_model=")
                if reader_model is not None:
                    reader_model.requires_grad_(False).eval().to(self.accelerator.device)

    @staticmethod
    def _load_probes(args: Any, probes: Any) -> tuple[list, str]:
        from probe_dpo.errors import UserError
        from probe_dpo.probes import ProbeSet

        if probes is None:
            if not args.probe_path:
                raise UserError("probe_weight > 0 needs the probes: set probe_path or pass probes=")
            probes = ProbeSet.load(args.probe_path)
        aggregation = args.probe_aggregation
        if isinstance(probes, ProbeSet):
            aggregation = aggregation or probes.aggregation
            probes = probes.train_probes
        if not probes:
            raise UserError("the probe reward needs at least one train probe")
        return list(probes), aggregation or "mean"

    # -- where the states come from ---------------------------------------------------------

    def _reader(self) -> Any:
        return self.model if self.args.probe_reader == "policy" else self._reader_model

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        self._rollout_prompt_ids = out[0]  # the exact token ids the reward's forward reads
        return out

    def _generate_and_score_completions(self, inputs):
        self._captured, self._captured_ids, self._capturing = None, None, self._probes is not None
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._capturing = False

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           *args: Any, **kwargs: Any):
        if not (self._capturing and not torch.is_grad_enabled() and model is self._reader()):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        from probe_dpo.model import residual_hooks

        # a pass TRL runs anyway, in chunks of the batch: keep every chunk's states at the probes' layers
        with residual_hooks(model, self._layers, accumulate=True) as store:
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                             *args, **kwargs)
        self._captured = {i: torch.cat(chunks, 0) for i, chunks in store.items()}
        self._captured_ids = input_ids
        return out

    def _sequences(self, completion_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompt + completion ids, attention mask and completion mask, padded as TRL pads them
        (prompts on the left, completions on the right), so a TRL pass's states line up."""
        from trl.trainer.utils import pad

        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompts = [torch.tensor(p) for p in self._rollout_prompt_ids]
        comps = [torch.tensor(list(c)) for c in completion_ids]
        kw = dict(pad_to_multiple_of=self.pad_to_multiple_of)
        p_ids = pad(prompts, padding_value=pad_id, padding_side="left", **kw)
        p_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left", **kw)
        c_ids = pad(comps, padding_value=pad_id, padding_side="right", **kw)
        c_mask = pad([torch.ones_like(c) for c in comps], padding_value=0, padding_side="right", **kw)
        ids = torch.cat([p_ids, c_ids], 1).to(device)
        attention = torch.cat([p_mask, c_mask], 1).to(device)
        only_completion = torch.cat([torch.zeros_like(p_mask), c_mask], 1).to(device)
        return ids, attention, only_completion

    def probe_states(self, completion_ids: Sequence[Sequence[int]]) -> tuple[dict[int, torch.Tensor], torch.Tensor, str]:
        """The reader's states at the probes' layers on this rollout's prompt + completions, the
        completion mask, and whether a TRL pass was ``reused`` or an ``extra`` forward ran."""
        from probe_dpo.model import forward_until

        ids, attention, mask = self._sequences(completion_ids)
        if self._captured is not None and self._captured_ids is not None and \
                self._captured_ids.shape == ids.shape and torch.equal(self._captured_ids, ids):
            return self._captured, mask, "reused"
        reader = self._reader()
        with torch.no_grad():
            states = forward_until(reader, self._layers, input_ids=ids, attention_mask=attention)
        return states, mask, "extra"

    def _probe_reward(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence, **_: Any) -> list[float]:
        states, mask, how = self.probe_states(completion_ids)
        reward = probe_reward(states, mask, self._probes, form=self.args.probe_form,
                              threshold=self.args.probe_threshold, aggregation=self._aggregation)
        prob = probe_penalty(states, mask, self._probes, aggregation=self._aggregation, form="prob",
                             per_sequence=True)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["probe/prob"].append(self.accelerator.gather(prob.float().mean().reshape(1)).mean().item())
        self._metrics[mode][f"probe_reads/{how}"].append(1.0)
        return reward.float().cpu().tolist()

    _probe_reward.__name__ = "probe"


def probe_reward(states: dict[int, torch.Tensor], mask: torch.Tensor, probes: Sequence[Any], *, form: str = "prob",
                 threshold: float = 0.5, aggregation: str = "mean") -> torch.Tensor:
    """Minus ``form`` of the probes' pooled logit on each sequence's masked (completion) tokens:
    the penalty's forms, or ``threshold`` (the aggregated probability >= ``threshold``)."""
    if form == "threshold":
        prob = probe_penalty(states, mask, probes, aggregation=aggregation, form="prob", per_sequence=True)
        return -(prob >= threshold).to(prob.dtype)
    return -probe_penalty(states, mask, probes, aggregation=aggregation, form=form, per_sequence=True)


# ---------------------------------------------------------------------------------------------
# From a TrainConfig


def grpo_arguments(cfg: Any, generation: dict, *, output_dir: str, deepspeed: dict | None = None,
                   save_steps: int | None = -1, use_gpu: bool = False, tracking: dict | None = None,
                   progress_bar: bool = True) -> ProbeGRPOConfig:
    """The ``ProbeGRPOConfig`` of a ``TrainConfig``: the shared training arguments, the GRPO
    settings, the rollout's sampling settings (``generation``: a ``GenerationSettings`` dict)
    and the probe reward's fields, then the config's ``trl`` keys."""
    from probe_dpo.training.trainers import common_trainer_args

    common = common_trainer_args(cfg.train, output_dir=output_dir, seed=cfg.seed, use_gpu=use_gpu, deepspeed=deepspeed,
                          save_steps=save_steps, tracking=tracking, progress_bar=progress_bar)
    for key in ("max_length", "dataset_num_proc"):  # fields GRPOConfig does not have
        common.pop(key)
    g, s = cfg.grpo, generation
    probe = cfg.method == "probe-grpo"
    return ProbeGRPOConfig(**{
        **common, "beta": g.beta, "num_generations": g.generations, "max_completion_length": s["max_new_tokens"],
        "temperature": s["temperature"], "top_p": s["top_p"], "top_k": s["top_k"],
        "probe_path": cfg.probes if probe else None, "probe_weight": g.reward_weight if probe else 0.0,
        "probe_form": g.form, "probe_threshold": g.threshold, "probe_reader": g.reader,
        "probe_aggregation": cfg.aggregation, "reward_weights": None if probe else [g.reward_weight],
        **dict(getattr(cfg, "trl", None) or {})})


def build_grpo_trainer(model: Any, tokenizer: Any, records: Sequence[dict], cfg: Any, args: ProbeGRPOConfig, *,
                       callbacks: Sequence[Any] = (), probes: Any = None, reader_model: Any = None) -> ProbeGRPOTrainer:
    """A ``ProbeGRPOTrainer`` for ``cfg.method`` on prompt records: the probe reward
    (probe-grpo), the judge's (classifier-grpo) or the random control's (random-grpo)."""
    from datasets import Dataset

    from probe_dpo.training.trainers import lora_config

    rewards: list[Any] = []
    if cfg.method == "classifier-grpo":
        rewards = [JudgeReward(cfg.judge)]
    elif cfg.method == "random-grpo":
        rewards = [RandomReward(cfg.seed)]
    elif cfg.method != "probe-grpo":
        raise ValueError(f"not a GRPO method: {cfg.method!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in records])
    return ProbeGRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=data,
                            processing_class=tokenizer, callbacks=list(callbacks),
                            peft_config=lora_config(cfg.lora) if cfg.lora.enabled else None,
                            probes=probes, reader_model=reader_model)
