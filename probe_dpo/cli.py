"""The ``probe-dpo`` command line.

Each command is a thin layer over a library function: it parses arguments, loads a typed
config (YAML plus dotted overrides) and calls the library. Heavy imports (torch, ray,
transformers) happen inside the command so ``--help`` stays instant. Bad input raises
``UserError``: printed as one line, exit status 2, no traceback, also when it was raised in a
Ray worker, a Train worker or a Tune trial. Bad arguments are one line too (with a pointer to
``--help``). Local paths given on the command line are made absolute before anything reaches
a Ray worker, whose working directory is not the caller's.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from probe_dpo.errors import UserError, guarded, one_line
from probe_dpo.workflows import CONFIG_KINDS, bundled_configs
from probe_dpo.workflows import config_class as _config_class

Handler = Callable[[argparse.Namespace], int | None]

# Arguments that name local inputs (made absolute when they exist) and outputs (always).
PATH_INPUTS = ("model", "data", "testbed", "probes", "train", "val", "test", "pairs", "behaviour_data",
               "poison_labels", "directions", "config", "run")
PATH_OUTPUTS = ("out",)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``probe-dpo train: error: ... (see 'probe-dpo train --help')``.

    argparse prints the whole usage block before its error; the usage is one ``--help`` away.
    Subcommand parsers are made with the same class (``add_subparsers`` uses the parent's).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def _config_args(parser: argparse.ArgumentParser, example: str, bundled: str = "") -> None:
    """``--config`` and overrides; ``example``: one of this command's (tests/test_cli_help.py parses it)."""
    parser.add_argument("--config", help="YAML config file (defaults are used for keys it leaves out)" + bundled)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"dotted overrides applied after the file, e.g. {example}")


def _add_testbed(sub: argparse._SubParsersAction) -> None:
    testbed = sub.add_parser("testbed", help="build the offline toxicity testbed",
                             description="The built-in world: SmolLM2, RealToxicityPrompts prompts, offline judges.")
    tsub = testbed.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = tsub.add_parser("build", help="build (or reuse from cache) the testbed in a folder",
                            description="Build the testbed deterministically; a second build with the "
                                        "same settings is a cache hit.")
    build.add_argument("--out", required=True,
                       help="output folder or s3:// URI (a URI: built in the local cache, then copied there)")
    _config_args(build, "generation.temperature=0.9")
    build.set_defaults(handler=_run_testbed_build)


def _run_testbed_build(args: argparse.Namespace) -> int:
    from probe_dpo.config import load_config
    from probe_dpo.testbed import TestbedConfig, build_testbed

    cfg = load_config(TestbedConfig, args.config, args.overrides)
    info = build_testbed(cfg, args.out)  # a URI: built in the local cache, then published there
    print(f"testbed ready in {args.out} ({'cache hit' if info.get('cache_hit') else 'built'}): "
          f"{info['model']['parameters'] / 1e6:.1f}M-parameter model, "
          f"base toxicity {_format_rates(info['base_toxicity_rate'])}, "
          f"benign perplexity {info['model']['benign_perplexity']:.1f}")
    return 0


def _reachable(out: str | None) -> None:
    """An output's storage answers (a missing bucket: one line) before any compute, not at the end."""
    if out:
        from probe_dpo.storage import check_reachable

        check_reachable(out)


