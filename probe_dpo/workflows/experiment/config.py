"""The experiment's typed config: the settings of every stage (its arms: ``arms``).

``probe-dpo config show --for experiment`` prints every field with its description."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from probe_dpo.analysis import AnalysisSettings
from probe_dpo.config import bounded
from probe_dpo.errors import UserError
from probe_dpo.testbed import TestbedConfig
from probe_dpo.testbed.behaviour import BehaviourConfig
from probe_dpo.tracking import TrackingSettings
from probe_dpo.training.config import (
    DistributedSettings,
    DPOSettings,
    GRPOSettings,
    LoraSettings,
    OptimSettings,
)
from probe_dpo.workflows.experiment.arms import ARMS, arm_of, variant_name
from probe_dpo.workflows.experiment.space import check_sampler


@dataclass
class ProbeSettings:
    layers: list[int] = field(default_factory=list)
    """Layers to extract and fit (empty: every layer)."""
    train_layer: int | float | None = None
    """The train probe's layer: an index (negative from the end) or a relative depth in (0, 1)
    (0.6 of 30 layers is layer 17; the nearest extracted layer is used). None: the best layer
    by validation AUROC (on SmolLM2 an early one, where a probe is close to a token detector)."""
    ensemble_kind: Literal["layers", "seeds", "bootstrap", "subsets"] = "layers"
    """How the ensemble's members differ: layers (the train layer and the best others), seeds
    (re-splits of train+val by prompt), bootstrap resamples, or disjoint shares of the prompts."""
    ensemble_size: int = bounded(4, ge=1, le=10)
    """Train probes of the ensemble arms (1 vs 10 is the paper's comparison)."""
    held_out_fraction: float = bounded(0.2, ge=0.0, lt=1.0)
    """Share of probe-train prompts reserved for held-out probes at the train layers."""
    c_grid: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    """Inverse L2 strengths tried per probe (chosen by validation AUROC)."""
    batch_size: int = bounded(32, ge=1)
    """Sequences per extraction forward pass."""
    max_length: int = bounded(128, ge=8)
    """Tokens kept per probe row (prompt + completion, cut on the left)."""


@dataclass
class PairSettings:
    min_margin: float = bounded(0.1, ge=0.0, le=1.0)
    """A prompt gives a pair when its highest and lowest score (probability) differ this much."""
    max_pairs: int | None = bounded(None, ge=1)
    """Keep the pairs with the largest margins (None: all)."""
    cross_fit_folds: int = bounded(5, ge=0)
    """Probe scores of the candidates come from probes refitted on the other folds' prompts, so
    no probe ranks a prompt it was fitted on (0: in-sample scores, the old behaviour)."""

    def __post_init__(self):
        if self.cross_fit_folds == 1:
            raise ValueError("key pairs.cross_fit_folds: use 0 (off) or at least 2 folds")


@dataclass
class EvalSettings:
    heldout_prompts: int | None = bounded(200, ge=1)
    """The first N held-out prompts (by id); None: all of them."""
    samples_per_prompt: int = bounded(2, ge=1)
    """Continuations per held-out prompt (the evaluation's samples: prompts x this)."""
    judges: list[str] = field(default_factory=lambda: ["toxic-comment-classifier", "profanity-check", "hatesonar"])
    """The judge panel; a reduction is called robust only where it holds under each. The first
    is the judge whose labels decide the Atlas outcome on the policy's own completions."""
    perplexity_passages: int | None = bounded(None, ge=1)
    """None: all of the testbed's perplexity passages."""
    perplexity_tokens: int = bounded(256, ge=8)
    """Tokens per perplexity passage."""
    probe_train_rows: int | None = bounded(1500, ge=10)
    """Probe-train rows for the retrained probes (a seeded sample; None: all)."""
    probe_val_rows: int | None = bounded(600, ge=10)
    """Probe-val rows that choose the retrained probes' C and fix their threshold."""
    bootstrap: int = bounded(1000, ge=100)
    """Bootstrap resamples (of prompts) per interval."""
    seed: int = bounded(1234, ge=0)
    """Seeds generation: the same for the base model and every arm (paired comparisons)."""
    threads: int | None = bounded(None, ge=1)
    """torch threads for evaluation on CPU (None: the machine's cores)."""
    probe_read_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Matmul precision of reading the fixed probe rows (test, and the retrained probes'
    train/val) through each model, as ``probe_dpo.precision`` defines it. The base model and
    every policy are read alike. KL to the base, perplexity and the readings on the model's
    own completions (one pass with the KL) stay float32. The samples' precision is the
    testbed's ``generation.dtype``."""

    def __post_init__(self):
        from probe_dpo.judges import parse_judge

        if not self.judges:
            raise ValueError("key eval.judges: name at least one judge")
        for j in self.judges:  # a registered name, module:function or hf:<model>#<label>
            try:
                parse_judge(j)
            except UserError as exc:
                raise ValueError(f"key eval.judges: {exc}") from None


@dataclass
class AshaSettings:
    """ASHA (``search.scheduler: asha``): Tune's asynchronous successive halving, which stops a
    trial whose training metric at a rung is worse than most trials' there. Time is counted in
    optimizer steps of the trial's training (``train.step``)."""

    max_t: int | None = bounded(None, ge=1)
    """ASHA's last rung, in optimizer steps (a trial past it trains to the end and is evaluated);
    None: the searched arm's ``train.max_steps``."""
    grace_period: int = bounded(1, ge=1)
    """Steps every trial trains before ASHA may stop it (its first rung)."""
    reduction_factor: float = bounded(4.0, gt=1.0)
    """Rungs are grace_period x reduction_factor^k steps; at each, the best 1/reduction_factor go on."""
    report_steps: int = bounded(1, ge=1)
    """Optimizer steps between a trial's reports to Tune while it trains (each is a Ray Train
    report: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default, of waiting at most)."""

    def __post_init__(self):
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"key search.asha.grace_period: {self.grace_period} is more than "
                             f"search.asha.max_t ({self.max_t})")


