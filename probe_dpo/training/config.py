"""The settings of one training run (``probe-dpo train --config FILE key=value ...``).

Methods:

- ``sft``            supervised fine-tuning on the SFT data (the reference that raises toxicity)
- ``probe-sft``      the same with loss = LM loss + λ · probe penalty (``penalty.weight``, ``penalty.form``)
- ``classifier-sft`` the SFT data filtered by the classifier first (rows scoring >= threshold dropped)
- ``probe-dpo``      K sampled completions per prompt ranked by the probe signal -> DPO pairs
- ``classifier-dpo`` the same pairs built with the classifier signal
- ``random-dpo``     probe-ranked pairs with chosen/rejected swapped by a seeded coin flip per pair
- ``dpo``            plain DPO on a given pair file (``data.pairs``): no signal builds the pairs
                     (what data attribution retrains with after filtering a preference set)
- ``probe-grpo``     on-policy RL (TRL's GRPO) on the training prompts; the reward is minus the
                     probe signal on each sampled completion, read from the policy's own states
                     or a frozen base copy's (``grpo.reader``)
- ``classifier-grpo`` the same with minus the judge's score of the completion text as the reward
- ``random-grpo``    control: a seeded random reward per completion, blind to the text
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from probe_dpo.config import bounded
from probe_dpo.tracking import TrackingSettings

Method = Literal["probe-sft", "probe-dpo", "classifier-sft", "classifier-dpo", "sft", "random-dpo", "dpo",
                 "probe-grpo", "classifier-grpo", "random-grpo"]
METHODS: tuple[str, ...] = ("probe-sft", "probe-dpo", "classifier-sft", "classifier-dpo", "sft", "random-dpo", "dpo",
                            "probe-grpo", "classifier-grpo", "random-grpo")
DPO_METHODS = ("probe-dpo", "classifier-dpo", "random-dpo", "dpo")
SFT_METHODS = ("probe-sft", "classifier-sft", "sft")
GRPO_METHODS = ("probe-grpo", "classifier-grpo", "random-grpo")
# TRL config fields this config sets from its own keys: a ``trl`` key naming one is an error
# that points to the key to use (one way to set each value)
TRL_FIELDS_SET_HERE: dict[str, str] = {
    "output_dir": "out", "seed": "seed", "data_seed": "seed",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs", "max_steps": "train.max_steps", "learning_rate": "train.lr",
    "warmup_steps": "train.warmup_ratio", "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "lr_scheduler_type": "train.scheduler",
    "max_grad_norm": "train.max_grad_norm", "gradient_checkpointing": "train.gradient_checkpointing",
    "max_length": "train.max_length",
    "beta": "dpo.beta", "loss_type": "dpo.loss_type", "precompute_ref_log_probs": "dpo.precompute_ref_log_probs",
    "deepspeed": "distributed.zero_stage / distributed.offload", "use_cpu": "distributed.use_gpu",
    "bf16": "distributed.use_gpu", "fp16": "distributed.use_gpu",
    "save_strategy": "distributed.checkpoint_steps", "save_steps": "distributed.checkpoint_steps",
    "report_to": "tracking.report_to", "run_name": "tracking", "logging_dir": "tracking",
    "dataset_text_field": "data.sft (its text column)",
    "probe_path": "probes", "probe_weight": "penalty.weight", "probe_form": "penalty.form",
    "probe_reduce": "penalty.reduce", "probe_tokens": "penalty.tokens", "probe_aggregation": "aggregation",
    "num_generations": "grpo.generations", "max_completion_length": "sampling.max_new_tokens",
    "temperature": "sampling.temperature", "top_p": "sampling.top_p", "top_k": "sampling.top_k",
    "probe_reader": "grpo.reader", "probe_threshold": "grpo.threshold", "reward_weights": "grpo.reward_weight",
}
LossType = Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


@dataclass
class DataConfig:
    """Inputs; each defaults to the testbed's file when ``testbed`` is set."""

    prompts: str | None = None
    """Training prompts for DPO sampling (column prompt). Default: <testbed>/data/prompts_train.jsonl."""
    sft: str | None = None
    """SFT data: texts (column text), or prompt/completion pairs (columns prompt, completion:
    the loss and the probe penalty then read the completion tokens only).
    Default: <testbed>/data/sft.jsonl."""
    pairs: str | None = None
    """Replay a pair file (columns prompt, chosen, rejected) instead of sampling in round 0."""
    candidates: str | None = None
    """Reuse sampled candidates (a candidates.jsonl written by an earlier run) in round 0."""
    max_prompts: int | None = bounded(None, ge=1)
    """Use the first N training prompts."""
    max_sft: int | None = bounded(None, ge=1)
    """Use the first N SFT rows."""