def _format_rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{judge} {rate:.3f}" for judge, rate in rates.items())


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the main job on the built-in testbed (what `make demo` runs)",
                          description="The toxicity experiment (probe_dpo/workflows/demo.yaml) on the embedded default: a "
                                      "local Ray, the run folder ./runs/demo, the built-in testbed. Re-running "
                                      "skips what is complete.")
    demo.add_argument("--storage", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the demo config")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from probe_dpo.workflows.experiment import driver

    args.config = "demo"
    args.address = None
    return driver.run_from_args(args)


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    from probe_dpo.workflows.experiment import driver

    exp = sub.add_parser("experiment", help="the experiment (toxicity, sentiment or your behaviour): Tune driver over arms, Goodhart metrics, report",
                         description="Runs probe_dpo/workflows/experiment/driver.py (what `ray job submit -- probe-dpo experiment` runs): "
                                     "testbed, probes, one Ray Tune trial per arm and seed (Ray Train + DeepSpeed), "
                                     "evaluation, results.json and report.md/.html in the run folder. Re-running "
                                     "the same command skips complete trials and resumes interrupted ones.")
    driver.add_arguments(exp)
    config = next(a for a in exp._actions if a.dest == "config")
    names = sorted(bundled_configs("experiment"), key=lambda n: n != config.default)
    config.help = "YAML config file, or a bundled config by name: " + ", ".join(
        f"{n} (default)" if n == config.default else n for n in names)
    exp.set_defaults(handler=lambda args: driver.run_from_args(args))


def _add_report(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="rebuild the report of an experiment run folder",
                         description="Reads results and evaluations from a run folder (local or s3://) and "
                                     "rewrites results.json, report.md and report.html there.")
    rep.add_argument("run", metavar="URI", help="the experiment's run folder")
    rep.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from probe_dpo import storage
    from probe_dpo.workflows.experiment.results import write_results

    if not storage.exists(storage.join(args.run, "shared", "context.json")):
        raise UserError(f"{args.run}: not an experiment run folder (no shared/context.json)")
    out = write_results(args.run)
    print(f"{len(out['rows'])} trials; report at {out['html']}")
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 6,12 or -1, got {text!r}")


def _add_activations(sub: argparse._SubParsersAction) -> None:
    acts = sub.add_parser("activations", help="extract pooled hidden states (sharded over Ray actors)",
                          description="Residual-stream activations of a model on a data file, written as "
                                      "safetensors shards with a manifest.")
    asub = acts.add_subparsers(dest="action", required=True, metavar="ACTION")
    ext = asub.add_parser("extract", help="extract activations to a folder or s3:// URI",
                          description="Split the data across Ray actors (one per GPU, or CPU slots), write one "
                                      "safetensors file per shard and the manifest last. A restart skips "
                                      "shards that are already complete.")
    ext.add_argument("--model", required=True, help="model folder (save_pretrained) or URI")
    ext.add_argument("--data", required=True, help="jsonl/parquet file: columns prompt+completion (span response) "
                                                   "or text (span all)")
    ext.add_argument("--out", required=True, help="output folder or s3:// URI")
    ext.add_argument("--layers", required=True, type=_layer_list, help="comma-separated layer indices, e.g. 6,12,-1")
    ext.add_argument("--pooling", default="mean", choices=["mean", "last", "none"],
                     help="mean over the span's tokens, the last token, or per-token (default: mean)")
    ext.add_argument("--span", default=None, choices=["response", "all"],
                     help="tokens to pool over (default: response when the data has prompt and completion "
                          "columns, else all)")
    ext.add_argument("--actors", type=int, default=None, help="number of Ray actors (default: one per GPU, or 2)")
    ext.add_argument("--threads-per-actor", type=int, default=1, help="CPU threads per actor without GPUs")
    ext.add_argument("--address", default=None, help="Ray address to join (default: a local Ray)")
    ext.add_argument("--batch-size", type=int, default=16)
    ext.add_argument("--max-length", type=int, default=512, help="tokens per input (longer ones are cut)")
    ext.add_argument("--shard-size", type=int, default=512, help="inputs per shard file")
    ext.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="the model's dtype while extracting (auto: bfloat16 on GPU actors, float32 on CPUs)")
    ext.add_argument("--overwrite", action="store_true",
                     help="replace a complete extraction of different data/settings at --out")
    ext.set_defaults(handler=_run_activations_extract)


def _run_activations_extract(args: argparse.Namespace) -> int:
    from probe_dpo.activations import extract_sharded
    from probe_dpo.data import chat_value, check_columns, read_records, whole_text

    records = read_records(args.data, what="activation data")
    has_pairs = all("prompt" in r and "completion" in r for r in records)
    span = args.span or ("response" if has_pairs else "all")
    if span == "response":
        check_columns(records, ("prompt", "completion"), where=args.data)
        inputs = {"prompts": [chat_value(r["prompt"]) for r in records],
                  "completions": [chat_value(r.get("completion")) for r in records]}
    else:
        if not has_pairs:
            check_columns(records, ("text",), where=args.data)
        inputs = {"texts": [whole_text(r)
                            for r in records]}

    def progress(result: dict) -> None:
        print(f"  {result['name']}: {result['tokens']} tokens in {result['seconds']:.1f}s", flush=True)

    manifest = extract_sharded(args.model, args.out, layers=args.layers, pooling=args.pooling, span=span,
                               batch_size=args.batch_size, max_length=args.max_length, shard_size=args.shard_size,
                               actors=args.actors, threads_per_actor=args.threads_per_actor, address=args.address,
                               dtype=args.dtype, overwrite=args.overwrite, load=False, progress=progress, **inputs)
    meta = manifest["metadata"]
    run = meta.get("run", {})
    print(f"activations of {meta['n']} inputs, layers {meta['layers']} ({meta['pooling']} over {meta['span']}) "
          f"in {args.out}: {len(meta['shards'])} shards"
          + (" (already complete: nothing to do)" if manifest.get("reused") else
             f", {run.get('shards_written', 0)} written and {run.get('shards_skipped', 0)} already complete"))
    return 0