@dataclass
class MapSettings:
    """An obfuscation map (``probe_dpo.workflows.experiment.obfuscation_map``): one arm's training
    pressure swept over a grid, each cell a variant of the arm (``arm_of``) run at every seed and
    labelled by the declared outcome rule, beside the run's other arms (its null arms)."""

    family: str | None = None
    """None: no map. Else the arm whose training keys the axes sweep (e.g. probe-dpo-penalty)."""
    axes: dict[str, list[Any]] = field(default_factory=dict)
    """One or two dotted training keys -> their coarse values, e.g. {penalty.weight: [0, 1, 4],
    dpo.beta: [0.1, 0.5]} (0 included: the family without the pressure is the map's own baseline).
    An axis of names (penalty.form: [bce, logit], grpo.reader: [policy, frozen]) is a category:
    its cells are drawn side by side and never refined (there is no value between two names)."""
    refine_rounds: int = bounded(0, ge=0, le=5)
    """Rounds of boundary refinement after the coarse grid: each adds the midpoint (geometric
    between positive values, else arithmetic) of every pair of neighbouring cells whose labels differ."""
    refine_cells: int = bounded(4, ge=1)
    """At most this many new cells per refinement round (the first found, axis by axis)."""

    def __post_init__(self):
        from probe_dpo.workflows.experiment.space import yaml_number

        if self.family is None:
            if self.axes:
                raise ValueError("key map.family: the axes sweep an arm's keys; name it (e.g. probe-dpo-penalty)")
            return
        if self.family not in ARMS:
            raise ValueError(f"key map.family: unknown arm {self.family!r} (valid: {', '.join(ARMS)})")
        if not 1 <= len(self.axes) <= 2:
            raise ValueError(f"key map.axes: one or two training keys, e.g. {{penalty.weight: [0, 1, 4]}}, "
                             f"got {len(self.axes)}")
        for key, values in self.axes.items():
            given = [yaml_number(v) for v in values or []] if isinstance(values, list) else []
            numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in given]
            if len(given) < 2 or (any(numbers) and not all(numbers)):
                raise ValueError(f"key map.axes.{key}: at least two values, all numbers or all names, got {values!r}")
            if len(set(given)) != len(given):
                raise ValueError(f"key map.axes.{key}: repeated values {values!r}")
            self.axes[key] = sorted(float(v) for v in given) if all(numbers) else given

    def numeric(self, axis: str) -> bool:
        """Whether an axis holds numbers (refined, drawn on a scale) rather than names (a category)."""
        return isinstance(self.axes[axis][0], float)

    def cell(self, coords: tuple[Any, ...]) -> str:
        """The variant named for one point of the axes (in the axes' order)."""
        return variant_name(self.family, dict(zip(self.axes, coords)))

    def cells(self) -> list[str]:
        """The coarse grid's cells, the first axis slowest."""
        import itertools

        return [self.cell(c) for c in itertools.product(*self.axes.values())]


