"""DPO against a probe as a plain TRL script: no Ray, no probe-dpo config, ``accelerate launch``.

``ProbeDPOConfig`` is TRL's ``DPOConfig`` plus the probe penalty's fields, so every DPOConfig
flag works as in TRL's own ``trl dpo`` script, and ``--config run.yaml`` reads them from YAML
(``TrlParser``)::

    accelerate launch examples/trl_probe_dpo.py \\
        --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --pairs pairs.jsonl \\
        --probe_path runs/probes --probe_weight 1.0 --probe_form prob \\
        --output_dir runs/trl-probe-dpo --beta 0.1 --learning_rate 1e-6 --max_steps 200

``--pairs``: a JSON-lines file (or a Parquet/CSV/JSON file, by its suffix) with the columns
``prompt``, ``chosen``, ``rejected`` (strings, or conversations in TRL's format). Any other
column is dropped. ``--probe_path``: a probe set folder (what ``probe-dpo probes train``
publishes); its train probes read the policy's hidden states on the completions, and the loss
becomes DPO's + ``probe_weight`` · penalty, logged per step as ``probe_penalty``.
``--probe_weight 0`` (the default) is TRL's DPO, unchanged. LoRA: ``--use_peft --lora_r 16``
(TRL's ``ModelConfig``; no reference model is loaded then). ``--model_name_or_path``: a
``save_pretrained`` folder or a hub id.

On a machine without a GPU: ``accelerate launch --cpu ...`` and ``--use_cpu true --bf16 false``
(TRL's configs default to bf16). At the end the model (and tokenizer) is saved to
``--output_dir`` with the trainer's ``trainer_state.json`` (its ``log_history``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from probe_dpo import ProbeDPOConfig, ProbeDPOTrainer

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class PairsArguments:
    """The preference pairs to train on."""

    pairs: str = field(metadata={"help": "A jsonl (or parquet/csv/json) file with prompt, chosen, rejected."})
    max_pairs: int | None = field(default=None, metadata={"help": "Use the first N pairs."})


def load_pairs(path: str, max_pairs: int | None = None):
    from datasets import load_dataset

    suffix = path.rsplit(".", 1)[-1].lower()
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(suffix, "json")
    data = load_dataset(builder, data_files=path, split="train")
    missing = [c for c in PAIR_COLUMNS if c not in data.column_names]
    if missing:
        raise SystemExit(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(PAIR_COLUMNS)})")
    data = data.select_columns(list(PAIR_COLUMNS))
    if max_pairs is not None:
        data = data.select(range(min(max_pairs, len(data))))
    return data


def main(data_args: PairsArguments, training_args: ProbeDPOConfig, model_args: ModelConfig) -> None:
    # as TRL's own `trl dpo` script: the trainer loads the policy (and the reference, without
    # PEFT) and the tokenizer from the path, with these keyword arguments
    init = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation,
                dtype=model_args.dtype)
    training_args.model_init_kwargs = {**init, **(training_args.model_init_kwargs or {})}
    trainer = ProbeDPOTrainer(model=model_args.model_name_or_path, args=training_args,
                              train_dataset=load_pairs(data_args.pairs, data_args.max_pairs),
                              peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
    trainer.accelerator.print(f"saved the model to {training_args.output_dir}")
    end = getattr(trainer, "end", None)  # transformers >= 5.18: finish trackers, destroy the process group
    if callable(end):
        end()


if __name__ == "__main__":
    parser = TrlParser((PairsArguments, ProbeDPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
