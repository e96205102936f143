"""Device choice and where model work runs (``probe_dpo.ray_utils``), on the session's Ray."""

from __future__ import annotations

import os

import pytest

from probe_dpo.errors import UserError
from probe_dpo.ray_utils import cluster_gpus, gpu_actors, gpu_options, resolve_use_gpu, run_heavy
from probe_dpo.testbed import read_testbed_info


def test_auto_resolves_to_what_the_cluster_has(ray_cluster):
    gpus = int(ray_cluster.cluster_resources().get("GPU", 0))
    assert cluster_gpus() == gpus
    assert resolve_use_gpu("auto") is (gpus > 0)
    assert resolve_use_gpu(True) is True and resolve_use_gpu(False) is False


def test_gpu_options_ask_for_one_gpu_of_the_type_given_or_cpus():
    assert gpu_options(False, "H100", num_cpus=2) == {"num_cpus": 2}
    assert gpu_options(True) == {"num_cpus": 1, "num_gpus": 1}
    assert gpu_options(True, "A10G") == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A10G"}


def test_gpu_actors_never_ask_for_more_gpus_than_the_cluster_has():
    assert gpu_actors(4, 1, "extraction") == 1  # on a one-GPU box: one actor, not a hang
    assert gpu_actors(2, 8, "sampling") == 2
    assert gpu_actors(3, 0, "sampling") == 3  # none yet: they wait for an autoscaled GPU node


def test_model_work_runs_in_a_ray_task_with_its_threads_on_a_joined_cluster(ray_cluster):
    import torch

    assert run_heavy(os.getpid, use_gpu=False) != os.getpid()
    assert run_heavy(torch.get_num_threads, use_gpu=False, threads=3) == 3
    with pytest.raises(UserError, match="^testbed /nonexistent: no testbed.json"):  # comes back as itself
        run_heavy(read_testbed_info, "/nonexistent", use_gpu=False)


def test_a_trial_needing_more_gpus_than_the_cluster_has_fails_at_start(caplog):
    """More GPUs at once than the cluster has (or can scale to) would queue forever: one line at
    start instead. Fake ``ray.cluster_resources()`` dicts, no GPU and no Ray needed."""
    from probe_dpo.ray_utils import check_gpus
    from probe_dpo.training.config import DistributedSettings
    from probe_dpo.workflows.experiment.config import ExperimentConfig
    from probe_dpo.workflows.experiment.stages import check_trial_gpus

    one_gpu = {"CPU": 16.0, "GPU": 1.0, "accelerator_type:H100": 1.0}
    assert check_gpus(1, "w", resources=one_gpu, can_scale_to=0) == 1
    with pytest.raises(UserError) as info:
        check_gpus(2, "distributed.workers=2 with distributed.use_gpu", resources=one_gpu, can_scale_to=0)
    message = str(info.value)
    assert "\n" not in message and "needs 2 GPU(s) at once" in message and "has 1 GPU(s)" in message
    assert "distributed.use_gpu=false" in message
    assert check_gpus(4, "w", resources={"CPU": 4.0}, can_scale_to=8) == 8  # an autoscaler adds GPU nodes
    with pytest.raises(UserError, match="no GPU of this type"):
        check_gpus(1, "w", accelerator_type="A100", resources=one_gpu, can_scale_to=0)
    assert check_gpus(1, "w", accelerator_type="H100", resources=one_gpu, can_scale_to=0) == 1

    def experiment(**distributed):
        return ExperimentConfig(distributed=DistributedSettings(**distributed), concurrent_trials=2)

    with pytest.raises(UserError, match="distributed.workers=2 with distributed.use_gpu"):
        check_trial_gpus(experiment(workers=2, use_gpu=True), resources=one_gpu, can_scale_to=0)
    check_trial_gpus(experiment(workers=2, use_gpu=False), resources=one_gpu, can_scale_to=0)  # CPUs: no check
    with caplog.at_level("INFO"):
        check_trial_gpus(experiment(workers=1, use_gpu=True), resources=one_gpu, can_scale_to=0)
    assert "1 trial(s) run at a time" in caplog.text  # two concurrent trials on one GPU queue, they do not fail
