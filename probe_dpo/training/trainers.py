"""TRL trainers and configs with the probe penalty (and SFT's KL anchor), and the DeepSpeed config.

``ProbeDPOTrainer`` / ``ProbeSFTTrainer`` are TRL's ``DPOTrainer`` / ``SFTTrainer`` with
``compute_loss`` overridden, configured by ``ProbeDPOConfig`` / ``ProbeSFTConfig``: TRL's
``DPOConfig`` / ``SFTConfig`` plus the penalty's fields (``probe_path``, ``probe_weight``,
``probe_form``, ``probe_reduce``, ``probe_aggregation`` and, for DPO, ``probe_tokens``), so
``TrlParser`` fills them from the command line like any other TRL field. They work in a plain
TRL script under ``accelerate launch`` (``examples/trl_probe_dpo.py``) as in the Ray Train
loop. While TRL's own loss runs, forward hooks on the probes' layers of the (unwrapped) policy
record the residual stream of the pass run with gradients (the reference pass of DPO runs
under ``no_grad`` and is skipped); then

    loss = TRL loss + λ · penalty(probe logit)

where the penalty (``probe_form``: probability, log-loss or logit) is the frozen training
probes' (aggregated over an ensemble) on the policy's states, pooled over the completion tokens
(DPO: both completions of each pair, or the chosen one; SFT on prompt/completion data: the
completion) or over every real token of a plain-text SFT sequence. The mean penalty of each
logged step is in the logs as ``probe_penalty``. With λ = 0 (the default) they ARE the TRL
trainers (no probe is loaded, no hook is registered).

``ProbeSFTConfig.kl_weight`` > 0 adds a KL anchor to the SFT loss: kl_weight x the mean, over the
target tokens, of KL(policy || reference), the reference a frozen copy of the starting model (or,
with LoRA, the base weights under the adapters); logged as ``kl_anchor``. TRL's fused LM head
builds no logits, so with the anchor the trainer's ``compute_loss_func`` computes TRL's loss from
the full logits and keeps their log-softmax.

The callbacks of the Ray Train loop (the EMA of the weights, ...) are in ``callbacks``.

``build_trainer`` assembles either trainer from plain records and a ``TrainConfig`` (through
``training_arguments``, which makes the ``ProbeDPOConfig`` / ``ProbeSFTConfig``); the Ray
Train loop (``probe_dpo.training.loop``), the benchmark and the tests all go through it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from probe_dpo.errors import UserError
from probe_dpo.objectives import PENALTY_FORMS, PenaltyRecorder, probe_penalty

log = logging.getLogger(__name__)

PENALTY_REDUCES = ("pooled", "token")
PENALTY_TOKENS = ("completions", "chosen")
AGGREGATIONS = ("mean", "max")


# ---------------------------------------------------------------------------------------------
# The configs: TRL's, plus the probe penalty's fields


@dataclass
class _ProbePenaltyFields:
    """The penalty's fields, shared by ``ProbeDPOConfig`` and ``ProbeSFTConfig`` (listed after
    TRL's own fields, so ``output_dir`` stays the first positional argument)."""

    probe_path: str | None = field(default=None, metadata={
        "help": "A probe set folder or URI (as probe_dpo.probes.ProbeSet.load reads, e.g. what `probe-dpo "
                "probes train` publishes): its train probes are the penalty. Read when probe_weight > 0, "
                "unless the trainer is given probes=."})
    probe_weight: float = field(default=0.0, metadata={
        "help": "λ: the loss is TRL's loss + λ · probe penalty. 0 (the default) is plain TRL training."})
    probe_form: Literal["prob", "logit", "bce"] = field(default="prob", metadata={
        "help": "How each probe logit becomes the penalty: prob (the sigmoid probability; its gradient p(1-p) "
                "vanishes where the probe is confident), bce (-log(1-p), gradient p) or logit (the raw logit, "
                "a constant push)."})
    probe_reduce: Literal["pooled", "token"] = field(default="pooled", metadata={
        "help": "pooled: each probe on the masked mean of its layer's states (what it was trained on); "
                "token: the mean of per-token penalties."})
    probe_aggregation: Literal["mean", "max"] | None = field(default=None, metadata={
        "help": "How an ensemble of train probes is combined. None: the probe set's own setting (mean for "
                "probes given as a list)."})

    def _check_probe_fields(self) -> None:
        if self.probe_weight is None or float(self.probe_weight) < 0:
            raise ValueError(f"probe_weight must be >= 0, got {self.probe_weight!r}")
        self.probe_weight = float(self.probe_weight)
        for name, allowed in (("probe_form", PENALTY_FORMS), ("probe_reduce", PENALTY_REDUCES),
                              ("probe_tokens", PENALTY_TOKENS)):
            value = getattr(self, name, allowed[0])
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.probe_aggregation is not None and self.probe_aggregation not in AGGREGATIONS:
            raise ValueError(f"probe_aggregation must be one of {', '.join(AGGREGATIONS)} or None, "
                             f"got {self.probe_aggregation!r}")

    def __post_init__(self):
        super().__post_init__()  # TRL's config (this class is only used before a TRL config in the MRO)
        self._check_probe_fields()