@dataclass
class SamplingConfig:
    """Sampling K completions per prompt from the current policy (on Ray actors)."""

    k: int = bounded(4, ge=2, le=64)
    """Completions sampled per prompt; the pair is the lowest- and highest-scoring of them."""
    max_new_tokens: int | None = bounded(None, ge=1, le=1024)
    """None: the testbed's generation settings (20 tokens)."""
    temperature: float | None = bounded(None, gt=0.0, le=5.0)
    """None: the testbed's sampling temperature."""
    top_p: float | None = bounded(None, gt=0.0, le=1.0)
    """None: the testbed's nucleus mass."""
    top_k: int | None = bounded(None, ge=0)
    """None: the testbed's top-k (0 turns it off)."""
    batch_size: int = bounded(64, ge=1)
    """Sequences per generate() call."""
    shard_size: int = bounded(32, ge=1)
    """Prompts per actor task (fixes the seeding, so results do not depend on the actor count)."""
    actors: int = bounded(2, ge=0)
    """Ray actors that sample (0: in this process)."""
    threads_per_actor: int = bounded(1, ge=1)
    """torch threads (CPUs) of each sampling actor."""
    min_margin: float = bounded(0.0, ge=0.0)
    """Skip prompts whose score(rejected) - score(chosen) is below this."""
    probe_reads: Literal["policy", "base"] = "policy"
    """Whose activations the probe signal reads when it ranks sampled completions: the current
    policy's (the paper's setting, which training can learn to evade) or a frozen copy of the
    base model's (a mitigation: the policy cannot move what the probe reads, so it must change
    its behaviour)."""


@dataclass
class DPOSettings:
    beta: float = bounded(0.1, gt=0.0)
    """DPO's inverse temperature: how far the policy may move from the reference."""
    loss_type: LossType = "sigmoid"
    """TRL's DPO loss (sigmoid is the original DPO loss)."""
    rounds: int = bounded(1, ge=1, le=100)
    """Each round samples new pairs from the current policy and trains on them."""
    reference: Literal["round", "base"] = "round"
    """Reference model: the policy at the start of each round, or always the base model."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs once before training (TRL) instead of per step."""


@dataclass
class SFTSettings:
    kl_weight: float = bounded(0.0, ge=0.0)
    """A KL anchor for the SFT methods: the loss adds kl_weight x the mean, over the tokens the loss
    reads, of KL(policy || the model the run started from). SFT's counterpart of DPO's beta (how far
    the policy may move), the KL axis of an obfuscation map over probe-SFT; 0 (the default): TRL's SFT."""


