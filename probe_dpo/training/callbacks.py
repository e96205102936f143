"""Trainer callbacks of the Ray Train loop: an EMA of the weights, a planted crash (fault tests), and
skipping the checkpoint Trainer asks for at the very end (the policy is saved on its own).

``EMACallback`` keeps an exponential moving average of the trainable weights in parameter
space (fp32, rank 0), writes it into every checkpoint (``ema.safetensors``) and restores it
on resume, so the saved EMA is the EMA of the whole trajectory even across a restart."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from transformers import TrainerCallback

EMA_FILE = "ema.safetensors"
log = logging.getLogger(__name__)


def _zero3_params(params: list) -> Any:
    """A context gathering ZeRO-3 partitioned parameters (a no-op otherwise)."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMACallback(TrainerCallback):
    """``ema = decay · ema + (1 - decay) · w`` after every optimizer step, from the initial weights.

    Tracks the trainable parameters (all of them for full fine-tuning, the adapter for LoRA)
    in fp32 on CPU on the main process. ``resume_dir``: a checkpoint folder whose
    ``ema.safetensors`` is loaded instead of starting from the current weights.
    """

    def __init__(self, decay: float, resume_dir: str | None = None):
        self.decay = float(decay)
        self.resume_dir = resume_dir
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0

    @staticmethod
    def _named(model) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        named = self._named(model)
        if self.resume_dir and os.path.exists(os.path.join(self.resume_dir, EMA_FILE)):
            if state.is_world_process_zero:
                from safetensors.torch import load_file

                loaded = load_file(os.path.join(self.resume_dir, EMA_FILE))
                missing = [n for n, _ in named if n not in loaded]
                if missing:
                    raise RuntimeError(f"{EMA_FILE} in {self.resume_dir} lacks {missing[:3]}")
                self.shadow = {n: loaded[n].float() for n, _ in named}
                self.updates = int(state.global_step)
            return
        params = [p for _, p in named]
        with _zero3_params(params):
            if state.is_world_process_zero:
                self.shadow = {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        named = self._named(model)
        with _zero3_params([p for _, p in named]), torch.no_grad():
            if state.is_world_process_zero and self.shadow is not None:
                d = self.decay
                for n, p in named:
                    self.shadow[n].mul_(d).add_(p.detach().to("cpu", torch.float32), alpha=1.0 - d)
                self.updates += 1

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.shadow is not None:
            from safetensors.torch import save_file

            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_file({n: t.contiguous() for n, t in self.shadow.items()}, os.path.join(folder, EMA_FILE),
                      metadata={"decay": str(self.decay), "step": str(state.global_step)})


class CrashCallback(TrainerCallback):
    """Fault injection: the worker of ``rank`` exits hard after optimizer step ``step``, once.

    Only on a run that did not resume from a checkpoint, so the restarted run gets past it.
    It waits a moment first so the controller registers the checkpoint reported before.
    """

    def __init__(self, step: int, rank: int, world_rank: int, resumed: bool, wait_s: float = 2.0):
        self.step, self.rank, self.world_rank, self.resumed, self.wait_s = step, rank, world_rank, resumed, wait_s

    def on_step_end(self, args, state, control, **kwargs):
        if not self.resumed and self.world_rank == self.rank and state.global_step == self.step:
            log.warning(f"fault injection: rank {self.rank} exits at step {self.step}")
            time.sleep(self.wait_s)
            os._exit(17)


class SkipFinalCheckpoint(TrainerCallback):
    """No checkpoint after the last optimizer step.

    A checkpoint exists to resume the round; the one the last step would write is resumed by
    nothing when the round's checkpoints are removed once its policy is published
    (``distributed.keep_finished_checkpoints: false``): a re-run skips a published round.
    Writing it cost a full-weight DPO round about 10 s of its 73 (the ZeRO weights and
    optimizer state, then Ray's copy into storage). Earlier checkpoints (``checkpoint_steps``,
    earlier epochs) are written as before.
    """

    @staticmethod
    def _last(state) -> bool:
        return state.max_steps > 0 and state.global_step >= state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self._last(state):
            control.should_save = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._last(state):
            control.should_save = False
