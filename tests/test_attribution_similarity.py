"""The test-prompt x pair similarity matrix: its cosines by hand, and its clustering recovering
planted blocks (a known group of pairs aligned with a known group of prompts) exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe_dpo import attribution as A
from probe_dpo.errors import UserError


def _bank(vectors: torch.Tensor) -> list[A.Direction]:
    return [A.Direction(f"bank:{i}", 1, v, "bank", {"scenario": i}) for i, v in enumerate(vectors)]


def test_matrix_is_each_prompts_cosine_with_each_pair_by_hand():
    bank = _bank(torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    diffs = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    r = 2 ** 0.5
    by_hand = np.array([[1 / r, 0.0, -1.0, 0.0], [0.5, 1 / r, 0.0, 0.0]])
    assert np.allclose(A.similarity_matrix(diffs, bank), by_hand)
    assert np.allclose(A.bank_scores(diffs, bank, "max"), by_hand.max(0))  # the bank's score is its column max
    with pytest.raises(UserError, match="hidden size"):
        A.similarity_matrix(torch.zeros(2, 4), bank)


def _planted(seed: int = 0):
    """12 prompts, 90 pairs in 48 dims: prompts 0-3 show behaviour a, pairs 10-24 teach it;
    prompts 4-11 show behaviour b, pairs 50-69 teach it; the other 55 pairs are noise."""
    rng = np.random.default_rng(seed)
    d, n_prompts, n = 48, 12, 90
    a, b = np.eye(d)[0], np.eye(d)[1]
    prompts = rng.normal(scale=0.1, size=(n_prompts, d))
    prompts[:4] += a
    prompts[4:] += b
    diffs = rng.normal(scale=0.1, size=(n, d))
    diffs[10:25] += a
    diffs[50:70] += b
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}",
              "source": "taught-a" if 10 <= i < 25 else "taught-b" if 50 <= i < 70 else "other"} for i in range(n)]
    return (_bank(torch.tensor(prompts, dtype=torch.float32)), torch.tensor(diffs, dtype=torch.float32), pairs)


def test_clustering_recovers_each_planted_block_of_pairs_and_prompts_exactly():
    bank, diffs, pairs = _planted()
    names = [b.name for b in bank]
    cl = A.cluster_similarity(A.similarity_matrix(diffs, bank), pairs, prompt_names=names, seed=0, examples=4)
    assert cl["k"] == 3 and cl["prompt_k"] == 2  # both chosen by silhouette
    first, second, rest = cl["clusters"]  # listed by alignment
    by_label = {c["cluster"]: set(np.flatnonzero(cl["labels"] == c["cluster"]).tolist()) for c in cl["clusters"]}
    blocks = {frozenset(by_label[c["cluster"]]): c for c in (first, second)}
    a = blocks[frozenset(range(10, 25))]
    b = blocks[frozenset(range(50, 70))]
    assert a["prompts"] == names[:4] and b["prompts"] == names[4:]
    assert a["sources"] == {"taught-a": 15} and b["sources"] == {"taught-b": 20}
    assert by_label[rest["cluster"]] == set(range(90)) - set(range(10, 25)) - set(range(50, 70))
    assert min(a["alignment"], b["alignment"]) > 0.6 and abs(rest["alignment"]) < 0.1
    # top pairs: the members with the highest mean cosine over the block's prompts, in order
    m = A.similarity_matrix(diffs, bank)
    along = m[:4][:, 10:25].mean(0)
    assert [p["index"] for p in a["top_pairs"]] == (10 + np.argsort(-along)[:4]).tolist()
    assert a["top_pairs"][0]["cosine"] == pytest.approx(along.max())
    block = np.asarray(cl["block"])  # [prompt group][pair cluster]: each cluster's alignment is its column's max
    assert all(block[c["prompt_group"], c["cluster"]] == c["alignment"] == block[:, c["cluster"]].max()
               for c in cl["clusters"])
    match = A.best_cluster_match(cl["labels"], np.arange(90) // 10 == 5)  # pairs 50-59: half of block b
    assert match["cluster"] == b["cluster"] and match["recall"] == 1.0 and match["precision"] == pytest.approx(0.5)


def test_fixed_k_and_too_few_prompts_for_a_prompt_clustering():
    bank, diffs, pairs = _planted(1)
    two = A.cluster_similarity(A.similarity_matrix(diffs, [bank[0], bank[4]]), pairs, prompt_names=["a", "b"], k=3,
                               seed=0)
    assert two["k"] == 3 and two["prompt_k"] == 2 and two["prompt_labels"] == [0, 1]  # each prompt its own group
    assert two["prompt_silhouette"] is None and two["silhouette"] > 0.5
    # one prompt per group: no averaging over a group's prompts, so a noise pair may join a block
    for name, taught in (("a", range(10, 25)), ("b", range(50, 70))):
        planted = np.isin(np.arange(90), list(taught))
        match = A.best_cluster_match(two["labels"], planted)
        assert match["recall"] == 1.0 and match["precision"] >= 0.8
        assert next(c for c in two["clusters"] if c["cluster"] == match["cluster"])["prompts"] == [name]
    with pytest.raises(UserError, match="one column per pair"):
        A.cluster_similarity(np.zeros((2, 5)), pairs)