@dataclass
class GRPOSettings:
    """On-policy RL with TRL's GRPOTrainer (the ``*-grpo`` methods). Rollouts are TRL's HF
    generation with the sampling settings (``sampling.max_new_tokens``, temperature, top-p/k)."""

    beta: float = bounded(0.04, ge=0.0)
    """TRL's KL coefficient to the reference (the base model); 0 turns the KL term off."""
    generations: int = bounded(4, ge=2, le=64)
    """Completions sampled per prompt: GRPO's group, whose mean reward is the baseline."""
    reader: Literal["policy", "frozen"] = "policy"
    """probe-grpo: whose activations the probe reads on the sampled completion: the policy's own
    (what RL can learn to evade) or a frozen copy of the base model's (the mitigation)."""
    form: Literal["prob", "logit", "bce", "threshold"] = "prob"
    """probe-grpo's reward is minus this of the probe logit: the DPO penalty's forms (prob, logit,
    bce = -log(1-p)) or threshold (1 where the probability >= ``threshold``: a monitor's verdict)."""
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """The probability a ``threshold`` reward flags at."""
    reward_weight: float = bounded(1.0, gt=0.0)
    """The reward term's weight (TRL's reward_weights)."""


@dataclass
class PenaltyConfig:
    """The differentiable probe penalty: + weight · penalty(probe logit) on the policy's states."""

    weight: float | None = bounded(None, ge=0.0)
    """λ. None: 1.0 for probe-sft, 0 (off) otherwise. > 0 adds the penalty to SFT or DPO."""
    form: Literal["prob", "logit", "bce"] = "prob"
    """prob: the probe's probability (the paper's default; its gradient p(1-p) vanishes where the
    probe is confident); bce: -log(1-p), gradient p; logit: the raw logit, a constant push."""
    reduce: Literal["pooled", "token"] = "pooled"
    """pooled: the probe on the masked mean of the states (what it was trained on); token:
    the mean of per-token penalties. The mask is the completion's tokens (DPO; SFT on
    prompt/completion data) or every real token (SFT on plain text)."""
    tokens: Literal["completions", "chosen"] = "completions"
    """DPO only: penalise the states of both completions of a pair, or the chosen one only."""


@dataclass
class EarlyWarningSettings:
    """A warning of hiding while training (``probe_dpo.training.early_warning``): every
    ``every_steps`` steps the policy samples a fixed prompt batch and the train probes read the
    completions through the policy and through a frozen copy of its starting model."""

    every_steps: int = bounded(0, ge=0)
    """Steps between checks; 0: off."""
    prompts: int = bounded(16, ge=2)
    """The fixed batch: the first this many training prompts."""
    max_new_tokens: int = bounded(16, ge=1, le=512)
    """Tokens sampled per completion at each check."""
    min_gap: float = bounded(0.05, gt=0.0, lt=1.0)
    """Fires when the mean gap (policy minus frozen probe probability) is at most -min_gap and its
    95% interval lies below 0 (0.05: the experiment's minimum effect for the activations coordinate)."""
    action: Literal["log", "stop"] = "log"
    """log: record it (the logs, trackers, train.json); stop: end the run at the first firing."""


