"""TRL trainers and configs with the probe penalty, the EMA of the weights, and the DeepSpeed config.

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

``EMACallback`` keeps an exponential moving average of the trainable weights in parameter
space (fp32, rank 0), writes it into every checkpoint (``ema.safetensors``) and restores it
on resume, so the saved EMA is the EMA of the whole trajectory even across a restart.

``build_trainer`` assembles either trainer from plain records and a ``TrainConfig`` (through
``training_arguments``, which makes the ``ProbeDPOConfig`` / ``ProbeSFTConfig``); the Ray
Train loop (``probe_dpo.training.loop``), the benchmark and the tests all go through it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from probe_dpo.errors import UserError
from probe_dpo.objectives import PENALTY_FORMS, PenaltyRecorder, probe_penalty

EMA_FILE = "ema.safetensors"
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
    """TRL's ``SFTConfig`` + the probe penalty (``probe_*`` fields) of ``ProbeSFTTrainer``."""


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
        scale = 1.0
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = bool(getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        if scaled_for_ga:  # Trainer will not divide by the accumulation steps: do it for the penalty
            scale = 1.0 / max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        loss = loss + (spec.weight * scale) * penalty.to(loss.dtype)
        mode = "train" if self.model.training else "eval"
        if hasattr(self, "_metrics"):  # the mean over the processes, as TRL logs its own metrics
            self._metrics[mode]["probe_penalty"].append(
                self.accelerator.gather(penalty.detach().reshape(1)).mean().item())
        return (loss, outputs) if return_outputs else loss


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

    def _penalty_mask(self, inputs: dict) -> torch.Tensor:
        if inputs.get("completion_mask") is not None:
            return inputs["completion_mask"]
        return (inputs["labels"] != -100).long()


# ---------------------------------------------------------------------------------------------
# EMA of the weights


def _zero3_params(params: list) -> Any:
    """A context gathering ZeRO-3 partitioned parameters (a no-op otherwise)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMACallback(TrainerCallback):
    """``ema = decay · ema + (1 - decay) · w`` after every optimizer step, from the initial weights.

    Tracks the trainable parameters (all of them for full fine-tuning, the adapter for LoRA)
    in fp32 on CPU on the main process. ``resume_dir``: a checkpoint folder whose
    ``ema.safetensors`` is loaded instead of starting from the current weights.
    """

    def __init__(self, decay: float, resume_dir: str | None = None):
        self.decay = float(decay)
        self.resume_dir = resume_dir
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0

    @staticmethod
    def _named(model) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        named = self._named(model)
        if self.resume_dir and os.path.exists(os.path.join(self.resume_dir, EMA_FILE)):
            if state.is_world_process_zero:
                from safetensors.torch import load_file

                loaded = load_file(os.path.join(self.resume_dir, EMA_FILE))
                missing = [n for n, _ in named if n not in loaded]
                if missing:
                    raise RuntimeError(f"{EMA_FILE} in {self.resume_dir} lacks {missing[:3]}")
                self.shadow = {n: loaded[n].float() for n, _ in named}
                self.updates = int(state.global_step)
            return
        params = [p for _, p in named]
        with _zero3_params(params):
            if state.is_world_process_zero:
                self.shadow = {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        named = self._named(model)
        with _zero3_params([p for _, p in named]), torch.no_grad():
            if state.is_world_process_zero and self.shadow is not None:
                d = self.decay
                for n, p in named:
                    self.shadow[n].mul_(d).add_(p.detach().to("cpu", torch.float32), alpha=1.0 - d)
                self.updates += 1

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.shadow is not None:
            from safetensors.torch import save_file

            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_file({n: t.contiguous() for n, t in self.shadow.items()}, os.path.join(folder, EMA_FILE),
                      metadata={"decay": str(self.decay), "step": str(state.global_step)})


class CrashCallback(TrainerCallback):
    """Fault injection: the worker of ``rank`` exits hard after optimizer step ``step``, once.

    Only on a run that did not resume from a checkpoint, so the restarted run gets past it.
    It waits a moment first so the controller registers the checkpoint reported before.
    """

    def __init__(self, step: int, rank: int, world_rank: int, resumed: bool, wait_s: float = 2.0):
        self.step, self.rank, self.world_rank, self.resumed, self.wait_s = step, rank, world_rank, resumed, wait_s

    def on_step_end(self, args, state, control, **kwargs):
        if not self.resumed and self.world_rank == self.rank and state.global_step == self.step:
            log.warning(f"fault injection: rank {self.rank} exits at step {self.step}")
            time.sleep(self.wait_s)
            os._exit(17)


class SkipFinalCheckpoint(TrainerCallback):
    """No checkpoint after the last optimizer step.

    A checkpoint exists to resume the round; the one the last step would write is resumed by
    nothing when the round's checkpoints are removed once its policy is published
    (``distributed.keep_finished_checkpoints: false``): a re-run skips a published round.
    Writing it cost a full-weight DPO round about 10 s of its 73 (the ZeRO weights and
    optimizer state, then Ray's copy into storage). Earlier checkpoints (``checkpoint_steps``,
    earlier epochs) are written as before.
    """

    @staticmethod
    def _last(state) -> bool:
        return state.max_steps > 0 and state.global_step >= state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self._last(state):
            control.should_save = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._last(state):
            control.should_save = False


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
        return ProbeSFTConfig(**{**common, "dataset_text_field": "text", "packing": False, **extra})
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
                               callbacks=list(callbacks), peft_config=peft_config, probes=probes)
    raise ValueError(f"unknown trainer kind {kind!r}")
