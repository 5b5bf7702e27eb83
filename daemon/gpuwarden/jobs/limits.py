"""What a job may ask for: the bounds shared by the CLI (checked before sending), the control
socket's params model and jobs.spec.build_spec. Import-light on purpose (no pydantic), so that
the CLI can use it without slowing `gpuwarden --help`."""

from __future__ import annotations

import re

# The prompt and the negative prompt together. A submit is one request line on the control
# socket, at most control.rpc.MAX_REQUEST (64 KiB): 12,000 characters of 4-byte UTF-8 are
# 48,000 bytes, which leaves room for the rest of the request (model, engine, numbers). The
# control characters JSON would escape to six bytes each are refused.
MAX_PROMPT_CHARS = 12_000
MAX_COUNT = 8
MAX_STEPS = 500
ENGINES = ("", "auto", "diffusers", "preview")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # C0 controls but tab, LF, CR


def prompt_problems(prompt: str, negative_prompt: str = "") -> list[str]:
    """What is wrong with the prompts, if anything."""
    if not isinstance(prompt, str) or not prompt.strip():
        return ["prompt must not be empty"]
    problems = []
    total = len(prompt) + len(negative_prompt)
    if total > MAX_PROMPT_CHARS:
        problems.append(
            f"the prompt and negative prompt may hold at most {MAX_PROMPT_CHARS} characters "
            f"together (these hold {total})"
        )
    if _CONTROL.search(prompt) or _CONTROL.search(negative_prompt):
        problems.append("a prompt may not hold control characters (tab and newline are fine)")
    return problems
