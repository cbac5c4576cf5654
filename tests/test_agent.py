"""finetuned+agent: the search_docs loop over the run's real template, with a scripted model.

The model's outputs are scripted (a tiny random model never calls a tool), everything else is
real: the chatml template renders the tools, calls and results; the parser reads the calls; BM25
answers the searches; prompt tokens are the rendered prompts' real lengths.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from specialize.data.formats import Example
from specialize.data.templates import install_template, ours
from specialize.errors import UserError
from specialize.evaluate.agent import NO_PASSAGE, TOOLS, evaluate_agent, trained_with_search
from specialize.evaluate.systems import with_tools
from specialize.generate import Completion, Generator
from specialize.model import load_tokenizer
from specialize.retrieval import Retriever, format_passages
from helpers import write_jsonl

KNOWN = Example(messages=[{"role": "user", "content": "What does json.dumps do?"},
                          {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}])
UNKNOWN = Example(messages=[{"role": "user", "content": "What does shlex.quote do?"},
                            {"role": "assistant", "content": "Return a shell-escaped version of the string s."}])
DOCS = [{"text": "shlex.quote(s) Return a shell-escaped version of the string s.", "title": "shlex.quote"},
        {"text": "csv.reader(f) Return a reader object over the lines of f.", "title": "csv.reader"}]


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory, tiny_llama):
    run = tmp_path_factory.mktemp("agent-run")
    shutil.copytree(tiny_llama, run / "model")
    config = json.loads((run / "model" / "config.json").read_text())  # the tools block alone is ~400 tokens
    (run / "model" / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    tokenizer = load_tokenizer(run / "model")
    install_template(tokenizer, ours("chatml", tokenizer))
    tokenizer.save_pretrained(run / "model")
    return run / "model"


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return Retriever.build(write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", DOCS))


def scripted(generator: Generator, monkeypatch, reply, prompts: list[str]) -> Generator:
    """`generator` answering `reply(prompt_text)` instead of running its model; prompts are recorded."""
    def generate_ids(batch, *, max_new_tokens, **_):
        texts = [generator.tokenizer.decode(ids) for ids in batch]
        prompts.extend(texts)
        return [Completion(reply(text), "stop", len(ids), 5) for text, ids in zip(texts, batch)]

    monkeypatch.setattr(generator, "generate_ids", generate_ids)
    return generator


def searcher(prompt: str) -> str:
    """Answers json.dumps from memory; searches for anything else, then copies the passage's sentence."""
    if "<tool_response>" in prompt:
        return "Return a shell-escaped version of the string s." if "shell-escaped" in prompt else "?"
    if "json.dumps" in prompt:
        return "Serialize obj to a JSON formatted str."
    question = prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|endoftext|>")[0]
    return call_text("search_docs", {"query": question})


def test_known_answers_directly_unknown_searches_then_answers(chatml_run, retriever, monkeypatch):
    generator = Generator.load(chatml_run)
    prompts: list[str] = []
    result = evaluate_agent(scripted(generator, monkeypatch, searcher, prompts), [KNOWN, UNKNOWN], "qa",
                            retriever, top_k=1, max_new_tokens=8)
    known, unknown = result.rows
    assert [r["prediction"] for r in result.rows] == [KNOWN.reference, UNKNOWN.reference]
    assert result.metrics["exact_match"] == 1.0
    # every prompt offers the tool in its system turn, rendered by the run's template
    assert len(prompts) == 3 and all(p.startswith("<|im_start|>system\n# Tools") and '"search_docs"' in p
                                     for p in prompts)
    assert known["tool_calls"] == [] and known["rounds"] == 1 and known["context"] is None
    assert unknown["tool_calls"] == [{"name": "search_docs", "arguments": {"query": "What does shlex.quote do?"}}]
    passage = format_passages(retriever.search(UNKNOWN.messages[0]["content"], 1))
    assert passage.startswith("[1] shlex.quote\n") and DOCS[0]["text"] in passage  # the title heads it
    assert unknown["rounds"] == 2 and unknown["context"] == passage
    roles = [m["role"] for m in unknown["messages"]]
    assert roles == ["user", "assistant", "tool"] and unknown["messages"][1]["tool_calls"][0]["function"]["name"] \
        == "search_docs"
    second = prompts[2]  # the unknown question's second round: call and result rendered as trained
    assert call_text("search_docs", {"query": "What does shlex.quote do?"}) in second
    assert f"<tool_response>\n{passage}\n</tool_response>" in second
    # prompt tokens are summed over rounds: the search costs its question twice plus the passage
    view = with_tools(generator, TOOLS)
    first_round = [len(view.prompt_ids(e.prompt_messages)) for e in (KNOWN, UNKNOWN)]
    assert known["prompt_tokens"] == first_round[0]
    assert unknown["prompt_tokens"] == first_round[1] + len(generator.text_ids(second))
    assert result.prompt_tokens_per_example == (known["prompt_tokens"] + unknown["prompt_tokens"]) / 2
    assert result.metrics["tool_calls_per_example"] == 0.5 == result.extra["tool_calls_per_example"]
    assert result.metrics["search_rate"] == 0.5