@dataclass
class ProbeDPOConfig(_ProbePenaltyFields, DPOConfig):
    """TRL's ``DPOConfig`` + the probe penalty (``probe_*`` fields) of ``ProbeDPOTrainer``."""

    probe_tokens: Literal["completions", "chosen"] = field(default="completions", metadata={
        "help": "Whose states the penalty reads: both completions of each pair, or the chosen one only."})


@dataclass
class ProbeSFTConfig(_ProbePenaltyFields, SFTConfig):
    """TRL's ``SFTConfig`` + the probe penalty (``probe_*`` fields) and the KL anchor (``kl_weight``)
    of ``ProbeSFTTrainer``."""

    kl_weight: float = field(default=0.0, metadata={
        "help": "The loss adds kl_weight x the mean, over the tokens the loss reads, of KL(policy || ref_model); "
                "0 (the default): no anchor, no reference model."})


# ---------------------------------------------------------------------------------------------
# The probe penalty in TRL's compute_loss


@dataclass(frozen=True)
class PenaltySpec:
    """The probe penalty a trainer adds, resolved once from its ``probe_*`` args and the probes
    (λ > 0: a trainer with λ = 0 has none)."""

    recorder: PenaltyRecorder  # records the states at the probes' layers; its probes are the penalty's
    weight: float              # λ
    reduce: str                # pooled | token
    tokens: str                # completions | chosen (DPO)
    aggregation: str           # mean | max over an ensemble
    form: str                  # prob | logit | bce


def check_probes_fit(probes: Sequence[Any], model: Any) -> None:
    """UserError unless the penalty's (or reward's) probes fit the loaded model
    (``probe_dpo.model.check_fit``; the trainers' and GRPO's one wording)."""
    from probe_dpo.model import check_fit

    check_fit(probes, model, where="the trainer's probes")


