"""The Ray Train loop: one TRL trainer per worker, each a DeepSpeed engine.

``fit_round`` runs ``train_worker`` on one ``TrainJob`` in a ``TorchTrainer`` with N workers (gloo on CPU, NCCL
on GPU). Every worker loads the policy (and, for full-weight DPO, an explicit reference
model), builds a ``ProbeDPOTrainer`` / ``ProbeSFTTrainer`` / ``ProbeGRPOTrainer`` from a
``ProbeDPOConfig`` / ``ProbeSFTConfig`` / ``ProbeGRPOConfig`` (the penalty's or reward's ``probe_*`` fields; ``deepspeed=<dict>`` with the ZeRO
stage and offload from the config; bf16 on GPU, fp32 + ``use_cpu`` on CPU), wraps it with
Ray's ``prepare_trainer`` and reports checkpoints to storage with
``RayTrainReportCallback`` (each rank's ZeRO shards are merged into one checkpoint folder).

A restarted worker group (``FailureConfig(max_failures)``) or a re-run of the same job
(same run name in the same storage) resumes from ``ray.train.get_checkpoint()``: the model,
optimizer, scheduler, RNG and EMA state all come back.

At the end rank 0 builds the final policy on CPU (the EMA weights when configured; LoRA
merged or as an adapter), saves it with ``save_pretrained`` and publishes it to storage
(manifest last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from probe_dpo.storage.lease import pid_alive
from probe_dpo.training.config import TrainConfig

log = logging.getLogger(__name__)

RUN_FILE = "training_run.json"

# What a training run reports while it trains when asked (``TrainJob.report_steps``, a Tune search
# under ASHA): result key -> the key TRL logs (NaN when this method logs none), and the step.
TRAIN_METRICS = {"train.loss": "loss", "train.probe_penalty": "probe_penalty",
                 "train.rewards.margins": "rewards/margins", "train.rewards.accuracies": "rewards/accuracies"}
TRAIN_STEP = "train.step"


STALE_BUILD_LOCK_S = 900.0


@dataclass(frozen=True)
class TrainJob:
    """One round's work for the Ray Train workers, made by ``probe_dpo.training.run.train`` and
    handed to every worker as it is (pickled by Ray): the typed ``TrainConfig`` itself, so a
    setting reaches the worker's TRL config with no dict round trip on the way."""

    cfg: TrainConfig
    kind: Literal["dpo", "sft", "grpo"]  # the trainer
    data: str                            # the round's records: pairs, SFT rows or GRPO's prompts
    model: str                           # the policy the round starts from
    reference: str                       # DPO's reference: the round's start, or the base model
    policy: str                          # where the round's policy is published
    round: int
    config_hash: str                     # the run's, written with the policy
    generation: dict                     # the testbed's GenerationSettings.to_dict() (GRPO's rollouts)
    env: dict                            # the driver's Hugging Face settings (probe_dpo.model.hub_env)
    report_steps: int | None = None      # report TRAIN_METRICS every N steps (a Tune search under ASHA)
    tracking_env: dict | None = None     # probe_dpo.tracking.trainer_env / trainer_args, when tracking
    tracking_args: dict | None = None


def _worker_setup(threads: int) -> None:
    import torch

    from probe_dpo.logs import setup

    setup()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, threads))
    clear_stale_build_locks()


