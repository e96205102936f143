"""Training against probes: probe-/classifier-SFT, -DPO and -GRPO with TRL, DeepSpeed and Ray Train.

- ``config``    the run's settings (``TrainConfig``) and the six methods
- ``pairs``     preference pairs from scored candidates; the random-label control
- ``sampling``  K completions per prompt from the policy, sharded over Ray actors
- ``trainers``  TRL trainers and configs (``ProbeDPOTrainer``, ``ProbeDPOConfig``, ...) with the
                differentiable probe penalty; EMA; DeepSpeed config
- ``grpo``      ``ProbeGRPOTrainer`` / ``ProbeGRPOConfig``: GRPO with a reward from probes on the
                policy's (or a frozen base copy's) states; the judge and random rewards
- ``loop``      the Ray Train loop (one DeepSpeed engine per worker), resume, final save
- ``run``       the driver: ``train(cfg)`` checks inputs first, then rounds of data + fit
"""

from probe_dpo.training.config import METHODS, TrainConfig
from probe_dpo.training.run import prepare, train

__all__ = ["METHODS", "TrainConfig", "prepare", "train"]
