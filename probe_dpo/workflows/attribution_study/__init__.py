"""The attribution study behind ``probe-dpo attribute`` (``probe_dpo.workflows.attribution``
runs it): config, inputs, scoring, retraining and report, one module each."""