def _add_probes(sub: argparse._SubParsersAction) -> None:
    probes = sub.add_parser("probes", help="train and evaluate linear probes on hidden states",
                            description="Linear probes (logistic regression on standardised activations).")
    psub = probes.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = psub.add_parser("train", help="train a probe set (training + held-out probes) and report AUROC",
                            description="Extract activations of labelled generations, fit one probe per layer "
                                        "(C chosen on validation by AUROC), pick the training probe(s) and the "
                                        "held-out probes, print a table of AUROC by layer and role, and save the "
                                        "probe set (safetensors + JSON cards) with report.json/report.md in it.")
    train.add_argument("--testbed", help="testbed folder (model/ and data/probe_{train,val,test}.jsonl)")
    train.add_argument("--model", help="model folder (instead of --testbed)")
    train.add_argument("--train", help="labelled training file (jsonl/parquet)")
    train.add_argument("--val", help="labelled validation file (chooses C and the threshold)")
    train.add_argument("--test", help="labelled test file (optional; reported only)")
    train.add_argument("--out", required=True, help="output folder or s3:// URI for the probe set")
    _config_args(train, "layers=[6,12]")
    train.set_defaults(handler=_run_probes_train)

    ev = psub.add_parser("eval", help="AUROC of saved probes on any model and labelled file",
                         description="Score a labelled file with every probe of a set on a model (the "
                                     "probes' own model or a fine-tuned one) and print AUROC per probe.")
    ev.add_argument("--model", required=True, help="model folder or URI")
    ev.add_argument("--probes", required=True, help="probe set folder or URI")
    ev.add_argument("--data", required=True, help="labelled jsonl/parquet file")
    ev.add_argument("--label-column", default="label")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--max-length", type=int, default=256)
    ev.add_argument("--same-weights", action="store_true",
                    help="require the probes' own model (same model hash), not only the same architecture")
    ev.add_argument("--out", help="write the results as JSON here (file or URI)")
    ev.set_defaults(handler=_run_probes_eval)


def _run_probes_train(args: argparse.Namespace) -> int:
    from probe_dpo.config import load_config
    from probe_dpo.probes import ProbeTrainConfig, train_probes

    if args.testbed is None and not (args.model and args.train and args.val):
        raise UserError("probes train needs --testbed DIR, or --model with --train and --val (and optionally --test)")
    cfg = load_config(ProbeTrainConfig, args.config, args.overrides)
    _reachable(args.out)
    result = train_probes(cfg, testbed=args.testbed, model=args.model, train=args.train, val=args.val,
                          test=args.test, out=args.out)
    print(result.markdown)
    print(f"probe set written to {args.out} (report.json, report.md inside)")
    return 0


