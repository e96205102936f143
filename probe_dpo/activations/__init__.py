"""Pooled hidden states of a model: in-process (``extract``: ``probe_dpo.activations.extract``)
or sharded over Ray actors and kept in storage (``extract_sharded``, ``load_activations``:
``probe_dpo.activations.sharded``)."""

from probe_dpo.activations.extract import POOLINGS, SPANS, Features, extract, inputs_hash, tokenize
from probe_dpo.activations.sharded import ExtractorPool, extract_sharded, load_activations, shards_folder

__all__ = ["POOLINGS", "SPANS", "ExtractorPool", "Features", "extract", "extract_sharded", "inputs_hash",
           "load_activations", "shards_folder", "tokenize"]
