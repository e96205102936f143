"""TRL's two data formats, turned into the token sequences a model sees.

*Standard* inputs are strings: a prompt is continued as raw text (the tokenizer's own special
tokens added), a completion follows it. *Conversational* inputs are lists of
``{"role", "content"}`` messages: they go through the tokenizer's chat template, as TRL does
for training (``apply_chat_template``), so generation, activation extraction and training see
the same sequence. A conversational prompt is rendered with the generation prompt (the
assistant turn's header); a conversational completion is the rest of the rendered whole
conversation; a string completion of a conversational prompt (what a model generated after
the header) is kept as it is. A tokenizer without a chat template refuses conversational
inputs with one line.
"""

from __future__ import annotations

from typing import Any, Sequence

from probe_dpo.data import is_messages
from probe_dpo.errors import UserError


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template(tokenizer: Any, messages: list, *, generation_prompt: bool) -> str:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"conversational data (lists of role/content messages) needs a tokenizer with a chat "
                        f"template; {name} has none: give strings (TRL's standard format) instead")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a template that rejects these messages (roles, order)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the chat template refused a conversation ({first})") from None


def render_prompt(tokenizer: Any, prompt: Any) -> tuple[str, bool]:
    """(text, add_special_tokens) of a prompt: a string as it is, a message list through the chat
    template with the generation prompt (the template writes its own special tokens)."""
    if is_messages(prompt):
        return _template(tokenizer, list(prompt), generation_prompt=True), False
    return str(prompt), True


def render_text(tokenizer: Any, text: Any) -> tuple[str, bool]:
    """(text, add_special_tokens) of a whole text: a string, or a conversation (``messages``)."""
    if is_messages(text):
        return _template(tokenizer, list(text), generation_prompt=False), False
    return str(text), True


def render_pair(tokenizer: Any, prompt: Any, completion: Any) -> tuple[str, str, bool]:
    """(prompt text, completion text, add_special_tokens for the prompt) of a prompt and its
    completion in either format (a string prompt with a message completion uses the message's
    content as the completion)."""
    if not is_messages(prompt):
        if is_messages(completion):
            completion = "".join(str(m.get("content") or "") for m in completion)
        return str(prompt), str(completion), True
    head, _ = render_prompt(tokenizer, prompt)
    if not is_messages(completion):
        return head, str(completion), False
    whole = _template(tokenizer, list(prompt) + list(completion), generation_prompt=False)
    if whole.startswith(head):
        return head, whole[len(head):], False
    plain = _template(tokenizer, list(prompt), generation_prompt=False)  # a template without a header
    if whole.startswith(plain):
        return plain, whole[len(plain):], False
    return head, "".join(str(m.get("content") or "") for m in completion), False


def render_prompts(tokenizer: Any, prompts: Sequence[Any]) -> tuple[list[str], bool]:
    """Prompt texts and the one ``add_special_tokens`` flag for a batch; UserError on a mix of
    the two formats (a batch is tokenized in one call)."""
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    flags = {flag for _, flag in rendered}
    if len(flags) > 1:
        raise UserError("prompts mix strings and message lists: give every prompt in one format")
    return [text for text, _ in rendered], (flags.pop() if flags else True)


def trl_pair(record: dict) -> dict:
    """A pair as TRL's DPOTrainer takes it: all three columns strings, or all message lists (a
    string completion of a conversational prompt becomes an assistant message, a string prompt
    of conversational completions a user message)."""
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if any(is_messages(v) for v in (prompt, chosen, rejected)):
        def msgs(v: Any, role: str) -> list:
            return list(v) if is_messages(v) else [{"role": role, "content": str(v)}]

        return {"prompt": msgs(prompt, "user"), "chosen": msgs(chosen, "assistant"),
                "rejected": msgs(rejected, "assistant")}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def trl_sft_row(record: dict) -> dict:
    """An SFT row as TRL's SFTTrainer takes it: ``messages`` (a conversation), ``prompt`` +
    ``completion`` (both in one format) or ``text``."""
    if "messages" in record and record["messages"] is not None:
        return {"messages": list(record["messages"])}
    if "completion" in record and "prompt" in record:
        prompt, completion = record["prompt"], record["completion"]
        if is_messages(prompt) or is_messages(completion):
            return {"prompt": prompt if is_messages(prompt) else [{"role": "user", "content": str(prompt)}],
                    "completion": completion if is_messages(completion)
                    else [{"role": "assistant", "content": str(completion)}]}
        return {"prompt": prompt, "completion": completion}
    return {"text": record["text"]}
