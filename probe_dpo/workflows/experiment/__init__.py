"""The experiment behind ``probe-dpo experiment`` (``probe_dpo.workflows.toxicity`` runs it):
its config, shared stages, evaluation, Tune trials and results, one module each."""
