"""A behaviour that is not toxicity, end to end through the same experiment code: the bundled
negative-sentiment example sized for the tiny model, judged by a user's own function given as
``module:function``; then its report.html opened in headless Chromium. Also the pluggable
judges (a callable, a Hugging Face text-classification model) on their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from probe_dpo import judges
from probe_dpo.errors import UserError

USER_JUDGE = '''
"""A researcher's own judge: a text reads negative when it holds a negation or a negative word."""
NEGATIVE = {"not", "no", "never", "nothing", "bad", "worst", "boring", "awful", "terrible", "poor",
            "waste", "but", "don't", "didn't", "isn't", "wasn't", "can't", "hate", "stupid", "dull"}


def negativity(texts):
    """Ten times the share of negative words, capped at 1: one in ten words is fully negative."""
    out = []
    for t in texts:
        words = t.lower().replace(",", " ").replace(".", " ").split()
        out.append(min(1.0, 10.0 * sum(w in NEGATIVE for w in words) / max(len(words), 1)))
    return out
'''

JUDGE = "negativity=user_judges:negativity"


def test_judge_specs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_judges.py").write_text(USER_JUDGE + "\n\ndef broken(texts):\n    return [2.0 for _ in texts]\n")
    assert judges.parse_judge(JUDGE) == ("negativity", "callable", "user_judges:negativity")
    assert judges.parse_judge("vader-negative") == ("vader-negative", "builtin", "vader-negative")
    assert judges.parse_judge("hf:org/model#toxic") == ("hf:org/model#toxic", "hf", "org/model#toxic")
    judge = judges.get_judge(JUDGE)
    assert judge.name == "negativity"
    assert list(judge.score(["a lovely film", "it was not good", "not " + "fine " * 19])) == [0.0, 1.0, 0.5]
    file_judge = judges.get_judge(f"{tmp_path / 'user_judges.py'}:negativity")
    assert list(file_judge.score(["awful"])) == [1.0]
    with pytest.raises(UserError, match=r"outside \[0, 1\]"):
        judges.get_judge("user_judges:broken").score(["x"])
    for bad, needle in (("nope", "unknown judge 'nope'"), ("user_judges:absent", "has no function"),
                        ("no_such_module_xyz:f", "cannot import"), ("hf:org/model", "hf:<model id or folder>#<label>")):
        with pytest.raises(UserError) as info:
            judges.get_judge(bad)
        assert needle in str(info.value) and "\n" not in str(info.value)
    vader = judges.get_judge("vader-negative").score(["What a wonderful, lovely day.", "This is awful and I hate it."])
    assert vader[0] == 0.0 and vader[1] > 0.5


def test_hf_text_classification_judge(tmp_path, tiny_model_dir):
    """A Hugging Face text-classification model as a judge, loaded from a folder (a hub id goes
    through the same model_dir): the score is the probability of the named label."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2,
                         id2label={0: "POSITIVE", 1: "NEGATIVE"}, label2id={"POSITIVE": 0, "NEGATIVE": 1},
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    neg = judges.get_judge(f"hf:{tmp_path / 'clf'}#negative")
    pos = judges.get_judge(f"pos=hf:{tmp_path / 'clf'}#POSITIVE")
    texts = ["good", "a much longer text that is bad", "x"]
    a, b = neg.score(texts), pos.score(texts)
    assert a.shape == (3,) and np.allclose(a + b, 1.0) and pos.name == "pos"
    with pytest.raises(UserError, match="has no label 'toxic'"):
        judges.get_judge(f"hf:{tmp_path / 'clf'}#toxic")


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory, tiny_model_dir):
    """The bundled negative-sentiment example on the tiny model, run as a user would: the CLI in
    its own process (its own local Ray), the user's judge module on PYTHONPATH."""
    root = tmp_path_factory.mktemp("sentiment")
    (root / "judges").mkdir()
    (root / "judges" / "user_judges.py").write_text(textwrap.dedent(USER_JUDGE))
    overrides = {
        "name": "tiny-sentiment", "storage": str(root / "run"),
        "behaviour": {"model": str(tiny_model_dir), "heldout": 8, "max_prompts": 40, "label_judge": JUDGE,
                      "label_on": "prompt+completion", "samples_per_prompt": 3, "perplexity_passages": 3,
                      "generation": {"max_new_tokens": 6}},
        "judge": JUDGE, "arms": ["probe-dpo-single"],  # one trial: training against the new behaviour's probe
        "probes": {"layers": [], "ensemble_size": 2, "batch_size": 16}, "pairs": {"min_margin": 0.0},
        "sft_rows": 8, "dpo_train": {"max_steps": 2, "batch_size": 2, "max_length": 48},
        "sft_train": {"max_steps": 2, "batch_size": 2, "max_length": 48},
        "distributed": {"workers": 1, "threads_per_worker": 1, "zero_stage": 2},
        "eval": {"judges": [JUDGE, "vader-negative"], "heldout_prompts": 8, "samples_per_prompt": 2,
                 "perplexity_passages": 2, "perplexity_tokens": 32, "probe_train_rows": 60, "probe_val_rows": 30,
                 "bootstrap": 100},
        "search": {"metric": "toxicity.negativity.rate"}, "ray_cpus": 4,
    }
    config = root / "tiny-sentiment.yaml"
    from probe_dpo.workflows import bundled_config

    bundled = yaml.safe_load(open(bundled_config("sentiment")).read())
    for key, value in overrides.items():
        bundled[key] = {**bundled.get(key, {}), **value} if isinstance(value, dict) and key != "search" else value
    config.write_text(yaml.safe_dump(bundled))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "judges"), os.getcwd()])}
    proc = subprocess.run([sys.executable, "-m", "probe_dpo.cli", "experiment", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_second_behaviour_end_to_end(sentiment_run):
    info = json.loads((sentiment_run / "testbed" / "testbed.json").read_text())
    assert info["behaviour"] == "negative-sentiment" and info["train_judge"] == "negativity"
    assert set(info["score_columns"]) == {"negativity", "vader-negative"}
    results = json.loads((sentiment_run / "results.json").read_text())
    assert [r["arm"] for r in results["rows"]] == ["probe-dpo-single"]
    pairs = [json.loads(line) for line in (sentiment_run / "shared" / "pairs-classifier.jsonl").open()]
    assert pairs and all(p["signal"] == "classifier:" + JUDGE for p in pairs)  # the user's judge ranked them
    for row in results["rows"]:
        assert 0.0 <= row["toxicity.negativity.rate"] <= 1.0 and row["toxicity.vader-negative.rate"] is not None
    assert set(results["base"]["toxicity"]) == {"negativity", "vader-negative"}
    report = (sentiment_run / "report.md").read_text()
    assert "negative-sentiment experiment" in report and "figures/training_curves.png" in report


CHECK = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var arms = Array.prototype.slice.call(document.querySelectorAll('table')).filter(function (t) {
    var head = t.querySelector('thead th'); return head && head.textContent.trim() === 'arm'; });
  var rows = arms.length ? arms[0].querySelectorAll('tbody tr').length : 0;
  var out = document.createElement('pre'); out.id = 'render-check';
  out.textContent = JSON.stringify({images: imgs.length, loaded: loaded, arm_tables: arms.length, arm_rows: rows,
                                    width: document.body.scrollWidth});
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(sentiment_run, tmp_path):
    """The report as a person sees it: every plot decoded and shown, the arms table there."""
    page = tmp_path / "report.html"
    page.write_text((sentiment_run / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = proc.stdout.index('<pre id="render-check">') + len('<pre id="render-check">')
    check = json.loads(proc.stdout[start:proc.stdout.index("</pre>", start)].replace("&quot;", '"'))
    figures = (sentiment_run / "report.md").read_text().count("](figures/")
    assert check["images"] == figures >= 4  # detection TPR, AUROC, trade-off, training curves, ...
    assert check["loaded"] == check["images"]  # every plot decoded (a broken PNG has naturalWidth 0)
    assert check["arm_tables"] >= 1 and check["arm_rows"] == 2  # the base model and the arm
