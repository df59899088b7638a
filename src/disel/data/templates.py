"""Prompt templates: the one home of every instruction format the project trains, evaluates or records on.

Each template is a ``str.format`` pattern with one ``{instruction}`` placeholder; the response follows it.
``alpaca`` is the Stanford Alpaca format (with its one-sentence preamble), as in the paper's math runs;
``magicoder`` is Magicoder's, as in its code runs; ``qa`` is a compact question/answer format (the demo's).
"""

from __future__ import annotations

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
MAGICODER = (
    "You are an exceptionally intelligent coding assistant that consistently delivers accurate and reliable "
    "responses to user instructions.\n\n@@ Instruction\n{instruction}\n\n@@ Response\n"
)
# A third of the Alpaca prompt's tokens, so three times the steps per second on small models.
QA = "Question: {instruction}\nAnswer: "

TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "magicoder": MAGICODER, "qa": QA}


def prompt_template(name_or_text: str) -> str:
    """A template by name (``alpaca``, ``magicoder``, ``qa``), or the text itself as a template."""
    return TEMPLATES.get(name_or_text, name_or_text)


def is_template(name_or_text: str) -> bool:
    """True for a known name or a pattern with the ``{instruction}`` placeholder."""
    return name_or_text in TEMPLATES or "{instruction}" in name_or_text


def format_prompt(template: str, instruction: str, context: str | None = None) -> str:
    """The prompt of one instruction (and its optional extra context, appended after a blank line)."""
    text = f"{instruction}\n\n{context}" if context else instruction
    return prompt_template(template).format(instruction=text)
