"""The experiment behind ``probe-dpo experiment`` (``driver`` runs it):
its config, shared stages, evaluation, Tune trials and results, one module each."""
