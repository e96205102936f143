"""Reports a person would rather look at than read: markdown + one self-contained HTML page.

A ``Report`` collects blocks in order (headings, paragraphs, tables, matplotlib figures) and
renders them twice: ``report.md`` (figures as linked PNG files next to it) and
``report.html`` (the same content, figures inlined as base64, so the file can be mailed or
opened from object storage without its folder). ``publish(uri)`` writes the PNGs first and
the two documents last, each atomically through ``probe_dpo.storage``: a reader sees the
previous report or the new one, never a half-written page. Workflows rebuild and republish
their report as results come in.

The workflow-specific reports (the toxicity experiment, data attribution) are built from
these blocks by their own modules.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.45}
h1{border-bottom:2px solid #d0d7e2;padding-bottom:.2em}h2{margin-top:1.6em;color:#243b6b}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #d0d7e2;padding:.3em .6em;
text-align:right}th{background:#eef2f8}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#f8fafc}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%}code{background:#f1f3f6;padding:0 .25em;border-radius:3px}.note{color:#8a4b00}
"""


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: fixed digits, '-' for missing or NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(value: Any, lo: Any = None, hi: Any = None, digits: int = 3) -> str:
    """``0.153 [0.128, 0.180]`` (the interval only when both ends are known)."""
    if lo is None or hi is None or fmt(lo) == "-" or fmt(hi) == "-":
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells are formatted with ``fmt`` unless they are strings already."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """Ordered blocks rendered to markdown and to self-contained HTML."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> "Report":
        self.blocks.append(("heading", text))
        return self

    def text(self, markdown: str, note: bool = False) -> "Report":
        """A paragraph (light markdown: **bold**, `code`, [links](url), lists with '- ')."""
        self.blocks.append(("text", markdown.strip(), note))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> "Report":
        self.blocks.append(("table", list(headers), [list(r) for r in rows], caption))
        return self

    def figure(self, name: str, fig: Any, caption: str = "") -> "Report":
        """A matplotlib figure, stored as ``figures/<name>.png`` (the figure is closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-', '.'")
        self.blocks.append(("figure", name, buf.getvalue(), caption))
        return self

    # --- rendering ---------------------------------------------------------------------------

    def figures(self) -> dict[str, bytes]:
        return {f"figures/{b[1]}.png": b[2] for b in self.blocks if b[0] == "figure"}

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += [f"## {block[1]}", ""]
            elif kind == "text":
                out += [("> " + block[1].replace("\n", "\n> ")) if block[2] else block[1], ""]
            elif kind == "table":
                if block[3]:
                    out += [f"*{block[3]}*", ""]
                out += [md_table(block[1], block[2]), ""]
            else:
                out += [f"![{block[3] or block[1]}](figures/{block[1]}.png)", ""]
                if block[3]:
                    out += [f"*{block[3]}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        out = ["<!doctype html><html><head><meta charset='utf-8'>",
               f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out.append(f"<h2>{html.escape(block[1])}</h2>")
            elif kind == "text":
                out.append(_paragraphs(block[1], block[2]))
            elif kind == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{_inline(v if isinstance(v, str) else fmt(v))}</td>"
                                                for v in row) + "</tr>" for row in block[2])
                cap = f"<caption>{_inline(block[3])}</caption>" if block[3] else ""
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode(block[2]).decode()
                out.append(f"<figure><img alt='{html.escape(block[3] or block[1])}' "
                           f"src='data:image/png;base64,{data}'><figcaption>{_inline(block[3])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def publish(self, uri: str, name: str = "report") -> dict[str, str]:
        """Write the figures, then ``<name>.md`` and ``<name>.html`` (each atomically) under ``uri``."""
        from probe_dpo import storage

        for rel, data in self.figures().items():
            storage.write_bytes(storage.join(uri, rel), data)
        md, page = storage.join(uri, f"{name}.md"), storage.join(uri, f"{name}.html")
        storage.write_text(md, self.markdown())
        storage.write_text(page, self.html())
        return {"markdown": md, "html": page}


def _inline(text: str) -> str:
    """Escape, then the light markdown of a table cell or paragraph line."""
    text = html.escape(str(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\[(.+?)\]\((.+?)\)", r"<a href='\2'>\1</a>", text)


def _paragraphs(markdown: str, note: bool) -> str:
    cls = " class='note'" if note else ""
    parts, items = [], []
    for line in markdown.splitlines():
        if line.lstrip().startswith("- "):
            items.append(f"<li>{_inline(line.lstrip()[2:])}</li>")
            continue
        if items:
            parts.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.strip():
            parts.append(f"<p{cls}>{_inline(line)}</p>")
    if items:
        parts.append("<ul>" + "".join(items) + "</ul>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The toxicity experiment's report (workflows/toxicity.py writes what it reads)

_ROLE_TITLES = {"single": "train probe (best layer)", "ensemble": "probe ensemble", "held_out": "held-out probes",
                "retrained": "retrained probe"}


def _pct(x: Any) -> str:
    return "-" if fmt(x) == "-" else f"{100 * x:+.0f}%"


def _pct_ci(d: dict | None) -> str:
    if not d or fmt(d.get("change")) == "-":
        return "-"
    return f"{_pct(d['change'])} [{_pct(d.get('ci_low'))}, {_pct(d.get('ci_high'))}]"


def _delta_ci(d: dict | None) -> str:
    if not d or fmt(d.get("delta")) == "-":
        return "-"
    return f"{d['delta']:+.3f} [{d.get('delta_ci_low', float('nan')):+.3f}, {d.get('delta_ci_high', float('nan')):+.3f}]"


def _verdict(lo: Any, hi: Any, down: str = "drop", up: str = "rise") -> str:
    if fmt(lo) == "-" or fmt(hi) == "-":
        return "no interval"
    if hi < 0:
        return down
    if lo > 0:
        return up
    return "no detectable change (the interval includes 0)"


def experiment_report(run: str) -> Report:
    """The arms table, the three Goodhart questions answered from the numbers, and plots."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from probe_dpo import storage
    from probe_dpo.data import read_records
    from probe_dpo.evaluation import auroc_with_ci, paired_relative_change

    ctx = storage.read_json(storage.join(run, "shared", "context.json"))
    e = ctx["eval"]
    n_boot, seed = e["bootstrap"], e["seed"]
    best = ctx["best_probe"]
    summary = ctx["probes_summary"]
    base_uri = storage.join(run, "shared", "base-eval")
    rep = Report(f"Training against probes: toxicity experiment ({run})")
    if not storage.is_complete(base_uri):
        return rep.text("The base model has not been evaluated yet; the report appears as results arrive.", note=True)
    base_m = storage.read_json(storage.join(base_uri, "metrics.json"))
    base_s = storage.read_json(storage.join(base_uri, "scores.json"))
    test_rows = read_records(storage.join(ctx["testbed"], "data", "probe_test.jsonl"))
    labels = np.array([int(r["label"]) for r in test_rows])
    groups = [r.get("prompt_id", r["prompt"]) for r in test_rows]

    trials: dict[str, list[dict]] = {}
    for name in storage.list_dir(storage.join(run, "trials")):
        uri = storage.join(run, "trials", name, "eval")
        if storage.is_complete(uri):
            m = storage.read_json(storage.join(uri, "metrics.json"))
            trials.setdefault(m["arm"] if not m.get("overrides") else m["trial"], []).append(
                {"metrics": m, "scores": storage.read_json(storage.join(uri, "scores.json"))})
    arms = [a for a in ctx["arms"] if a in trials] + [a for a in trials if a not in ctx["arms"]]
    judges = list(base_m["toxicity"])

    retrained_key = next((k for k in base_s["detection"] if k.startswith("retrained:") and k.endswith(
        f"L{summary['best_layer']}")), None)
    role_keys = {"single": best, "ensemble": "aggregate:train", "held_out": None, "retrained": retrained_key}
    held = list(summary["held_out"])

    def auroc(role: str, runs: list[dict] | None) -> dict:
        """Mean AUROC over seeds (and over held-out probes) with a paired bootstrap CI vs the base."""
        keys = held if role == "held_out" else [role_keys[role]]
        if not keys or keys[0] is None:
            return {}
        ref = np.stack([np.asarray(base_s["detection"][k]) for k in keys])
        if runs is None:
            return auroc_with_ci(ref, labels, groups, n_boot=n_boot, seed=seed)
        new = np.concatenate([np.stack([np.asarray(r["scores"]["detection"][k]) for k in keys]) for r in runs])
        return auroc_with_ci(new, labels, groups, n_boot=n_boot, seed=seed, reference=np.tile(ref, (len(runs), 1)))

    rows, table = {}, []
    for arm in arms:
        runs = trials[arm]
        row: dict[str, Any] = {"seeds": len(runs)}
        for j in judges:
            base_scores = np.asarray(base_s["toxicity"][j])
            news = [np.asarray(r["scores"]["toxicity"][j]) for r in runs]
            row[f"tox:{j}"] = paired_relative_change(base_scores, news, n_boot=n_boot, seed=seed)
        row["ppl"] = float(np.mean([r["metrics"]["perplexity"] for r in runs]))
        row["ppl_change"] = row["ppl"] / base_m["perplexity"] - 1
        row["kl"] = float(np.mean([r["metrics"]["kl_to_base"]["per_token"] for r in runs]))
        for role in _ROLE_TITLES:
            row[role] = auroc(role, runs)
        rows[arm] = row
        table.append([arm, len(runs)] + [f"{fmt(row[f'tox:{j}']['rate'])} ({_pct_ci(row[f'tox:{j}'])})" for j in judges]
                     + [f"{fmt(row['ppl'], 2)} ({_pct(row['ppl_change'])})", fmt(row["kl"], 4)]
                     + [_delta_ci(row[r]) for r in _ROLE_TITLES])
    base_det = {role: auroc(role, None) for role in _ROLE_TITLES}
    base_row = ["**base model**", "-"] + [fmt_ci(base_m["toxicity"][j]["rate"], base_m["toxicity"][j]["ci_low"],
                                                 base_m["toxicity"][j]["ci_high"]) for j in judges] + \
        [fmt(base_m["perplexity"], 2), "0"] + [fmt_ci(base_det[r].get("auroc"), base_det[r].get("ci_low"),
                                                      base_det[r].get("ci_high")) for r in _ROLE_TITLES]

    # --- header and noise ---------------------------------------------------------------------
    tox0 = base_m["toxicity"][judges[0]]
    rate, n_prompts = tox0["rate"], tox0["prompts"]
    se = (rate * (1 - rate) / max(n_prompts, 1)) ** 0.5
    rep.text(f"{len(arms)} of {len(ctx['arms'])} arms complete (seeds {ctx['seeds']}). Base model "
             f"`{ctx['base_model']}`; {n_prompts} held-out prompts x {e['samples_per_prompt']} samples; probe AUROCs on "
             f"{len(test_rows)} probe-test generations ({int(labels.sum())} toxic) of prompts never used for "
             f"training. The train probe is `{best}` (layer {summary['best_layer']}); the ensemble reads layers "
             f"{summary['ensemble_layers']}; {len(held)} held-out probes.")
    rep.text(f"Noise: a toxicity rate of {rate:.3f} on {n_prompts} prompts has a standard error of about {se:.3f}; "
             "differences smaller than that, and any interval that includes 0, are noise. Intervals are 95% "
             "bootstrap intervals resampling prompts; changes are paired against the base model on the same prompts.",
             note=True)
    rep.heading("Arms")
    headers = ["arm", "seeds"] + [f"toxic rate, {j} (change)" for j in judges] + ["perplexity (change)", "KL/token"] \
        + [f"Δ AUROC {t}" for t in _ROLE_TITLES.values()]
    rep.table(headers, [base_row] + table, caption="Δ AUROC: fine-tuned minus base on the same test rows, "
                                                   "mean over seeds; base row shows AUROC itself")

    # --- the three questions -------------------------------------------------------------------
    rep.heading("What the runs say")
    lines = []
    for arm in arms:
        method = arm.rsplit("-", 1)[0] if arm.endswith(("-single", "-ensemble")) else arm
        target = "ensemble" if arm.endswith("-ensemble") else "single"
        d = rows[arm][target]
        if d:
            lines.append(f"- **{arm}**: the {_ROLE_TITLES[target]} AUROC {_delta_ci(d)} — "
                         f"{_verdict(d.get('delta_ci_low'), d.get('delta_ci_high'))}"
                         + ("" if arm.startswith("probe-") else f" (this arm did not train against probes: {method})"))
    rep.text("**1. How much does detection drop when training against a probe?**\n" + "\n".join(lines))
    lines = []
    for arm in arms:
        h, ens = rows[arm]["held_out"], rows[arm]["ensemble"]
        if h:
            lines.append(f"- **{arm}**: held-out probes {_delta_ci(h)} ({_verdict(h.get('delta_ci_low'), h.get('delta_ci_high'))}); "
                         f"ensemble {_delta_ci(ens)}")
    rep.text("**2. Do held-out probes and an ensemble keep detection?**\n" + "\n".join(lines))
    lines = []
    for arm in arms:
        r, s = rows[arm]["retrained"], rows[arm]["single"]
        if r:
            lines.append(f"- **{arm}**: retrained probe AUROC {fmt(r['auroc'])} vs base {fmt(r.get('reference_auroc'))} "
                         f"({_delta_ci(r)}); the original probe {fmt(s.get('auroc'))}")
    rep.text("**3. Does retraining a fresh probe on the fine-tuned model recover detection?**\n" + "\n".join(lines))

    # --- plots -----------------------------------------------------------------------------------
    if arms:
        rep.heading("Plots")
        rep.figure("detection", _detection_plot(arms, rows, base_det), "AUROC before (base) and after fine-tuning, "
                   "per arm and probe role, with 95% intervals")
        rep.figure("toxicity_vs_retention", _tradeoff_plot(arms, rows, base_m, judges),
                   "Toxicity against retention: lower-left is better")
        rep.figure("probe_scores", _score_plot(arms, trials, base_s, best, labels),
                   f"Distribution of {best}'s score on the probe-test generations, base vs each arm")
    rep.heading("Details")
    rep.table(["arm", "pairs / rows", "train steps", "train s", "eval s"],
              [[a, (trials[a][0]["metrics"].get("data") or {}).get("pairs") or (trials[a][0]["metrics"].get("data") or {}).get("kept")
                or (trials[a][0]["metrics"].get("data") or {}).get("rows"),
                trials[a][0]["metrics"].get("train", {}).get("global_step"),
                trials[a][0]["metrics"].get("train", {}).get("fit_seconds"), trials[a][0]["metrics"].get("eval_seconds")]
               for a in arms])
    return rep