def test_rounds_limit_bad_calls_and_empty_searches(chatml_run, retriever, monkeypatch):
    generator = Generator.load(chatml_run)
    always = scripted(generator, monkeypatch, lambda p: call_text("search_docs", {"query": "zzz qqq"}), [])
    result = evaluate_agent(always, [UNKNOWN], "qa", retriever, top_k=1, max_new_tokens=8, max_rounds=1)
    row = result.rows[0]
    assert row["prediction"] == "" and row["rounds"] == 1 and len(row["tool_calls"]) == 1  # made, never run
    assert row["context"] is None and result.metrics["tool_calls_per_example"] == 1.0

    result = evaluate_agent(always, [UNKNOWN], "qa", retriever, top_k=1, max_new_tokens=8, max_rounds=3)
    assert result.rows[0]["rounds"] == 3 and len(result.rows[0]["tool_calls"]) == 3
    assert [m["content"] for m in result.rows[0]["messages"] if m["role"] == "tool"] == [NO_PASSAGE] * 2

    wrong = scripted(Generator.load(chatml_run), monkeypatch, lambda p: "Done." if "<tool_response>" in p
                     else call_text("web_search", {"q": "x"}), [])
    row = evaluate_agent(wrong, [UNKNOWN], "qa", retriever, top_k=1, max_new_tokens=8).rows[0]
    tool_turn = row["messages"][-1]
    assert tool_turn["role"] == "tool" and tool_turn["content"].startswith("error: unknown function 'web_search'")
    assert row["prediction"] == "Done."


def test_a_template_without_tools_is_refused(tiny_llama, retriever):
    generator = Generator.load(tiny_llama)  # the plain qa template
    with pytest.raises(UserError, match="cannot render tools; tools need a template that does"):
        evaluate_agent(generator, [KNOWN], "qa", retriever)
    assert TOOLS[0]["function"]["name"] == "search_docs"


def test_trained_with_search_reads_the_runs_data(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "Q?", "answer": "A."}])
    calls = write_jsonl(tmp_path / "calls.jsonl", [{"tools": TOOLS, "messages": [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "search_docs", "arguments": json.dumps({"query": "Q?"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "[1] A."},
        {"role": "assistant", "content": "A."}]}])
    for name, data, expected in (("a", [plain], False), ("b", [plain, calls], True), ("c", [], False),
                                 ("d", [str(tmp_path / "moved.jsonl")], False)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"data": [str(p) for p in data]}))
        assert trained_with_search(str(run)) is expected, name


