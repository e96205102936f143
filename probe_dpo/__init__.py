"""probe_dpo: post-train language models against linear probes on their own hidden states."""

__version__ = "0.1.0"