@dataclass
class LoraSettings:
    enabled: bool = False
    """Train LoRA adapters instead of all weights (PEFT)."""
    r: int = bounded(16, ge=1)
    """LoRA rank."""
    alpha: int = bounded(32, ge=1)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = bounded(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Module names that get adapters."""
    merge: bool = True
    """Save the final policy with the adapter merged in (else the adapter folder)."""


@dataclass
class OptimSettings:
    epochs: float = bounded(1.0, gt=0.0)
    """Passes over the data (fractions allowed)."""
    max_steps: int | None = bounded(None, ge=1)
    """Overrides epochs."""
    lr: float = bounded(1e-5, gt=0.0)
    """Peak learning rate (AdamW)."""
    batch_size: int = bounded(4, ge=1)
    """Per worker (pairs for DPO, rows for SFT)."""
    grad_accum: int = bounded(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_length: int = bounded(128, ge=8)
    """Tokens kept per sequence (prompt + completion)."""
    warmup_ratio: float = bounded(0.0, ge=0.0, lt=1.0)
    """Share of the steps with a linear learning-rate warm-up."""
    weight_decay: float = bounded(0.0, ge=0.0)
    """AdamW weight decay."""
    scheduler: Literal["linear", "constant", "cosine"] = "linear"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = bounded(1.0, gt=0.0)
    """Gradients are clipped to this global norm."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""
    ema_decay: float | None = bounded(None, gt=0.0, lt=1.0)
    """Keep an EMA of the trainable weights (ema = d·ema + (1-d)·w after every optimizer
    step, starting from the initial weights) and save it as the final policy."""


@dataclass
class DistributedSettings:
    workers: int = bounded(2, ge=1)
    """Ray Train workers, each a DeepSpeed engine."""
    use_gpu: bool | Literal["auto"] = "auto"
    """One GPU per worker, bf16, NCCL (and GPUs for the sampling actors and evaluation tasks).
    false: fp32 on CPUs over gloo. auto: GPUs when the Ray cluster has or can autoscale to them."""
    accelerator_type: str | None = None
    """The GPU type every Train worker, sampling actor, evaluation task and model stage asks
    for on a cluster with several (Ray's names: H100, A100, A10G, L4, ...); None: any GPU."""
    zero_stage: int = bounded(2, ge=0, le=3)
    """DeepSpeed ZeRO stage (0: plain data parallel; 3 partitions the weights too)."""
    offload: bool = False
    """ZeRO-Offload of the optimizer state to CPU (stage >= 1)."""
    threads_per_worker: int = bounded(1, ge=1)
    """torch threads (CPUs) of each Train worker on CPU."""
    max_failures: int = bounded(1, ge=0)
    """Worker-group restarts; each resumes from the latest reported checkpoint."""
    checkpoint_steps: int | None = bounded(None, ge=1)
    """Report a checkpoint every N optimizer steps (None: at the end of each epoch)."""
    keep_checkpoints: int | None = bounded(2, ge=1)
    """Checkpoints kept in storage while a round trains (None: all)."""
    keep_finished_checkpoints: bool = False
    """Keep a round's Train checkpoints (weights, optimizer and scheduler state) once its
    policy is published. false: they are removed then. They only resume that round, and a
    re-run skips a published round; one full-weight checkpoint of the 135M testbed model is
    2.7 GB, and a demo run wrote 29 GB of them."""
    address: str | None = None
    """Ray address (None: start or reuse a local Ray)."""


@dataclass
class FaultSettings:
    """Fault injection, to test resuming: a worker exits hard once, on the first attempt."""

    crash_at_step: int | None = bounded(None, ge=1)
    """The optimizer step after which the worker exits (None: never)."""
    crash_rank: int = bounded(0, ge=0)
    """The worker rank that exits."""


@dataclass
class TrainConfig:
    method: Method = "probe-dpo"
    """What to train (see the module docstring)."""
    testbed: str | None = None
    """A testbed folder: supplies the model, data and generation settings not given here."""
    model: str | None = None
    """Base model folder/URI (default: <testbed>/model)."""
    probes: str | None = None
    """A published ProbeSet; its train probes are the signal and the penalty."""
    aggregation: Literal["mean", "max"] | None = None
    """How an ensemble of train probes is combined (None: the probe set's own setting)."""
    judge: str = "toxic-comment-classifier"
    """The classifier of classifier-dpo / classifier-sft."""
    classifier_threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """classifier-sft drops SFT rows scoring >= this."""
    out: str = "runs/train"
    """Where pairs, checkpoints, the policy and train.json go (local folder or s3://...)."""
    seed: int = bounded(0, ge=0)
    """Seeds sampling, data order and initialisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input files."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """K-candidate sampling of DPO rounds."""
    dpo: DPOSettings = field(default_factory=DPOSettings)
    """DPO settings."""
    sft: SFTSettings = field(default_factory=SFTSettings)
    """SFT settings (the KL anchor)."""
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    """GRPO settings (the ``*-grpo`` methods)."""
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    """The differentiable probe penalty."""
    train: OptimSettings = field(default_factory=OptimSettings)
    """Optimisation."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (off: full fine-tuning)."""
    early_warning: EarlyWarningSettings = field(default_factory=EarlyWarningSettings)
    """Watch for hiding during training (off by default)."""
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    """Ray Train workers and DeepSpeed."""
    fault: FaultSettings = field(default_factory=FaultSettings)
    """Fault injection (tests)."""
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    """Experiment tracking of the training steps (W&B, MLflow, TensorBoard through TRL's report_to)."""
    trl: dict[str, Any] = field(default_factory=dict)
    """Any other field of TRL's DPOConfig, SFTConfig or GRPOConfig (by the method), set on it as
    given, e.g. trl.logging_steps=10 or trl.disable_tqdm=true. Fields this config sets from
    its own keys (trl.learning_rate: train.lr) are refused, naming the key to use."""

    def __post_init__(self):
        if self.trl:  # TRL is imported only when there is something to check
            self.trl = check_trl_keys(self.trl, "grpo" if self.is_grpo else "dpo" if self.is_dpo else "sft")

    @property
    def is_dpo(self) -> bool:
        return self.method in DPO_METHODS

    @property
    def is_grpo(self) -> bool:
        return self.method in GRPO_METHODS

    @property
    def penalty_weight(self) -> float:
        if self.penalty.weight is not None:
            return float(self.penalty.weight)
        return 1.0 if self.method == "probe-sft" else 0.0

    @property
    def signal(self) -> str:
        """The signal that ranks pairs (DPO methods)."""
        return "classifier" if self.method == "classifier-dpo" else "probe"

    @property
    def needs_probes(self) -> bool:
        if self.penalty_weight > 0:
            return True
        if self.method in ("probe-sft", "probe-grpo"):
            return True
        if self.method in ("probe-dpo", "random-dpo"):
            # replayed pairs need no probe for round 0 alone
            return not (self.data.pairs and self.dpo.rounds == 1)
        return False


def check_trl_keys(values: dict[str, Any], kind: str) -> dict[str, Any]:
    """``values`` checked against the fields of TRL's ``DPOConfig`` / ``SFTConfig`` / ``GRPOConfig`` (``kind``):
    the names, the types (as this config's own keys are checked), and no field this config
    sets from its own keys. Returns the converted values; raises ``ValueError`` with one line
    naming ``trl.<field>`` (``load_config`` prefixes where the key came from)."""
    import dataclasses
    import typing

    from probe_dpo.config import check_bounds, convert_value, suggest_key
    from probe_dpo.errors import UserError

    if kind == "dpo":
        from trl import DPOConfig as cls
    elif kind == "grpo":
        from trl import GRPOConfig as cls
    else:
        from trl import SFTConfig as cls
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    # the probe_* fields ProbeDPOConfig / ProbeSFTConfig add (all set from penalty.* here)
    penalty_fields = {"probe_path", "probe_weight", "probe_form", "probe_reduce", "probe_aggregation"}
    if kind == "dpo":
        penalty_fields.add("probe_tokens")
    if kind == "grpo":
        penalty_fields = {"probe_path", "probe_weight", "probe_form", "probe_aggregation"}
    out = {}
    for key, value in values.items():
        if key not in fields and key not in penalty_fields:
            close = suggest_key(key, fields, "trl.")
            hint = close if "did you mean" in close else ""
            raise ValueError(f"unknown key trl.{key}: TRL's {cls.__name__} has no field {key!r}{hint}")
        if key in TRL_FIELDS_SET_HERE:
            raise ValueError(f"key trl.{key}: set here by {TRL_FIELDS_SET_HERE[key]}; use that key")
        try:
            out[key] = convert_value(value, hints[key], "", f"trl.{key}")
            check_bounds(fields[key], out[key], "", f"trl.{key}")
        except UserError as exc:
            raise ValueError(str(exc).removeprefix(": ")) from None
    return out
