"""`finetuned+agent`: the model decides when to search the docs, instead of always being given passages.

    result = evaluate_agent(generator, examples, "qa", retriever, top_k=1, max_rounds=2)
    result.metrics["f1"], result.extra["tool_calls_per_example"], result.prompt_tokens_per_example

Every question is asked with one tool offered, `search_docs(query)`, over the same BM25 retriever
RAG uses. Batched by rounds: all questions are answered; those whose answer is a `search_docs`
call get the retriever's passages back as a tool turn and are asked again, up to `max_rounds`
generations per question. The last round's text (calls taken out) is the answer scored. A
question answered from memory costs one prompt; a search costs a second, longer one, so
`prompt_tokens_per_example` sums the prompts of every round (what an API bills; nothing is
cached between rounds here), and `tool_calls_per_example` counts the calls made.

The tool-call format (tools in the system turn, `<tool_call>` blocks, results as tool turns) is
`specialize.tools`; the run's own template renders it, exactly as training did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.progress import Progress

from specialize.data.formats import Example, load_examples
from specialize.errors import UserError
from specialize.evaluate.systems import SystemResult, question_of, run_settings, with_tools
from specialize.evaluate.tasks import score

SEARCH_DOCS = {"type": "function", "function": {
    "name": "search_docs",
    "description": "Search the documentation; returns the best-matching passages.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
TOOLS = [SEARCH_DOCS]
NO_PASSAGE = "No passage matches the query."


def search_result(passages) -> str:
    """A search_docs result: the passages numbered as in a RAG prompt's context."""
    from specialize.retrieval import format_passages

    return format_passages(passages) or NO_PASSAGE


def _call_results(calls: list[dict], retriever, top_k: int) -> list[str]:
    """The tool turn's content for each call: passages for a valid search, else what was wrong."""
    from specialize.tools import call_arguments, check_call

    results: list[str | None] = []
    queries: list[str] = []
    for call in calls:
        problem = check_call(call, TOOLS)
        results.append(f"error: {problem}" if problem else None)
        if not problem:
            queries.append(call_arguments(call)[1]["query"])
    found = iter(retriever.search_many(queries, top_k) if queries else [])
    return [r if r is not None else search_result(next(found)) for r in results]


def evaluate_agent(generator, examples: list[Example], task: str, retriever, *, top_k: int = 3,
                   max_new_tokens: int = 64, batch_size: int = 32, max_rounds: int = 2,
                   progress: Progress | None = None, description: str = "agent") -> SystemResult:
    """Answer every example as an agent with search_docs, and score the final answers.

    Args:
        generator: a `specialize.generate.Generator` whose template renders tools.
        retriever: what search_docs searches (a `Retriever`).
        max_new_tokens: most tokens of an answer; a round may write a call, so each round gets this
            plus the tokens of an empty search_docs call's framing.
        max_rounds: generations per question at most; a call made in the last round is not run
            (the answer is then the text around it, usually empty).

    Returns:
        a SystemResult whose rows hold the whole conversation (`messages`), the calls made
        (`tool_calls`), the passages returned (`context`) and tokens summed over rounds;
        `metrics` adds `tool_calls_per_example` and `search_rate` (share of questions with a call),
        `extra` holds `tool_calls_per_example`.
    """
    from specialize.generate import ContextOverflow, split_reasoning
    from specialize.tools import call_arguments, parse_tool_calls, render_tool_calls

    if max_rounds < 1:
        raise UserError(f"agent rounds must be at least 1 (got {max_rounds})", field="agent_rounds")
    start = time.perf_counter()
    n = len(examples)
    generator = with_tools(generator, TOOLS)
    # A round may be a call, whose JSON framing comes on top of the query: the budget of an answer
    # plus that framing, so that a query as long as an answer is not cut off mid-call.
    budget = max_new_tokens + len(generator.text_ids(render_tool_calls([{"name": SEARCH_DOCS["function"]["name"],
                                                                          "arguments": {"query": ""}}])))
    conversations = [[dict(m) for m in e.prompt_messages] for e in examples]
    prompt_tokens, completion_tokens, rounds = [0] * n, [0] * n, [0] * n
    calls: list[list[dict]] = [[] for _ in range(n)]
    contexts: list[list[str]] = [[] for _ in range(n)]
    final: list[tuple[str, object] | None] = [None] * n
    bar = progress.add_task(description, total=n) if progress is not None else None
    active = list(range(n))
    for round_number in range(1, max_rounds + 1):
        try:
            completions = generator.generate([conversations[i] for i in active], max_new_tokens=budget,
                                             temperature=0.0, batch_size=batch_size)
        except ContextOverflow as e:
            i = active[e.index]
            raise UserError(f"{description}: round {round_number}'s prompt is {e.prompt_tokens} tokens, which plus "
                            f"its answer budget ({budget}: max_new_tokens plus a call's framing) exceeds the "
                            f"model's context of {e.context} tokens; "
                            "lower --max-new-tokens, --top-k or --agent-rounds, or shorten the example",
                            path=examples[i].source or None) from None
        searching = []
        for i, c in zip(active, completions):
            prompt_tokens[i] += c.prompt_tokens
            completion_tokens[i] += c.completion_tokens
            rounds[i] = round_number
            text, made = parse_tool_calls(c.text)
            calls[i] += made
            if made and round_number < max_rounds:
                conversations[i].append({"role": "assistant", "content": text, "tool_calls": made})
                searching.append((i, made))
            else:
                final[i] = (text, c)
        for (i, made), results in zip(searching, [_call_results(m, retriever, top_k) for _, m in searching]):
            for call, result in zip(made, results):
                conversations[i].append({"role": "tool", "tool_call_id": call["id"], "content": result})
                contexts[i].append(result)
        active = [i for i, _ in searching]
        if bar is not None:
            progress.update(bar, completed=n - len(active))
        if not active:
            break
    seconds = time.perf_counter() - start

    rows = []
    for i, (example, (text, c)) in enumerate(zip(examples, final)):
        reasoning, answer = split_reasoning(text)
        rows.append({"index": i, "question": question_of(example), "prediction": answer, "reasoning": reasoning,
                     "reference": example.reference, "stopped": c.stopped, "finish_reason": c.finish_reason,
                     "context": "\n\n".join(contexts[i]) or None, "prompt_tokens": prompt_tokens[i],
                     "completion_tokens": completion_tokens[i], "rounds": rounds[i],
                     "tool_calls": [dict(zip(("name", "arguments"), call_arguments(call))) for call in calls[i]],
                     "source": example.source, "messages": conversations[i]})
    metrics, per_example = score(task, rows)
    tool_calls = sum(len(c) for c in calls) / n
    metrics["tool_calls_per_example"] = tool_calls
    metrics["search_rate"] = sum(1 for c in calls if c) / n
    return SystemResult(metrics, per_example, rows, seconds, seconds / n, sum(prompt_tokens) / n,
                        sum(completion_tokens) / n, extra={"tool_calls_per_example": tool_calls})


def _names_called(example: Example) -> set[str]:
    names = set()
    for message in example.messages or []:
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            names.add(function.get("name"))
    return names


def trained_with_search(run: str) -> bool:
    """Whether a run's training data (its config.yaml `data`) has assistant turns calling search_docs."""
    data = list(run_settings(run).get("data") or [])
    if not data or not all(Path(p).exists() for p in data):
        return False  # not a specialize run, or its data moved: no agent unless asked for
    try:
        examples = load_examples(data, None)
    except (OSError, UserError, json.JSONDecodeError):
        return False
    return any(SEARCH_DOCS["function"]["name"] in _names_called(e) for e in examples)
