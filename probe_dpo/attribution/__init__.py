"""Probe-based data attribution: rank the pairs of a preference set by a behaviour direction.

For a preference pair (prompt, chosen, rejected) and the model BEFORE DPO, the pair's vector
at layer L is

    v_d = act(prompt, chosen) - act(prompt, rejected)

where ``act`` is the mean of the residual stream at L over the response tokens only (the
extractor's ``span="response"``, ``pooling="mean"``). A behaviour direction ``v_b`` at L is

- ``diff-of-means``: mean act of examples showing the behaviour minus mean act of examples
  that do not (response tokens only), L2-normalised (the published method), or
- ``probe``: a trained probe's direction in activation space (``LinearProbe.direction()``), or
- ``behaviour-contrast``: the published label-free direction (``contrast``): on scenarios where
  the model after DPO on the raw set shows the behaviour and the model before does not (the
  authors' 4-condition filter), ``mean act(p, r1) - mean act(p, r0)`` with both responses read by
  the model before DPO; or a vector bank, one such direction per scenario, a pair scored by its
  largest cosine over the bank, or
- ``behaviour-change``: the mean shift of the activations of the same texts between the model
  before and after DPO on the raw set: representation drift, kept as the contrast's comparison.

A direction's causal check (``steering``): add it to the residual stream during generation, or
project it out, beside a random direction of the same norm, and judge the behaviour rate.

A pair's score is ``cos(v_d, v_b)``: how much DPO on it pushes the model's responses along
the behaviour. Pairs are ranked by score; sources are aggregated (mean score with a
bootstrap CI, share of the source's pairs in the top-k with a Wilson CI, enrichment), and
three mitigations write a new pair file in the input's format: ``filter`` (drop the top
pairs), ``swap`` (swap chosen and rejected of the top pairs), ``drop-sources`` (drop the
sources flagged as enriched in the top-k). Clustering the unit pair vectors (k-means,
scikit-learn; k by silhouette) surfaces behaviours no direction covers.

Comparators on the same model and data: ``judge_scores`` (judge(chosen) - judge(rejected),
the LLM-judge baseline with an offline judge) and ``gradient_scores`` (LESS-style: cosine of
each pair's DPO-loss gradient with the gradient of the behaviour's log-likelihood on a small
set of behaviour examples, after a seeded random projection; ``dense`` projects per-pair
gradients of a parameter subset with a chunk-wise generated Rademacher matrix as LESS does,
``factorized`` projects every linear layer's per-example gradient with a Kronecker-factored
Gaussian projection as LoGra does).

Pair activations come from the Ray-sharded extractor (``extract_sharded`` on an
``ExtractorPool``) or, when asked, from in-process ``extract``.

The package: ``pairs`` (pair files), ``directions`` (behaviour directions and pair vectors),
``scores`` (cosine scores, ranks, recall, the judge comparator), ``sources`` (source tables
and mitigations), ``clusters``, ``similarity`` (the test-prompt x pair matrix, clustered), ``gradients`` (the LESS/LoGra comparator), ``audit`` (which
concepts a preference set pushes, per source).
"""

from probe_dpo.attribution.clusters import best_cluster_match, cluster_directions, cluster_pairs, kmeans_by_silhouette
from probe_dpo.attribution.contrast import (
    Scenario,
    ScenarioSamples,
    bank_scores,
    behaviour_contrast,
    contrast_bank,
    read_scenarios,
    select_scenarios,
)
from probe_dpo.attribution.directions import (
    DIRECTION_KINDS,
    DIRECTIONS_FORMAT,
    Direction,
    PairFeatures,
    behaviour_change,
    behaviour_direction,
    check_directions,
    diff_of_means,
    load_directions,
    pair_features,
    probe_directions,
    save_directions,
)
from probe_dpo.attribution.gradients import GradientConfig, RademacherProjection, gradient_scores, sequence_logprobs
from probe_dpo.attribution.pairs import pair_sources, read_pair_file, write_pairs_like
from probe_dpo.attribution.scores import (
    cosine_scores,
    judge_scores,
    projections,
    random_recall,
    ranking,
    ranks,
    recall_at_k,
    recall_curve,
    recall_with_ci,
    top_k_mask,
)
from probe_dpo.attribution.similarity import cluster_similarity, similarity_matrix
from probe_dpo.attribution.sources import (
    MITIGATIONS,
    flagged_sources,
    mitigate,
    reduction_vs_raw,
    share_of_rise_removed,
    source_table,
)
from probe_dpo.attribution.steering import SteeringSettings, random_unit, residual_norm, steer, steering_check
from probe_dpo.model import model_facts  # the attribution's model facts (arch_hash included) are the model's

__all__ = ["best_cluster_match", "DIRECTIONS_FORMAT", "DIRECTION_KINDS", "MITIGATIONS", "Direction", "GradientConfig", "PairFeatures",
           "RademacherProjection", "behaviour_change", "behaviour_direction", "check_directions", "cluster_directions", "cluster_pairs",
           "cosine_scores", "diff_of_means", "flagged_sources", "gradient_scores", "judge_scores", "load_directions",
           "mitigate", "model_facts", "pair_features", "pair_sources", "probe_directions", "projections", "ranking",
           "ranks", "read_pair_file", "recall_at_k", "recall_curve", "save_directions", "sequence_logprobs",
           "reduction_vs_raw", "share_of_rise_removed", "source_table", "top_k_mask", "write_pairs_like",
           "Scenario", "ScenarioSamples", "SteeringSettings", "bank_scores", "behaviour_contrast", "contrast_bank",
           "random_recall", "random_unit", "read_scenarios", "recall_with_ci", "residual_norm", "select_scenarios", "steer", "steering_check",
           "cluster_similarity", "kmeans_by_silhouette", "similarity_matrix"]