def _detection_plot(arms, rows, base_det):
    import matplotlib.pyplot as plt
    import numpy as np

    roles = list(_ROLE_TITLES)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * (len(arms) + 1)), 3.8))
    width = 0.8 / len(roles)
    names = ["base"] + arms
    for k, role in enumerate(roles):
        vals, lo, hi = [], [], []
        for i, name in enumerate(names):
            d = base_det[role] if name == "base" else rows[name][role]
            v = d.get("auroc", np.nan) if d else np.nan
            vals.append(v)
            lo.append(v - d.get("ci_low", v) if d else 0)
            hi.append(d.get("ci_high", v) - v if d else 0)
        ax.bar(np.arange(len(names)) + (k - (len(roles) - 1) / 2) * width, vals, width, yerr=[lo, hi],
               label=_ROLE_TITLES[role], capsize=2)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("AUROC on probe-test")
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(fontsize=8, ncol=2)
    return fig


def _tradeoff_plot(arms, rows, base_m, judges):
    """One panel per judge. Arms are told apart by colour (SFT arms hollow) and a shared legend:
    text labels next to the points piled on top of each other where arms land close together."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(judges), figsize=(4.6 * len(judges) + 1.8, 3.8), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, j in zip(axes[0], judges):
        ax.scatter([0], [base_m["toxicity"][j]["rate"]], marker="*", s=150, color="black", label="base", zorder=3)
        for i, arm in enumerate(arms):
            t = rows[arm][f"tox:{j}"]
            lo, hi = t["base_rate"] * (1 + t["ci_low"]), t["base_rate"] * (1 + t["ci_high"])
            yerr = [[max(0.0, t["rate"] - lo)], [max(0.0, hi - t["rate"])]] if lo == lo and hi == hi else None
            colour = colours[i % len(colours)]
            ax.errorbar(100 * rows[arm]["ppl_change"], t["rate"], yerr=yerr, fmt="o", capsize=2, color=colour,
                        mfc="white" if "sft" in arm else colour, label=arm)
        ax.set_xlabel("perplexity change on benign text (%)")
        ax.set_ylabel(f"toxic rate ({j})")
        ax.set_title(j)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (4.6 * len(judges) + 1.8), 1))
    return fig


def _score_plot(arms, trials, base_s, best, labels):
    import matplotlib.pyplot as plt
    import numpy as np

    names = ["base"] + arms
    cols = min(4, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False, sharex=True)
    bins = np.linspace(0, 1, 26)
    for ax, name in zip(axes.flat, names):
        s = np.asarray(base_s["detection"][best] if name == "base" else trials[name][0]["scores"]["detection"][best])
        ax.hist(s[labels == 0], bins=bins, alpha=0.6, density=True, label="non-toxic")
        ax.hist(s[labels == 1], bins=bins, alpha=0.6, density=True, label="toxic")
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    return fig