def clear_stale_build_locks(root: str | None = None, max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove JIT-build locks left by a killed DeepSpeed op compile.

    torch's extension loader takes ``<TORCH_EXTENSIONS_DIR>/<op>/lock`` even when the op is
    already built and waits for it forever; a worker killed mid-compile (a preempted node, a
    fault test) would hang every later run on the machine. A clean compile of DeepSpeed's CPU
    ops takes well under a minute (minutes on a loaded 2-core box), so a lock older than
    ``max_age_s`` has no live owner.
    """
    root = root or os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    removed = []
    for lock in Path(root).glob("**/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:
            pass
    return removed


def prebuild_deepspeed_ops(offload: bool) -> None:
    """Compile DeepSpeed's JIT ops for the CPU accelerator once, in the driver.

    Every worker of a CPU group would otherwise race for the same build lock at start-up,
    and a worker killed while holding it (a fault, a killed job) leaves a lock that torch's
    loader waits on forever. Built here first, the workers on this node only load the cached
    library. Called for CPU runs only: GPU workers use other ops and usually other nodes.
    """
    clear_stale_build_locks()
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    if offload:
        get_accelerator().create_op_builder("CPUAdamBuilder").load()


SCRATCH_PREFIX = "probe-dpo-worker-"


def sweep_stale_scratch(root: str | None = None) -> list[str]:
    """Remove the scratch folders of this host's workers that are no longer alive.

    A worker removes its folder in ``finally``, which a SIGKILL (a killed job, a failed node's
    restart, Ray Train's teardown) skips: a full-weight run leaves ~1.2 GB, a LoRA run 60-100 MB.
    A folder is named ``probe-dpo-worker-<pid>@<host>@...``; another host's (a shared /tmp) or an
    older layout's is left alone, as is one whose pid is alive (or reused: the safe side).
    """
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*@{socket.gethostname()}@*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("@", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    return removed


def train_worker(job: TrainJob) -> None:
    """Ray Train loop body (runs on every worker).

    Everything a worker writes locally (the resumed checkpoint, the trainer's output folder,
    the final policy before it is published) lives in one scratch folder that is removed at
    the end: a full-weight run leaves ~1.2 GB there, and an experiment runs dozens. What killed
    workers left behind is swept first.
    """
    for folder in sweep_stale_scratch():
        log.info("removed a killed worker's scratch folder %s", folder)
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}@{socket.gethostname()}@"))
    try:
        _train(job, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _early_warning(cfg: Any, job: TrainJob, records: list[dict], tokenizer: Any, rank: int, dtype: str) -> Any:
    """The hiding watch of ``cfg.early_warning`` (None when off); rank 0 holds the probes and,
    without LoRA, a frozen copy of the model the policy starts from."""
    if not cfg.early_warning.every_steps:
        return None
    from probe_dpo.model import load_model
    from probe_dpo.probes import ProbeSet
    from probe_dpo.training.early_warning import EarlyWarningCallback, probe_prompts

    probes = ProbeSet.load(cfg.probes) if rank == 0 else None
    frozen = load_model(job.model, dtype=dtype) if rank == 0 and not cfg.lora.enabled else None
    return EarlyWarningCallback(cfg.early_warning, probes, probe_prompts(records, cfg.early_warning.prompts),
                                tokenizer, frozen=frozen, rank=rank, seed=cfg.seed)


def worker_arguments(job: TrainJob, output_dir: str) -> Any:
    """The TRL config a worker trains with: ``ProbeDPOConfig`` / ``ProbeSFTConfig`` /
    ``ProbeGRPOConfig`` of the job's ``TrainConfig``, with the DeepSpeed config of its ZeRO
    stage and offload. No tqdm bar in a worker: Ray forwards each worker's output to the driver
    line by line, prefixed with the worker, so every in-place redraw of the bar (\\r) becomes
    one more log line per worker; the per-step logs (and ray.train.report) carry the same progress."""
    from probe_dpo.training.trainers import deepspeed_config, training_arguments

    dist = job.cfg.distributed
    ds = deepspeed_config(dist.zero_stage, offload=dist.offload, bf16=dist.use_gpu)
    if job.kind == "grpo":
        from probe_dpo.training.grpo import grpo_arguments

        return grpo_arguments(job.cfg, job.generation, output_dir=output_dir, deepspeed=ds,
                              save_steps=dist.checkpoint_steps, use_gpu=dist.use_gpu,
                              tracking=job.tracking_args, progress_bar=False)
    return training_arguments(job.kind, job.cfg, output_dir=output_dir, deepspeed=ds,
                              save_steps=dist.checkpoint_steps, use_gpu=dist.use_gpu,
                              tracking=job.tracking_args, progress_bar=False)


def _train(job: TrainJob, scratch: Path) -> None:
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from probe_dpo.data import read_records
    from probe_dpo.model import apply_hub_env, load_model, load_tokenizer
    from probe_dpo.tracking import apply_env
    from probe_dpo.training.callbacks import CrashCallback, EMACallback, SkipFinalCheckpoint
    from probe_dpo.training.trainers import build_trainer

    cfg = job.cfg
    dist = cfg.distributed
    _worker_setup(dist.threads_per_worker)
    apply_hub_env(job.env)  # a hub id resolves in the driver's Hugging Face cache
    apply_env(job.tracking_env)  # offline W&B, the MLflow file store: read by transformers
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    t0 = time.perf_counter()

    records = read_records(job.data, what="training data")
    tokenizer = load_tokenizer(job.model)
    output_dir = str(scratch / "trainer")
    # the arguments first: under ZeRO-3 they make from_pretrained build the models partitioned
    args = worker_arguments(job, output_dir)
    if dist.zero_stage == 3:
        # zero.Init sizes the partitions from deepspeed.comm's world, which the CPU path of
        # TrainingArguments never initialises: wrap Ray's process group before the models load
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if dist.use_gpu else "gloo")
    dtype = "bfloat16" if dist.use_gpu else "float32"  # bf16 on a GPU; CPUs train in fp32
    model = load_model(job.model, dtype=dtype)
    model.train()
    ref_model = None
    if (job.kind == "dpo" or (job.kind == "sft" and cfg.sft.kl_weight > 0)) and not cfg.lora.enabled:
        ref_model = load_model(job.reference, dtype=dtype)  # DPO's reference; SFT's KL anchor
    reader_model = None  # probe-grpo's frozen reader, where TRL builds no reference model to reuse
    if cfg.method == "probe-grpo" and cfg.grpo.reader == "frozen" and (cfg.grpo.beta == 0 or cfg.lora.enabled):
        reader_model = load_model(job.model, dtype=dtype)
    held, total = parameter_elements(model)

    checkpoint = ray.train.get_checkpoint()
    resume_dir, resumed_from_step = None, 0
    if checkpoint is not None:
        local = checkpoint.to_directory(str(scratch / "resume"))
        resume_dir = os.path.join(local, RayTrainReportCallback.CHECKPOINT_NAME)
        resumed_from_step = int(json.loads(Path(resume_dir, "trainer_state.json").read_text())["global_step"])
        log.info(f"rank {rank}: resuming from {checkpoint.path}")

    callbacks: list[Any] = []
    ema = None
    if cfg.train.ema_decay is not None:
        ema = EMACallback(cfg.train.ema_decay, resume_dir=resume_dir)
        callbacks.append(ema)
    if cfg.fault.crash_at_step is not None:
        callbacks.append(CrashCallback(cfg.fault.crash_at_step, cfg.fault.crash_rank, rank,
                                       resumed=checkpoint is not None))
    if not dist.keep_finished_checkpoints:
        callbacks.append(SkipFinalCheckpoint())  # after DefaultFlowCallback, which asks for that save
    warning = _early_warning(cfg, job, records, tokenizer, rank, dtype)
    if warning is not None:
        callbacks.append(warning)
    if job.report_steps:  # a Tune search's scheduler (ASHA) reads these while the trial trains
        callbacks.append(progress_callback(int(job.report_steps)))
    callbacks.append(RayTrainReportCallback())  # last: the EMA file is in the folder it copies

    # the penalty is in the arguments: the trainer loads cfg.probes' train probes itself
    if job.kind == "grpo":
        from probe_dpo.training.grpo import build_grpo_trainer

        trainer = build_grpo_trainer(model, tokenizer, records, cfg, args, callbacks=callbacks,
                                     reader_model=reader_model)
    else:
        trainer = build_trainer(job.kind, model, tokenizer, records, cfg, output_dir=output_dir,
                                ref_model=ref_model, callbacks=callbacks, args=args)
    trainer = prepare_trainer(trainer)
    if warning is not None:
        warning.bind(trainer)
    result = trainer.train(resume_from_checkpoint=resume_dir)
    train_seconds = time.perf_counter() - t0

    final_dir = scratch / "final"
    raw = final_dir / "raw"
    trainer.save_model(str(raw))  # every rank (ZeRO-3 gathers); rank 0 writes
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # rank 0's reload below is a plain load, not a collective zero.Init
    metrics: dict[str, Any] = {"train_loss": float(result.training_loss), "global_step": int(trainer.state.global_step),
                               "train_seconds": round(train_seconds, 2), "resumed": checkpoint is not None,
                               "resumed_from_step": resumed_from_step, "parameter_elements_held_at_load": held,
                               "parameter_elements": total, "dtype": dtype}
    if warning is not None:
        metrics["early_warning"] = warning.summary()
    history = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("probe_penalty", "rewards/accuracies", "rewards/margins", "loss",
                "reward", "rewards/probe/mean", "probe/prob", "kl"):  # the last four: GRPO's
        values = [h[key] for h in history if key in h]
        if values:
            metrics[f"first_{key}"] = float(values[0])
            metrics[f"last_{key}"] = float(values[-1])
    if rank == 0:
        from probe_dpo.storage import artifacts

        policy = finalize_policy(raw, final_dir / "policy", cfg, job, tokenizer,
                                 ema.shadow if ema is not None else None)
        info = {"method": cfg.method, "round": job.round, "base_model": job.model,
                "reference": job.reference, "data": job.data, "metrics": metrics,
                "ema_decay": cfg.train.ema_decay, "ema_updates": ema.updates if ema else None,
                "lora": cfg.lora.enabled, "lora_merged": cfg.lora.enabled and cfg.lora.merge,
                "config_hash": job.config_hash, "log_history": trainer.state.log_history}
        (policy / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        artifacts.publish_dir(policy, job.policy, overwrite=True,
                            metadata={"kind": "policy", "method": cfg.method, "round": job.round,
                                      "config_hash": job.config_hash})
        log.info(f"rank 0: published the policy at {job.policy}")
    if dist.zero_stage == 3 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    ray.train.report({**metrics, "policy": job.policy, "finished": 1})  # not "done": Tune reads that as "stop the trial"


def progress_callback(every: int) -> Any:
    """A ``TrainerCallback`` that reports ``TRAIN_METRICS`` and ``TRAIN_STEP`` to Ray Train every
    ``every`` optimizer steps before the last (no checkpoint; the last step's metrics come with the
    run's end, so a scheduler cannot stop a trial that has trained to the end before it is
    evaluated). ``on_log`` runs on every rank at the same steps, so every rank reports alike, as
    Ray Train requires."""
    import ray.train
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            step = int(state.global_step)
            if not logs or "loss" not in logs:  # the run's closing summary logs train_loss, not loss
                return
            if step % every == 0 and step < state.max_steps:
                ray.train.report({TRAIN_STEP: step, **{key: float(logs.get(name, float("nan")))
                                                       for key, name in TRAIN_METRICS.items()}})

    return ReportProgress()


def parameter_elements(model: Any) -> tuple[int, int]:
    """(elements this rank holds, elements of the model): equal without ZeRO-3; under
    ``zero.Init`` each rank holds about 1 / world size of them (its ``ds_tensor`` shards)."""
    held = total = 0
    for p in model.parameters():
        total += int(getattr(p, "ds_numel", p.numel()))
        held += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
    return held, total


def finalize_policy(raw: Path, dest: Path, cfg: Any, job: TrainJob, tokenizer: Any,
                    ema_shadow: dict | None) -> Path:
    """The final ``save_pretrained`` folder from the trainer's saved model (rank 0, CPU), in the
    base model's own dtype (a bf16 checkpoint stays bf16; a float32 one float32)."""
    import torch

    from probe_dpo.model import load_model, source_dtype

    dtype = source_dtype(job.model)
    if cfg.lora.enabled:
        from peft import PeftModel

        base = load_model(job.model, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(raw))
        if ema_shadow is not None:
            _copy_into(model, ema_shadow)
        if cfg.lora.merge:
            model = model.merge_and_unload()
    else:
        model = load_model(str(raw), dtype=dtype)
        if ema_shadow is not None:
            _copy_into(model, ema_shadow)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def _copy_into(model: Any, shadow: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in shadow if n not in params]
    if missing:
        raise RuntimeError(f"EMA weights {missing[:3]} have no parameter in the saved model")
    with torch.no_grad():
        for name, value in shadow.items():
            params[name].copy_(value.to(params[name].dtype))


def scaling_config(dist: Any) -> Any:
    """The Train workers' resources: one GPU each (of ``accelerator_type`` when set) with
    ``use_gpu``, else ``threads_per_worker`` CPUs each."""
    from ray.train import ScalingConfig

    resources = {"CPU": dist.threads_per_worker}
    if dist.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=dist.workers, use_gpu=bool(dist.use_gpu), resources_per_worker=resources,
                         accelerator_type=dist.accelerator_type if dist.use_gpu else None)


def fit_round(job: TrainJob, *, storage_root: str, run_name: str, callbacks: list | None = None) -> dict:
    """Run ``train_worker`` on ``job`` under a Ray ``TorchTrainer``; returns rank 0's final metrics.

    The job goes to the workers bound to the function (``functools.partial``), not as Ray's
    ``train_loop_config``: that is a dict Ray also copies into its run state as JSON.
    ``callbacks`` go to the Train run (e.g. ``TuneReportCallback`` inside a Tune trial)."""
    import functools

    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from probe_dpo import storage

    dist = job.cfg.distributed
    if not dist.use_gpu:
        prebuild_deepspeed_ops(dist.offload)
    fs, path = storage.pyarrow_filesystem(storage_root)
    trainer = TorchTrainer(
        functools.partial(train_worker, job),
        scaling_config=scaling_config(dist),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=dist.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=dist.keep_checkpoints),
                             callbacks=list(callbacks or [])),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - a UserError inside a worker is the user's
        from probe_dpo.ray_utils import unwrap_ray_error

        inner = unwrap_ray_error(exc)
        if inner is not exc:
            raise inner from None
        raise
    metrics = dict(result.metrics or {})
    run_file = storage.join(job.policy, RUN_FILE)
    if storage.exists(run_file):  # rank 0's own summary of the finished run
        metrics = dict(storage.read_json(run_file).get("metrics", metrics))
    metrics["fit_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    log.info(f"train: {run_name} done in {metrics['fit_seconds']:.1f}s ({metrics.get('global_step')} steps, "
        f"loss {metrics.get('train_loss', float('nan')):.4f})")
    return metrics