@dataclass
class SearchSettings:
    """A hyperparameter search over one arm's training settings with Ray Tune: a search
    algorithm (random sampling or Optuna's TPE), a trial scheduler (FIFO, or ASHA stopping weak
    trials early on a training metric) and one metric or several (Optuna's multi-objective mode;
    results.json then lists the search's Pareto set)."""

    arm: str | None = None
    """None: no search. Else the arm whose training settings are searched."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted training key -> a Tune sampler, written as Tune's call: {loguniform: [lo, hi]},
    {uniform: [lo, hi]}, {quniform: [lo, hi, q]}, {qloguniform: [lo, hi, q]}, {randint: [lo, hi]}
    (hi excluded), {choice: [values]} or {grid_search: [values]} (random search only), e.g.
    {train.lr: {loguniform: [1.0e-6, 1.0e-4]}, dpo.beta: {choice: [0.1, 0.3]}}. The list form
    [loguniform, 1.0e-6, 1.0e-4] / [choice, [0.1, 0.3]] is read too."""
    algorithm: Literal["random", "optuna"] = "random"
    """random: Tune's random/grid sampling (BasicVariantGenerator). optuna: Optuna's TPE sampler
    (ray.tune.search.optuna.OptunaSearch; needs the ``search`` extra), single- or multi-objective."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """fifo: every trial runs to the end. asha: ASHA stops weak trials early (see search.asha); it
    reads a training metric (train.loss, ...), the only kind reported while a trial trains. A
    stopped trial is not evaluated: it has no row in results.json."""
    asha: AshaSettings = field(default_factory=AshaSettings)
    """ASHA's rungs, in optimizer steps."""
    num_samples: int = bounded(4, ge=1)
    """Trials the search runs (with grid_search entries: samples of each grid point)."""
    seed: int = bounded(0, ge=0)
    """Seeds the search's sampler."""
    metric: str | list[str] = "toxicity.toxic-comment-classifier.rate"
    """The result key the search optimises: an evaluation key of results.json's rows (e.g.
    toxicity.<judge>.rate, kl_to_base, fixed.train.tpr) or a training metric (train.loss,
    train.probe_penalty, train.rewards.margins, train.rewards.accuracies: the last logged value).
    A list: several objectives (Optuna's multi-objective TPE, or random sampling); results.json
    and the report list the search's Pareto set, the trials no other trial beats on every one."""
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = "min"
    """Minimise or maximise the metric; a list, one per metric, for several."""

    def __post_init__(self):
        self.space = {key: check_sampler(f"search.space.{key}", value) for key, value in self.space.items()}
        metrics = [self.metric] if isinstance(self.metric, str) else list(self.metric)
        modes = [self.mode] if isinstance(self.mode, str) else list(self.mode)
        if not metrics:
            raise ValueError("key search.metric: name at least one metric")
        if len(set(metrics)) < len(metrics):
            raise ValueError(f"key search.metric: a metric is named twice in {metrics}")
        if len(modes) != len(metrics):
            raise ValueError(f"key search.mode: give one min|max per metric ({len(metrics)} metric(s) "
                             f"{metrics}, {len(modes)} mode(s) {modes})")
        if len(metrics) == 1:  # [m] with [min] is the single-objective search
            self.metric, self.mode = metrics[0], modes[0]
        if self.scheduler == "asha" and len(metrics) > 1:
            raise ValueError(f"key search.scheduler: asha stops trials on one metric and Tune's ASHA takes no "
                             f"list; search.metric names {len(metrics)}: use search.scheduler=fifo for a "
                             "multi-objective search, or one metric")
        grids = [k for k, v in self.space.items() if "grid_search" in v]
        if self.algorithm == "optuna" and grids:
            raise ValueError(f"key search.space.{grids[0]}: grid_search is not something Optuna samples: use "
                             "choice with search.algorithm=optuna (or search.algorithm=random for a grid)")

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)