class _ProbePenaltyMixin:
    """Adds ``probe_weight · probe_penalty`` to TRL's loss, configured by the trainer's args.

    ``probes``: the penalty's probes as objects (a ``ProbeSet``, whose train probes are used,
    or a list of ``LinearProbe``) instead of loading ``args.probe_path``.
    """

    _penalty: PenaltySpec | None = None

    def __init__(self, *args: Any, probes: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._penalty = self._penalty_from_args(probes)

    def _penalty_from_args(self, probes: Any) -> PenaltySpec | None:
        args = self.args
        if not hasattr(args, "probe_weight"):
            if probes is not None:
                raise ValueError(f"{type(self).__name__}(probes=...) needs the penalty's settings: pass args="
                                 f"{self._config_class.__name__}(probe_weight=..., ...), not {type(args).__name__}")
            return None  # a plain TRL config: the plain TRL trainer
        if args.probe_weight <= 0:
            return None
        from probe_dpo.probes import ProbeSet

        if probes is None:
            if not args.probe_path:
                raise UserError(f"probe_weight={args.probe_weight} needs the probes: set probe_path (a probe set "
                                f"folder) or pass probes= to {type(self).__name__}")
            probes = ProbeSet.load(args.probe_path)
        aggregation = args.probe_aggregation
        if isinstance(probes, ProbeSet):
            aggregation = aggregation or probes.aggregation
            where = f"probes {probes.uri}" if probes.uri else "the probe set"
            probes = probes.train_probes
            if not probes:
                raise UserError(f"{where} has no train probes for the penalty")
        probes = list(probes)
        check_probes_fit(probes, self.model)
        return PenaltySpec(recorder=PenaltyRecorder(probes), weight=float(args.probe_weight), reduce=args.probe_reduce,
                           tokens=getattr(args, "probe_tokens", "completions"), aggregation=aggregation or "mean",
                           form=args.probe_form)

    def _penalty_mask(self, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._penalty is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        spec = self._penalty
        with spec.recorder.recording(model) as store:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if not store or not torch.is_grad_enabled():
            return result  # evaluation under no_grad: no penalty
        loss, outputs = result if return_outputs else (result, None)
        mask = self._penalty_mask(inputs)
        hidden = {layer: h[:mask.shape[0]] for layer, h in store.items()}
        penalty = probe_penalty(hidden, mask.to(next(iter(hidden.values())).device), spec.recorder.probes,
                                reduce=spec.reduce, aggregation=spec.aggregation, form=spec.form)
        loss = loss + (spec.weight * self._added_term_scale(num_items_in_batch)) * penalty.to(loss.dtype)
        self._log_term("probe_penalty", penalty)
        return (loss, outputs) if return_outputs else loss

    def _added_term_scale(self, num_items_in_batch: Any) -> float:
        """What a term added to TRL's loss is multiplied by: 1/accumulation steps where Trainer will not
        divide the loss by them (TRL scaled its own loss by the batch's token count already)."""
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = bool(getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        if scaled_for_ga:
            return 1.0 / max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        return 1.0

    def _log_term(self, name: str, value: torch.Tensor) -> None:
        """Log an added term beside TRL's metrics (the mean over the processes, as TRL logs its own)."""
        mode = "train" if self.model.training else "eval"
        if hasattr(self, "_metrics"):
            self._metrics[mode][name].append(self.accelerator.gather(value.detach().reshape(1)).mean().item())


class ProbeDPOTrainer(_ProbePenaltyMixin, DPOTrainer):
    """TRL's DPOTrainer + the differentiable probe penalty on the policy's completion states.

    Takes DPOTrainer's arguments, with ``args`` a ``ProbeDPOConfig`` (a plain ``DPOConfig``
    trains plain DPO), and optionally ``probes=`` (a ``ProbeSet`` or a list of probes) in place
    of ``args.probe_path``."""

    _config_class = ProbeDPOConfig

    def _penalty_mask(self, inputs: dict) -> torch.Tensor:
        mask = inputs["completion_mask"]
        if self._penalty.tokens == "chosen":
            return mask[: mask.shape[0] // 2]  # the batch is [chosen; rejected]
        return mask


class ProbeSFTTrainer(_ProbePenaltyMixin, SFTTrainer):
    """TRL's SFTTrainer + the probe penalty on the tokens the loss reads.

    Takes SFTTrainer's arguments, with ``args`` a ``ProbeSFTConfig`` (a plain ``SFTConfig``
    trains plain SFT), and optionally ``probes=``. The penalty reads the completion's tokens
    for prompt/completion data (TRL masks the prompt's labels with -100) and every real token
    of a plain-text row: the labels say which, so the probe reads the same span it was trained
    on (a response-span probe, the completion)."""

    _config_class = ProbeSFTConfig

    def __init__(self, *args: Any, ref_model: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ref_model, self._log_p = None, None
        if getattr(self.args, "kl_weight", 0.0) > 0:
            if ref_model is None and not hasattr(self.model, "disable_adapter"):
                raise UserError("kl_weight > 0 needs the reference model: pass ref_model= (or train LoRA adapters, "
                                "whose base weights are the reference)")
            if ref_model is not None:
                self._ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
            # TRL's fused LM head builds no logits; with a compute_loss_func TRL runs the model with them,
            # and the anchor needs them (with their graph)
            self.compute_loss_func = self._nll_keeping_log_probs

    def _penalty_mask(self, inputs: dict) -> torch.Tensor:
        if inputs.get("completion_mask") is not None:
            return inputs["completion_mask"]
        return (inputs["labels"] != -100).long()

    def _nll_keeping_log_probs(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """TRL's SFT loss (the mean negative log-likelihood of the target tokens) from full logits; their
        log-softmax is kept for the KL anchor."""
        targets = labels[:, 1:]
        mask = targets != -100
        log_p = self._log_p = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
        nll = -log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return nll.sum() / torch.as_tensor(count, device=nll.device).clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = getattr(self.args, "kl_weight", 0.0)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        log_p, self._log_p = self._log_p, None
        if weight <= 0 or log_p is None or not torch.is_grad_enabled():
            return result
        loss, outputs = result if return_outputs else (result, None)
        kl = self._kl_to_reference(model, inputs, log_p)
        loss = loss + (weight * self._added_term_scale(num_items_in_batch)) * kl.to(loss.dtype)
        self._log_term("kl_anchor", kl)
        return (loss, outputs) if return_outputs else loss

    def _kl_to_reference(self, model: Any, inputs: dict, log_p: torch.Tensor) -> torch.Tensor:
        """Mean over the target tokens of KL(policy || reference) of the next-token distributions
        (position t predicts token t+1; ``log_p``: the policy's log-softmax at positions 0..T-2)."""
        forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if inputs.get(k) is not None}
        with torch.no_grad():
            if self._ref_model is not None:
                ref_logits = self._ref_model(**forward).logits
            else:  # LoRA: the base weights under the adapters are the reference
                with self.accelerator.unwrap_model(model).disable_adapter():
                    ref_logits = model(**forward).logits
        mask = (inputs["labels"][:, 1:] != -100).to(log_p.device).float()
        log_q = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Building a trainer


def deepspeed_config(zero_stage: int, *, offload: bool = False, bf16: bool = False) -> dict:
    """A DeepSpeed config whose batch/optimizer values come from the TrainingArguments ("auto").

    The optimizer is DeepSpeed's AdamW with ``torch_adam`` (nothing is JIT-compiled).
    """
    zero: dict[str, Any] = {"stage": int(zero_stage)}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}},
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload and zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the offloaded fp32 state
    return cfg


def common_trainer_args(train: Any, *, output_dir: str, seed: int, use_gpu: bool, deepspeed: dict | None,
                 save_steps: int | None, logging_steps: int = 1, tracking: dict | None = None,
                 progress_bar: bool = True) -> dict:
    args = dict(
        output_dir=output_dir, seed=seed, data_seed=seed,
        per_device_train_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs, max_steps=train.max_steps if train.max_steps else -1,
        learning_rate=train.lr, warmup_steps=train.warmup_ratio, weight_decay=train.weight_decay,
        lr_scheduler_type=train.scheduler, max_grad_norm=train.max_grad_norm,
        gradient_checkpointing=train.gradient_checkpointing, max_length=train.max_length,
        logging_steps=logging_steps, report_to=[], disable_tqdm=not progress_bar, save_only_model=False,
        bf16=bool(use_gpu), fp16=False, use_cpu=not use_gpu, dataloader_num_workers=0,
        save_total_limit=1, dataset_num_proc=None,
    )
    if save_steps is None:
        args.update(save_strategy="epoch")
    elif save_steps <= 0:
        args.update(save_strategy="no")
    else:
        args.update(save_strategy="steps", save_steps=save_steps)
    if deepspeed is not None:
        args["deepspeed"] = deepspeed
    args.update(tracking or {})  # report_to, run_name, logging_dir (probe_dpo.tracking.trainer_args)
    return args


def lora_config(lora: Any):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none")


def _penalty_args(cfg: Any, kind: str) -> dict:
    """The ``probe_*`` fields of a ``TrainConfig``'s penalty (the probes load in the trainer)."""
    args = dict(probe_path=cfg.probes, probe_weight=cfg.penalty_weight, probe_form=cfg.penalty.form,
                probe_reduce=cfg.penalty.reduce, probe_aggregation=cfg.aggregation)
    if kind == "dpo":
        args["probe_tokens"] = cfg.penalty.tokens
    return args


def training_arguments(kind: str, cfg: Any, *, output_dir: str, deepspeed: dict | None = None,
                       save_steps: int | None = -1, use_gpu: bool = False, tracking: dict | None = None,
                       progress_bar: bool = True):
    """The ``ProbeDPOConfig`` / ``ProbeSFTConfig`` of a ``TrainConfig``: TRL's settings, the
    penalty's (``probe_path``, ``probe_weight``, ...) and last the ``trl`` keys of the config
    (any other field of TRL's config, checked when the config loaded).

    Made BEFORE the models are loaded when DeepSpeed runs ZeRO-3: the arguments register the
    DeepSpeed config with transformers, so ``from_pretrained`` builds the model under
    ``deepspeed.zero.Init`` and every rank only ever holds its own shard of the weights.
    ``tracking``: keys from ``probe_dpo.tracking.trainer_args`` (TRL's ``report_to``: W&B,
    MLflow, TensorBoard); None reports nowhere. ``progress_bar``: TRL's tqdm bar
    (``trl.disable_tqdm`` in the config still decides when set).
    """
    common = common_trainer_args(cfg.train, output_dir=output_dir, seed=cfg.seed, use_gpu=use_gpu, deepspeed=deepspeed,
                          save_steps=save_steps, tracking=tracking, progress_bar=progress_bar)
    common.update(_penalty_args(cfg, kind))
    extra = dict(getattr(cfg, "trl", None) or {})
    if kind == "dpo":
        return ProbeDPOConfig(**{**common, "beta": cfg.dpo.beta, "loss_type": [cfg.dpo.loss_type],
                                 "precompute_ref_log_probs": cfg.dpo.precompute_ref_log_probs, **extra})
    if kind == "sft":
        return ProbeSFTConfig(**{**common, "dataset_text_field": "text", "packing": False,
                                 "kl_weight": cfg.sft.kl_weight, **extra})
    raise ValueError(f"unknown trainer kind {kind!r}")


def build_trainer(kind: str, model: Any, tokenizer: Any, records: Sequence[dict], cfg: Any, *,
                  output_dir: str, ref_model: Any = None, probes: Any = None,
                  callbacks: Sequence[Any] = (), deepspeed: dict | None = None, save_steps: int | None = -1,
                  use_gpu: bool = False, args: Any = None, tracking: dict | None = None):
    """A ``ProbeDPOTrainer`` (``kind="dpo"``, records with prompt/chosen/rejected) or a
    ``ProbeSFTTrainer`` (``kind="sft"``, records with text or prompt/completion) configured
    from a ``TrainConfig`` (``args``: arguments made earlier by ``training_arguments``).

    The penalty is the config's (``penalty.weight``; 0 trains plain TRL), on the train probes
    of ``cfg.probes``, or on ``probes`` when given (a ``ProbeSet`` or a list of probes).
    ``tracking``: ``report_to`` keys for arguments made here (see ``training_arguments``).
    """
    from datasets import Dataset

    if args is None:
        args = training_arguments(kind, cfg, output_dir=output_dir, deepspeed=deepspeed, save_steps=save_steps,
                                  use_gpu=use_gpu, tracking=tracking)
    peft_config = lora_config(cfg.lora) if cfg.lora.enabled else None
    from probe_dpo.chat import trl_pair, trl_sft_row

    if kind == "dpo":  # TRL's standard (strings) or conversational (messages: its chat template) format
        data = Dataset.from_list([trl_pair(r) for r in records])
        return ProbeDPOTrainer(model=model, ref_model=None if peft_config is not None else ref_model, args=args,
                               train_dataset=data, processing_class=tokenizer, callbacks=list(callbacks),
                               peft_config=peft_config, probes=probes)
    if kind == "sft":
        # text, messages (a conversation) or prompt/completion (loss and penalty on the completion)
        data = Dataset.from_list([trl_sft_row(r) for r in records])
        return ProbeSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                               callbacks=list(callbacks), peft_config=peft_config, probes=probes,
                               ref_model=None if peft_config is not None else ref_model)
    raise ValueError(f"unknown trainer kind {kind!r}")