def _run_probes_eval(args: argparse.Namespace) -> int:
    from probe_dpo.probes import ProbeSet, eval_markdown, evaluate_probes
    from probe_dpo.storage import json_text

    probeset = ProbeSet.load(args.probes)
    _reachable(args.out)
    results = evaluate_probes(probeset, args.model, args.data, label_column=args.label_column,
                              batch_size=args.batch_size, max_length=args.max_length,
                              same_weights=args.same_weights)
    print(eval_markdown(results))
    if args.out:
        from probe_dpo import storage

        storage.write_text(args.out, json_text(results))
        print(f"results written to {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from probe_dpo.training.config import METHODS

    train = sub.add_parser(
        "train", help="fine-tune against probes or a classifier (SFT/DPO on Ray Train + DeepSpeed)",
        description="One training run. Methods: " + ", ".join(METHODS) + ". probe-dpo / classifier-dpo sample "
                    "sampling.k completions per prompt from the policy, rank them by the probe (or classifier) "
                    "signal and train DPO on the pairs; random-dpo shuffles those pairs' labels (a control); "
                    "probe-sft adds penalty.weight x probe probability to the LM loss; classifier-sft filters the "
                    "SFT data with the classifier; sft is plain SFT; dpo trains on a given data.pairs file. "
                    "Every input is checked before any compute. Example: probe-dpo train testbed=runs/demo/testbed "
                    "method=probe-dpo probes=runs/demo/probes/single out=runs/probe-dpo")
    _config_args(train, "train.lr=1e-5")
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from probe_dpo.config import load_config
    from probe_dpo.training import TrainConfig, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    summary = train(cfg)
    print(f"{cfg.method}: policy at {summary.get('policy')}; summary in {cfg.out}/train.json")
    return 0


def _add_attribute(sub: argparse._SubParsersAction) -> None:
    att = sub.add_parser(
        "attribute", help="rank a preference set's pairs and sources by a behaviour direction; mitigate",
        description="Probe-based data attribution (runs probe_dpo/workflows/attribution.py, as a Ray job would): each "
                    "pair's score is cos(act(prompt, chosen) - act(prompt, rejected), v_b) on the model before "
                    "DPO (response tokens, Ray-sharded extraction), v_b the probe's direction or the difference "
                    "of means of labelled examples. Writes scores.parquet, sources.json, clusters.json, "
                    "audit.json, the mitigated pair files and report.md/html under --out. Example: probe-dpo "
                    "attribute --pairs pairs.jsonl --model base/ --probes probes/ --out runs/attr "
                    "--mitigate filter,swap,drop-sources")
    att.add_argument("--pairs", help="preference pairs: jsonl/parquet/save_to_disk folder with prompt, chosen, "
                                     "rejected (and optionally source); default with --testbed: the poisoned mix")
    att.add_argument("--model", help="the model before DPO (save_pretrained folder or URI)")
    att.add_argument("--probes", help="a probe set trained on this model (its probe gives a direction and the layer)")
    att.add_argument("--out", required=True, help="output folder or s3:// URI")
    att.add_argument("--mitigate", type=_name_list, default=None,
                     help="comma-separated mitigations: filter, swap, drop-sources")
    att.add_argument("--testbed", help="testbed folder (model, behaviour data, held-out prompts)")
    att.add_argument("--behaviour-data", help="labelled prompt/completion/label file for the difference-of-means "
                                              "direction (default with --testbed: its probe_train split)")
    att.add_argument("--poison-labels", help="file with column poisoned (which pairs are bad; evaluation only)")
    att.add_argument("--comparators", type=_name_list, default=None,
                     help="comma-separated comparators: judge, gradient, gradient-factorized, gradient-less")
    att.add_argument("--retrain", action="store_true",
                     help="retrain plain DPO on the raw and every mitigated set and measure the behaviour")
    att.add_argument("--in-process", action="store_true", help="extract activations in this process, not on Ray actors")
    _config_args(att, "ranking.bootstrap=500",
                 f"; or a bundled config by name: {', '.join(bundled_configs('attribute'))}")
    att.set_defaults(handler=_run_attribute)


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _run_attribute(args: argparse.Namespace) -> int:
    import json

    from probe_dpo.config import load_config
    from probe_dpo.workflows import bundled_config
    from probe_dpo.workflows.attribution import run
    from probe_dpo.workflows.attribution_study.config import AttributionConfig

    overrides = list(args.overrides)
    for key, value in (("pairs", args.pairs), ("model", args.model), ("probes", args.probes), ("out", args.out),
                       ("testbed", args.testbed), ("behaviour_data", args.behaviour_data),
                       ("poison_labels", args.poison_labels)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.mitigate is not None:
        overrides.append(f"mitigate={json.dumps(args.mitigate)}")
    if args.comparators is not None:
        overrides.append(f"comparators={json.dumps(args.comparators)}")
    if args.retrain:
        overrides.append("retrain.enabled=true")
    if args.in_process:
        overrides.append("extraction.in_process=true")
    summary = run(load_config(AttributionConfig, bundled_config(args.config), overrides))
    top = summary["sources"]["probe"][0] if summary["sources"].get("probe") else None
    print(f"attribution: {summary['direction']} at layer {summary['layer']}, k = {summary['k']}; "
          + (f"top source {top['source']} (mean score {top['mean_score']:.3f}); " if top else "")
          + (f"recall@k {', '.join(f'{m} {v:.3f}' for m, v in summary['recall'].items())}; " if summary["recall"] else "")
          + f"report {summary['report']['html']}")
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    aud = sub.add_parser(
        "audit", help="concept audit of a preference set before training on it",
        description="For every direction (a probe set's probes, a directions artifact written by attribute), "
                    "over the whole set and per source: the mean projection of (chosen - rejected) response "
                    "activations (Δ, 95% CI), the effect size d = Δ/SD and split-half sign agreement, ranked "
                    "by |d|: the concepts DPO on this set will push up or down.")
    aud.add_argument("--pairs", required=True, help="preference pairs (jsonl/parquet/save_to_disk folder)")
    aud.add_argument("--model", required=True, help="the model before DPO")
    aud.add_argument("--directions", required=True, action="append",
                     help="a probe set or a directions artifact (repeat for several)")
    aud.add_argument("--out", help="write the table as JSON here (file or URI)")
    aud.add_argument("--in-process", action="store_true", help="extract in this process, not on Ray actors")
    aud.add_argument("--batch-size", type=int, default=16)
    aud.add_argument("--max-length", type=int, default=256)
    aud.add_argument("--address", default=None, help="Ray address to join (default: a local Ray)")
    aud.set_defaults(handler=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    from probe_dpo.attribution.audit import audit_markdown, audit_pairs

    _reachable(args.out)
    result = audit_pairs(args.pairs, args.model, args.directions, in_process=args.in_process,
                         batch_size=args.batch_size, max_length=args.max_length, address=args.address)
    print(audit_markdown(result["rows"], f"Concept audit of {args.pairs}"))
    if args.out:
        from probe_dpo import storage
        from probe_dpo.storage import json_text

        storage.write_text(args.out, json_text(result))
        print(f"audit written to {args.out}")
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    cfg = sub.add_parser("config", help="show a command's config: every key, its value and what it means",
                         description="Config discovery: the keys a command takes, resolved from its defaults, a "
                                     "YAML file and dotted overrides, each with its description.")
    csub = cfg.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved config with every key's description",
                           description="Print the resolved config of a command as YAML, each key commented with its "
                                       "description. Example: probe-dpo config show --for train method=dpo train.lr=3e-5")
    show.add_argument("--for", dest="kind", choices=CONFIG_KINDS, default="experiment",
                      help="whose config: experiment (default), train, testbed, probes, attribute")
    show.add_argument("--config", help="a YAML config file (experiment: or a bundled one by name: "
                                       f"{', '.join(bundled_configs('experiment'))}; attribute: "
                                       f"{', '.join(bundled_configs('attribute'))}). Default: the one the "
                                       "command itself reads (experiment: toxicity)")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="dotted overrides of the --for command's config, e.g. seeds=[0,1] (experiment)")
    show.set_defaults(handler=_run_config_show)


# The command whose config each ``config show --for`` kind shows.
CONFIG_COMMANDS = {"experiment": ("experiment",), "train": ("train",), "testbed": ("testbed", "build"),
                   "probes": ("probes", "train"), "attribute": ("attribute",)}


def default_config(kind: str) -> str | None:
    """The ``--config`` the command behind ``kind`` reads when given none (experiment: the bundled
    toxicity config), so ``config show`` shows what the command runs."""
    parser = build_parser()
    for name in CONFIG_COMMANDS[kind]:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return next(a.default for a in parser._actions if a.dest == "config")


def _run_config_show(args: argparse.Namespace) -> int:
    from probe_dpo.config import load_config, show
    from probe_dpo.workflows import bundled_config

    config = args.config if args.config is not None else default_config(args.kind)
    path = bundled_config(config) if args.kind in ("experiment", "attribute") else config
    print(show(load_config(_config_class(args.kind), path, args.overrides)), end="")
    return 0


def version() -> str:
    """The installed distribution's version (its metadata); the package's own when not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("probe-dpo")
    except PackageNotFoundError:
        from probe_dpo import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="probe-dpo",
        description="Post-train language models against linear probes on their own hidden states.")
    parser.add_argument("--version", action="version", version=f"probe-dpo {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_experiment, _add_report, _add_testbed, _add_activations, _add_probes, _add_train,
                _add_attribute, _add_audit, _add_config):
        add(sub)
    return parser


def absolute_args(args: argparse.Namespace) -> argparse.Namespace:
    """Local paths in ``args`` made absolute (inputs that exist, and outputs); URIs unchanged."""
    from probe_dpo import storage

    def fix(value, output: bool):
        if isinstance(value, list):
            return [fix(v, output) for v in value]
        if not isinstance(value, str) or not value or storage.is_remote(value) or value.startswith("file://"):
            return value
        return storage.absolute(value) if output or os.path.exists(os.path.expanduser(value)) else value

    for name in PATH_INPUTS + PATH_OUTPUTS:
        if hasattr(args, name):
            setattr(args, name, fix(getattr(args, name), name in PATH_OUTPUTS))
    return args


def main(argv: list[str] | None = None) -> int:
    from probe_dpo.logs import setup

    setup()  # the one place a command configures its log lines
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return guarded(lambda: handler(absolute_args(args)))


if __name__ == "__main__":
    sys.exit(main())