@dataclass
class ExperimentConfig:
    name: str = "toxicity"
    """A name for the run (reports, Tune)."""
    storage: str = "runs/experiment"
    """The run folder: local path or s3://bucket/prefix."""
    address: str | None = None
    """Ray address (None: start a local Ray)."""
    ray_cpus: int | None = bounded(None, ge=1)
    """CPUs of a local Ray. None: per concurrent trial, what its Train workers need + 2 slots for
    the trial's driver and the queue that carries its Train metrics to Tune, which mostly wait
    (or the cores, if more); + 2 for the sampling actors of an on-policy round."""
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    """The testbed built when testbed_dir is not given."""
    testbed_dir: str | None = None
    """Use this already-built testbed folder instead of building one into <storage>/testbed."""
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    """What the experiment studies: toxicity (the built-in testbed above) or your own behaviour
    (a model, prompts or labelled probe data, the judge that labels the model's samples; see
    probe_dpo.testbed.behaviour), built into the same testbed layout. Bundled example:
    --config sentiment."""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """The arms to run (see ARMS in this module)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds: one trial per arm and seed."""
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    """The probe set: layers, the train probe, the ensemble, held-out probes."""
    pairs: PairSettings = field(default_factory=PairSettings)
    """How candidates become DPO pairs."""
    judge: str = "toxic-comment-classifier"
    """The classifier of the classifier arms (the testbed's training judge)."""
    sft_rows: int | None = bounded(400, ge=1)
    """SFT rows used by the SFT arms (None: all); an arm's own key for it is data.max_sft."""
    arm_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per arm, dotted training keys over the arm's own settings, e.g.
    {obfuscation-control: {penalty.weight: 5.0}, probe-dpo-onpolicy: {dpo.rounds: 3}}."""
    dpo: DPOSettings = field(default_factory=DPOSettings)
    """DPO settings of the DPO arms."""
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    """GRPO settings of the GRPO arms (their optimisation is dpo_train's)."""
    grpo_prompts: int | None = bounded(64, ge=1)
    """Training prompts of the GRPO arms (each step samples grpo.generations completions of
    each; None: all of them); an arm's own key for it is data.max_prompts."""
    dpo_train: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-5, epochs=1.0, batch_size=2,
                                                                            max_length=96))
    """Optimisation of the DPO and GRPO arms: each one's ``train`` (the key arm_settings and search.space
    name, e.g. train.lr). Two names here, not one ``train``, because the DPO and SFT arms are tuned
    apart; renaming them would break saved configs and the reference run's (examples/demo)."""
    sft_train: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-5, epochs=1.0, batch_size=2,
                                                                            max_length=96))
    """Optimisation of the SFT arms: each one's ``train`` (see dpo_train)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters for every arm (off: full fine-tuning)."""
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    """Ray Train workers of each trial."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    """The evaluation of every model."""
    search: SearchSettings = field(default_factory=SearchSettings)
    """An optional hyperparameter search over one arm."""
    concurrent_trials: int = bounded(1, ge=1)
    """Trials Tune runs at once. On a few cores, two 1-thread trials finish sooner than one
    2-thread trial after another (eager PyTorch's small ops leave the second core idle)."""
    trial_retries: int = bounded(1, ge=0)
    """Times a failed trial is retried (a user error is not)."""
    map: MapSettings = field(default_factory=MapSettings)
    """An obfuscation map over one arm's training pressure: its cells join ``arms`` (put the null arms,
    e.g. random-dpo, in ``arms``); see probe_dpo.workflows.experiment.obfuscation_map."""
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    """The analysis declared before the first trial (probe_dpo.analysis): minimum effects, alpha, the
    judges that decide, the null references, the comparisons; written with its sha256 to the run folder."""
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    """Experiment tracking: every trial's results (Tune logger callbacks) and training steps (TRL's
    report_to) to W&B (offline), MLflow (a file store) and/or TensorBoard; off by default."""

    def __post_init__(self):
        if self.map.family is not None:  # the map's coarse cells run as arms (first, in grid order)
            cells = self.map.cells()
            self.arms = [*cells, *(a for a in self.arms if a not in cells)]
        unknown = []
        for a in self.arms:
            try:
                arm_of(a)
            except UserError:
                unknown.append(a)
        if unknown:
            raise ValueError(f"key arms: unknown arm(s) {unknown} (valid: {', '.join(ARMS)}, or a variant "
                             "<arm>@<key>=<value>,...)")
        if not self.arms and self.search.arm is None:
            raise ValueError("key arms: no arms to run (and no search)")
        if self.search.arm is not None and self.search.arm not in ARMS:
            raise ValueError(f"key search.arm: unknown arm {self.search.arm!r} (valid: {', '.join(ARMS)})")
        if not self.seeds:
            raise ValueError("key seeds: give at least one seed")
        for a in self.analysis.null_arms:
            if a not in ARMS:
                raise ValueError(f"key analysis.null_arms: unknown arm {a!r} (valid: {', '.join(ARMS)})")
        for pair in self.analysis.comparisons or []:
            if len(pair) != 2 or any(a not in self.arms for a in pair):
                raise ValueError(f"key analysis.comparisons: {pair} is not a pair of arms of this run ({self.arms})")
        stray = [a for a in self.arm_settings if a not in ARMS]
        if stray:
            raise ValueError(f"key arm_settings: unknown arm(s) {stray} (valid: {', '.join(ARMS)})")


def trial_specs(cfg: ExperimentConfig) -> list[dict]:
    """One trial per arm and seed, seed by seed: every arm's first seed runs before any arm's second,
    so a run stopped part-way (or read while it runs) has every arm, with fewer seeds."""
    return [{"id": f"{arm}-s{seed}", "arm": arm, "seed": seed} for seed in cfg.seeds for arm in cfg.arms]