def test_compare_scores_finetuned_agent_beside_rag(chatml_run, tmp_path, tiny_llama, monkeypatch):
    from specialize.config import CompareConfig
    from specialize.evaluate.compare import compare

    run = chatml_run.parent
    (run / "config.yaml").write_text(yaml.safe_dump({"base": str(tiny_llama)}))

    def generate_ids(self, batch, *, max_new_tokens, **_):
        return [Completion(searcher(self.tokenizer.decode(ids)), "stop", len(ids), 5) for ids in batch]

    monkeypatch.setattr(Generator, "generate_ids", generate_ids)
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": e.messages[0]["content"], "answer": e.reference}
                                                 for e in (KNOWN, UNKNOWN)])
    cfg = CompareConfig(model=str(run), data=[str(test)], docs=str(write_jsonl(tmp_path / "docs.jsonl", DOCS)),
                        top_k=1, agent=True, max_new_tokens=8, out=tmp_path / "out")
    systems = {s["name"]: s for s in compare(cfg, progress=False)["systems"]}
    assert list(systems) == ["base", "base+rag", "finetuned", "finetuned+rag", "finetuned+agent"]
    agent = systems["finetuned+agent"]
    assert agent["tool_calls_per_example"] == 0.5 and agent["splits"]["test"]["exact_match"] == 1.0
    assert agent["splits"]["test"]["search_rate"] == 0.5
    assert all(systems[n]["tool_calls_per_example"] is None for n in systems if n != "finetuned+agent")
    rows = [json.loads(line) for line in (cfg.out / "predictions" / "finetuned+agent" / "test.jsonl").open()]
    assert [len(r["tool_calls"]) for r in rows] == [0, 1]


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_eval_asks_each_test_row_with_its_own_tools(chatml_run, tiny_llama, monkeypatch):
    from specialize.evaluate.systems import evaluate_system

    generator = Generator.load(chatml_run)
    prompts: list[str] = []
    reply = call_text("get_weather", {"city": "Oslo"})
    asked = Example(messages=[{"role": "user", "content": "Weather in Oslo?"},
                              {"role": "assistant", "content": reply}], meta={"tools": WEATHER})
    result = evaluate_system(scripted(generator, monkeypatch, lambda p: reply, prompts), [KNOWN, asked, KNOWN],
                             "tool_call", max_new_tokens=8)
    assert len(prompts) == 3
    with_weather = [p for p in prompts if '"get_weather"' in p]
    assert len(with_weather) == 1 and with_weather[0].startswith("<|im_start|>system\n# Tools")
    assert sum(p.startswith("<|im_start|>user\n") for p in prompts) == 2  # the rows without tools: no block
    assert result.rows[1]["prompt_tokens"] == len(generator.text_ids(with_weather[0]))
    assert result.metrics["n"] == 3
    with pytest.raises(UserError, match="cannot render tools"):
        evaluate_system(Generator.load(tiny_llama), [asked], "tool_call", max_new_tokens=8)


def test_eval_scores_tool_call_answers_as_tool_call_by_default(tmp_path):
    from specialize.config import EvalConfig
    from specialize.evaluate.run import run_eval

    reference = call_text("get_weather", {"city": "Oslo"})
    rows = [{"prediction": reference, "reference": reference}, {"prediction": "It is sunny.", "reference": reference}]
    metrics = run_eval(EvalConfig(predictions=str(write_jsonl(tmp_path / "p.jsonl", rows)), json_output=True))
    assert metrics["tool_name_accuracy"] == 0.5 and metrics["exact_match"] == 0.5
    assert "f1" not in metrics  # not scored as qa
    qa = run_eval(EvalConfig(predictions=str(tmp_path / "p.jsonl"), task="extract", json_output=True))
    assert "tool_name_accuracy" not in qa  # an explicit task is kept


def test_each_row_is_prompted_with_its_own_key_order_of_tools(chatml_run, monkeypatch):
    """Two rows offering the same tool with its keys in another order: each prompt lists the tool as the
    row wrote it (training rendered each row with its own), not the first row's order."""
    from specialize.evaluate.systems import generate_each_with_tools

    generator = Generator.load(chatml_run)
    prompts: list[str] = []
    scripted(generator, monkeypatch, lambda p: "ok", prompts)
    function = WEATHER[0]["function"]
    reordered = [{"function": {"parameters": function["parameters"], "name": "get_weather"}, "type": "function"}]
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    generate_each_with_tools(generator, [ask, ask], [WEATHER, reordered], max_new_tokens=4)
    assert len(prompts) == 2
    assert json.dumps(WEATHER[0]) in prompts[0] and json.dumps(reordered[0]) in prompts[1]
