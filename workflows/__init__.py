"""Entry points a user submits as Ray jobs (``ray job submit -- probe-dpo experiment ...``).

Each workflow is a thin composition of ``probe_dpo`` calls with a YAML config beside it;
the CLI's ``experiment`` and ``attribute`` commands run these same modules, so what a Ray
job runs and what a user runs locally are one program. Dependencies point one way:
workflows import ``probe_dpo``, never the reverse.
"""
