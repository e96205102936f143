"""The experiment's arms: what each trains with, and variants of them named for what they set.

An arm is a training method, the probes it trains against, its data and its own training keys.
A variant (``<arm>@<key>=<value>,...``) is an arm with more keys: the cells of an obfuscation map
are variants, so every trial, result and label says which pressure it ran at."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from probe_dpo import storage
from probe_dpo.config import from_dict, set_dotted, to_dict
from probe_dpo.errors import UserError
from probe_dpo.testbed.layout import TestbedPaths
from probe_dpo.training.config import TrainConfig
from probe_dpo.workflows.experiment.space import yaml_number

# An arm's methods take the ExperimentConfig (typed ``Any`` here: its module imports this one).


@dataclass(frozen=True)
class SharedInputs:
    """What the experiment's shared stages made that an arm's training reads (URIs)."""

    run: str
    testbed: str
    base_model: str
    probes: dict[str, str]  # the probe views an arm trains against: single, ensemble
    pairs: dict[str, str]   # the shared DPO pairs of each signal: single, ensemble, classifier
    control_sft: str        # the positive control's SFT data


@dataclass(frozen=True)
class Arm:
    """One arm of the experiment: a training method, the probes it trains against, its data,
    and the training settings that define it (dotted ``TrainConfig`` keys, applied over the
    experiment's ``dpo``/``dpo_train``/``sft_train`` and under ``arm_settings``)."""

    method: str
    probes: str | None
    """The probe view it trains against: single (the train probe), ensemble, or None."""
    data: str
    """pairs:<single|ensemble|classifier> (the shared pairs), sft (the testbed's SFT text),
    control (the judge-toxic continuations, prompt/completion) or prompts (the testbed's
    training prompts: GRPO samples its own completions)."""
    about: str
    settings: tuple[tuple[str, Any], ...] = ()
    name: str = ""  # its key in ARMS (filled in there), or a variant's name (``arm_of``)
    family: str = ""
    """A variant's arm in ARMS (empty for the arms of ARMS themselves)."""
    variant: tuple[tuple[str, Any], ...] = ()
    """A variant's own dotted training keys: applied after ``arm_settings`` of its family."""

    def train_settings(self, cfg: Any, shared: SharedInputs, trial: str, seed: int,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The keys this arm's ``TrainConfig`` is given for one trial: the experiment's training
        settings, then the arm's own, then ``arm_settings``, then a search sample's ``overrides``
        (all dotted keys, through ``set_dotted``). Only what the experiment sets, not every default
        of ``TrainConfig``: these keys name a trial's result (``trials.trial_key_fields``), so a new
        ``TrainConfig`` field does not make finished trials look changed."""
        is_dpo = self.data.startswith("pairs:")
        data: dict[str, Any] = {}
        if is_dpo:
            data["pairs"] = shared.pairs[self.data.split(":", 1)[1]]
        elif self.data == "prompts":  # GRPO: the same training prompts the DPO pairs were sampled from
            data["prompts"] = TestbedPaths(shared.testbed).data("prompts_train")
            data["max_prompts"] = cfg.grpo_prompts
        elif self.data == "control":
            data["sft"] = shared.control_sft
        else:
            data["sft"] = TestbedPaths(shared.testbed).data("sft")
            data["max_sft"] = cfg.sft_rows
        out = {"method": self.method, "model": shared.base_model,
               "out": storage.join(shared.run, "trials", trial, "train"), "seed": seed, "judge": cfg.judge,
               "testbed": shared.testbed, "data": data, "dpo": to_dict(cfg.dpo), "grpo": to_dict(cfg.grpo),
               "train": to_dict(cfg.dpo_train if is_dpo or self.data == "prompts" else cfg.sft_train),
               "lora": to_dict(cfg.lora),
               "distributed": {**to_dict(cfg.distributed), "address": None}}
        if self.probes is not None:
            out["probes"] = shared.probes[self.probes]
        if cfg.tracking.report_to:  # every trial's training steps into the run's one tracking folder
            from probe_dpo.tracking import log_dir

            out["tracking"] = {**to_dict(cfg.tracking), "dir": log_dir(cfg.tracking, shared.run),
                               "project": cfg.tracking.project}
        for dotted, value in [*self.settings, *cfg.arm_settings.get(self.family or self.name, {}).items(),
                              *self.variant, *(overrides or {}).items()]:
            set_dotted(TrainConfig, out, dotted, value, f"arm {self.name}: training key {dotted!r}")
        return out

    def train_config(self, cfg: Any, shared: SharedInputs, trial: str, seed: int,
                     overrides: dict[str, Any] | None = None, where: str | None = None) -> TrainConfig:
        """This arm's ``TrainConfig`` for one trial (``train_settings``, checked and typed)."""
        return from_dict(TrainConfig, self.train_settings(cfg, shared, trial, seed, overrides),
                         where or f"trial {trial}")


_ARMS: dict[str, Arm] = {
    "probe-dpo-single": Arm("probe-dpo", "single", "pairs:single", "DPO on pairs ranked by the train probe"),
    "probe-dpo-ensemble": Arm("probe-dpo", "ensemble", "pairs:ensemble", "DPO on pairs ranked by the probe ensemble"),
    "probe-dpo-onpolicy": Arm("probe-dpo", "single", "pairs:single",
                              "probe-DPO for 2 rounds: round 2 samples from the round-1 policy and ranks by the "
                              "frozen probe on the policy's activations",
                              (("dpo.rounds", 2), ("data.max_prompts", 160))),
    "probe-dpo-penalty": Arm("probe-dpo", "single", "pairs:single",
                             "probe-DPO plus the differentiable probe penalty (log-loss form)",
                             (("penalty.weight", 1.0), ("penalty.form", "bce"))),
    "probe-sft-single": Arm("probe-sft", "single", "sft", "SFT plus the train probe's penalty",
                            (("penalty.weight", 1.0),)),
    "probe-sft-ensemble": Arm("probe-sft", "ensemble", "sft", "SFT plus the ensemble's penalty",
                              (("penalty.weight", 1.0),)),
    "classifier-dpo": Arm("classifier-dpo", None, "pairs:classifier", "DPO on pairs ranked by the output judge"),
    "classifier-sft": Arm("classifier-sft", None, "sft", "SFT on the rows the output judge passes"),
    "sft": Arm("sft", None, "sft", "plain SFT (raises toxicity)"),
    "random-dpo": Arm("random-dpo", None, "pairs:single", "control: the probe pairs with half the labels swapped"),
    "probe-grpo-single": Arm("probe-grpo", "single", "prompts",
                             "GRPO rewarded by minus the train probe on the policy's own activations"),
    "probe-grpo-frozen": Arm("probe-grpo", "single", "prompts",
                             "GRPO rewarded by minus the train probe on a frozen base copy's activations",
                             (("grpo.reader", "frozen"),)),
    "classifier-grpo": Arm("classifier-grpo", None, "prompts", "GRPO rewarded by minus the output judge's score"),
    "random-grpo": Arm("random-grpo", None, "prompts", "control: GRPO with a seeded random reward per completion"),
    # The recipe (log-loss penalty, weight 5, lr 5e-5) was chosen on an earlier demo run, after
    # seeing its results: an exploratory choice, which is why the reference run (examples/demo)
    # reports what it does as a fresh run. The rejected recipe, a logit penalty at weight 2, also
    # hid the train probe but rewrote the text (toxicity about -86%, perplexity about +40% in that
    # uncommitted run: a note, not evidence): the logit form keeps pushing after the probe is
    # fooled, the log-loss form stops, so the behaviour stays and only the monitor is defeated.
    "obfuscation-control": Arm("probe-sft", "single", "control",
                               "positive control: SFT on judge-toxic continuations with a strong log-loss "
                               "penalty against the train probe (built to make it miss)",
                               (("penalty.weight", 5.0), ("penalty.form", "bce"), ("train.lr", 5e-5))),
}
ARMS: dict[str, Arm] = {name: dataclasses.replace(arm, name=name) for name, arm in _ARMS.items()}
VARIANT = "@"


def arm_of(name: str) -> Arm:
    """The arm called ``name``: one of ARMS, or a variant ``<arm>@<key>=<value>[,<key>=<value>...]``
    (dotted training keys over the arm's settings and its ``arm_settings``). A variant is named by what
    it sets, so an obfuscation map's cell says in its trials, results and labels which pressure it ran at."""
    if name in ARMS:
        return ARMS[name]
    family, sep, rest = name.partition(VARIANT)
    if not sep or family not in ARMS:
        raise UserError(f"arm {name!r}: unknown (valid: {', '.join(ARMS)}, or a variant <arm>@<key>=<value>,...)")
    keys = []
    for item in rest.split(","):
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UserError(f"arm {name!r}: {item!r} is not <key>=<value> (e.g. {family}@penalty.weight=2)")
        keys.append((key, _value(text)))
    return dataclasses.replace(ARMS[family], name=name, family=family, variant=tuple(keys))


def variant_name(family: str, keys: dict[str, Any]) -> str:
    """The name ``arm_of`` reads back: numbers to 4 significant digits (the value a cell trains with)."""
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in keys.items()]
    return f"{family}{VARIANT}{','.join(shown)}"


def _value(text: str) -> Any:
    """A variant's value as YAML reads it (a number where YAML 1.1 leaves 1e-5 a string)."""
    import yaml

    return yaml_number(yaml.safe_load(text))


def target_role(arm: str) -> str:
    """The probe role an arm trained against (arms that train against none: the train probe,
    the monitor a deployer would have)."""
    return "ensemble" if arm_of(arm).probes == "ensemble" else "train"
