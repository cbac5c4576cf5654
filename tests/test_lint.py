"""`specialize lint`: every planted defect is named, clean data passes, trained tokens are shown exactly.

Exact-output tests run without --base, where lengths are UTF-8 bytes and so do not depend on
the merges of the tokenizer trained in conftest; tests with a tokenizer assert what does not
depend on its merges (decoded text, codes, sources, counts).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from helpers import run_lint
from transformers import AutoTokenizer
from typer.testing import CliRunner

from specialize.cli import app
from specialize.config import LintConfig
from specialize.data.formats import load_examples
from specialize.data.lint import byte_tokenizer, check_examples, lint, marked, trained_pieces
from specialize.data.similarity import jaccard, matches, shingles, similar_pairs
from specialize.data.templates import resolve_template
from specialize.data.tokenize import encode_chat
from specialize.errors import UserError

pytestmark = pytest.mark.usefixtures("plain_output")  # lint's plain ⟦ ⟧ output is what these tests pin

ASSETS = Path(__file__).parent / "assets"
LINT = ASSETS / "lint"
CLEAN, DEFECTS, DEFECTS_EVAL, CHAT = (str(LINT / n) for n in ("clean.jsonl", "defects.jsonl", "defects_eval.jsonl",
                                                               "chat.jsonl"))
QA8 = str(ASSETS / "qa8.jsonl")

# Chat templates with the defects lint exists to catch.
TURNS_WITHOUT_EOS = ("{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor -%}"
                     "{%- if add_generation_prompt -%}{{ 'assistant: ' }}{%- endif -%}")
PROMPT_NOT_PREFIX = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'Q: ' + m['content'] + '\\n' }}"
                     "{%- else -%}{{ 'Answer: ' + m['content'] + '\\n' }}{%- endif -%}{%- endfor -%}"
                     "{%- if add_generation_prompt -%}{{ 'A: ' }}{%- endif -%}")
DROPS_ANSWER = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'Q: ' + m['content'] + '\\n' }}"
                "{%- else -%}{{ 'A:' }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}")
RENDERS_NOTHING = "{%- for m in messages -%}{%- endfor -%}"


def variant(base: Path, out: Path, chat_template: str | None = None, split_special_tokens: bool = False) -> str:
    """A copy of a model folder whose tokenizer has a given chat template or reads special tokens as text."""
    shutil.copytree(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    if split_special_tokens:
        config = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps(config | {"split_special_tokens": True}))
    return str(out)


def test_clean_data_passes_with_exact_report(capsys):
    code, out = run_lint(capsys, data=[CLEAN], show=1)
    assert code == 0
    assert out == (
        "3 training examples, 0 eval; template 'qa'; no --base: lengths are UTF-8 bytes, not tokens, and too_long "
        "is not checked (pass --base MODEL)\n"
        "\n"
        f"example {CLEAN}:1 (trained bytes in ⟦ ⟧):\n"
        "### Question:\nWhat is 2 + 2?\n\n### Answer:\n⟦4<|endoftext|>⟧\n"
        "\n"
        "bytes per example: min 44 · median 75 · p95 82 · max 82\n"
        "  44–48 1 ██████████████████████████████\n"
        "  49–53 0\n"
        "  54–58 0\n"
        "  59–63 0\n"
        "  64–68 0\n"
        "  69–73 0\n"
        "  74–78 1 ██████████████████████████████\n"
        "  79–83 1 ██████████████████████████████\n"
        "trained bytes: 56 of 201 (28%) · masked: 145\n"
        "\n"
        "OK: 3 examples, no problems found\n"
    )


def test_system_prompt_and_train_on_prompt_are_shown_as_finetune_trains(capsys):
    code, out = run_lint(capsys, data=[CLEAN], show=1, template="chatml", system_prompt="Be brief.")
    assert code == 0
    assert ("<|im_start|>system\nBe brief.<|endoftext|>\n<|im_start|>user\nWhat is 2 + 2?<|endoftext|>\n"
            "<|im_start|>assistant\n⟦4<|endoftext|>\n⟧\n") in out
    assert "trained bytes: 59 of 333 (18%) · masked: 274\n" in out
    code, out = run_lint(capsys, data=[CLEAN], show=1, template="chatml", system_prompt="Be brief.",
                         train_on_prompt=True)
    assert code == 0
    # Every token is trained but each sequence's first: nothing comes before it to predict it from.
    assert "<⟦|im_start|>system\nBe brief.<|endoftext|>\n<|im_start|>user\n" in out
    assert "trained bytes: 330 of 333 (99%) · masked: 3\n" in out


def test_planted_defects_are_each_named(capsys):
    code, out = run_lint(capsys, data=[DEFECTS], eval_data=[DEFECTS_EVAL], show=0)
    assert code == 1
    findings = out[out.index("error "):]
    assert findings == (
        "error empty_answer: 1 example with an empty answer after templating (only whitespace or punctuation)\n"
        f"  {DEFECTS}:7\n"
        "error leakage: 2 eval examples whose prompt is (nearly) a training prompt: eval measures recall\n"
        f"  {DEFECTS_EVAL}:1 = {DEFECTS}:1, {DEFECTS_EVAL}:2 ≈ {DEFECTS}:4 (0.97)\n"
        "error duplicate: 1 example repeating an earlier one (same text after folding case and whitespace)\n"
        f"  {DEFECTS}:3 = {DEFECTS}:1\n"
        "error near_duplicate: 1 example nearly repeating an earlier one (word 3-shingle Jaccard ≥ 0.9)\n"
        f"  {DEFECTS}:5 ≈ {DEFECTS}:4 (0.96)\n"
        "warning special_token_text: 1 example holding special-token strings (<|endoftext|>), trained and read as "
        f"plain text, never as control tokens: first at {DEFECTS}:8 messages[0].content: <|endoftext|>\n"
        f"  {DEFECTS}:8\n"
        "FAILED: 4 errors, 1 warning in 11 examples\n"
    )


def test_too_long_needs_a_tokenizer_and_is_a_warning_for_training(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    train, eval_examples = load_examples([DEFECTS]), load_examples([DEFECTS_EVAL])
    template = resolve_template("auto", tokenizer, {"qa"})
    findings = check_examples(train, eval_examples, tokenizer, template, 200)
    assert [(f.severity, f.code, f.count) for f in findings] == [
        ("error", "empty_answer", 1), ("error", "leakage", 2), ("error", "too_long", 1), ("error", "duplicate", 1),
        ("error", "near_duplicate", 1), ("warning", "special_token_text", 1)]
    too_long = findings[2]
    assert too_long.sources == [f"{DEFECTS}:6"]
    assert re.fullmatch(r"1 example longer than --max-seq-tokens 200 \(longest \d+ tokens\); finetune drops them",
                        too_long.message)
    for_training = check_examples(train, eval_examples, tokenizer, template, 200, for_training=True)
    assert [(f.severity, f.code) for f in for_training] == [
        ("error", "empty_answer"), ("error", "leakage"), ("warning", "too_long"), ("warning", "duplicate"),
        ("warning", "near_duplicate"), ("warning", "special_token_text")]
    assert check_examples(train, [], tokenizer, template, None) == [f for f in findings
                                                                    if f.code not in ("too_long", "leakage")]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_marked_example_shows_answer_and_eos_trained(capsys, request, fixture):
    """GPT-2 pads with EOS; padding is masked by position, so its EOS is still trained and nothing is found."""
    base = str(request.getfixturevalue(fixture))
    code, out = run_lint(capsys, data=[QA8], base=base, show=1)
    assert code == 0
    assert (f"example {QA8}:1 (trained tokens in ⟦ ⟧):\n"
            "### Question:\nWhat is the capital of France?\n\n### Answer:\n"
            "⟦Paris is the capital of France.<|endoftext|>⟧\n") in out
    assert out.startswith(f"8 training examples, 0 eval; template 'qa'; tokenizer {base}, max 512 tokens\n")
    assert out.endswith("\nOK: 8 examples, no problems found\n")


def test_eos_not_trained_when_the_tokenizer_reads_eos_as_text(capsys, tiny_llama, tmp_path):
    base = variant(tiny_llama, tmp_path / "split", split_special_tokens=True)
    code, out = run_lint(capsys, data=[QA8], base=base, show=0)
    assert code == 1
    assert ("error eos_not_trained: 8 examples where an answer does not end in a trained EOS: the model won't learn "
            f"to stop\n  {QA8}:1, {QA8}:2, {QA8}:3 (+5 more)\n") in out
    assert out.endswith("FAILED: 1 error, 0 warnings in 8 examples\n")


def test_no_trained_tokens_when_the_template_renders_nothing(capsys, tiny_llama, tmp_path):
    base = variant(tiny_llama, tmp_path / "nothing", chat_template=RENDERS_NOTHING)
    code, out = run_lint(capsys, data=[CLEAN], base=base, show=0)
    assert code == 1
    assert ("error no_trained_tokens: 3 examples with no trained token: the template leaves nothing to learn\n"
            f"  {CLEAN}:1, {CLEAN}:2, {CLEAN}:3\nFAILED: 1 error, 0 warnings in 3 examples\n") in out


def test_empty_answer_when_the_template_drops_it(capsys, tiny_llama, tmp_path):
    base = variant(tiny_llama, tmp_path / "drops", chat_template=DROPS_ANSWER)
    code, out = run_lint(capsys, data=[CLEAN], base=base, show=1)
    assert code == 1
    assert "Q: What is 2 + 2?\nA:⟦<|endoftext|>⟧\n" in out  # only EOS is left to learn
    assert ("error empty_answer: 3 examples with an empty answer after templating (only whitespace or "
            f"punctuation)\n  {CLEAN}:1, {CLEAN}:2, {CLEAN}:3\nFAILED: 1 error, 0 warnings in 3 examples\n") in out


def test_eos_appended_after_the_last_turn_only_keeps_the_roundtrip(capsys, tiny_llama, tmp_path):
    """A template whose turns do not end in EOS gets one after the final answer only, so every earlier
    turn is tokenised in training exactly as the inference prompt renders it."""
    base = variant(tiny_llama, tmp_path / "no-eos", chat_template=TURNS_WITHOUT_EOS)
    code, out = run_lint(capsys, data=[CHAT], base=base, show=1)
    assert "template_roundtrip" not in out
    assert code == 0, out
    assert ("⟦Sure, what is the order number?\n⟧user: It is 1234.\nassistant: "
            "⟦Thanks, order 1234 ships tomorrow.\n<|endoftext|>⟧") in out


def test_template_roundtrip_catches_a_generation_prompt_training_never_sees(capsys, tiny_llama, tmp_path):
    base = variant(tiny_llama, tmp_path / "not-prefix", chat_template=PROMPT_NOT_PREFIX)
    code, out = run_lint(capsys, data=[CLEAN], base=base, show=0)
    assert code == 1
    assert (f"error template_roundtrip: 3 examples tokenised differently in training than at inference: {CLEAN}:1: "
            "template 'tokenizer' does not render turn 1 as an extension of the previous turns; use --template "
            f"qa/chatml\n  {CLEAN}:1, {CLEAN}:2, {CLEAN}:3\n") in out


def test_raw_text_and_conversations_are_checked(capsys, tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text(json.dumps({"text": "Release notes for 2.0."}) + "\n" + json.dumps({"text": "release  NOTES for 2.0."})
                    + "\n")
    code, out = run_lint(capsys, data=[str(data)], show=1)
    assert code == 1
    assert "⟦elease notes for 2.0.<|endoftext|>⟧" in out  # the first token of a sequence is never a target
    assert "error duplicate: 1 example repeating an earlier one" in out and f"  {data}:2 = {data}:1\n" in out


def test_template_tokenizer_needs_a_base(capsys):
    with pytest.raises(UserError, match="--template tokenizer needs --base MODEL"):
        lint(LintConfig(data=[CLEAN], template="tokenizer"))


def test_terminal_output_styles_instead_of_brackets():
    tokenizer = byte_tokenizer()
    example = load_examples([CLEAN])[1]
    item = encode_chat(example, tokenizer, resolve_template("qa", tokenizer))
    pieces = trained_pieces(item, tokenizer)
    assert pieces == [("### Question:\nName a primary colour.\n\n### Answer:\n", False),
                      ("Red is a primary colour.<|endoftext|>", True)]
    text = marked(pieces, plain=False)
    assert text.plain == "".join(piece for piece, _ in pieces)
    assert [(span.start, span.end, span.style) for span in text.spans] == [
        (0, len(pieces[0][0]), "dim"), (len(pieces[0][0]), len(text.plain), "bold green")]


def test_cli_exit_codes_and_output():
    runner = CliRunner()
    clean = runner.invoke(app, ["lint", "--data", CLEAN])
    assert clean.exit_code == 0, clean.output
    assert clean.output.endswith("OK: 3 examples, no problems found\n")
    bad = runner.invoke(app, ["lint", "--data", DEFECTS, "--eval-data", DEFECTS_EVAL])
    assert bad.exit_code == 1
    assert "\nerror leakage: 2 eval examples" in bad.output
    assert bad.output.endswith("FAILED: 4 errors, 1 warning in 11 examples\n")
    flags = runner.invoke(app, ["lint", "--data", CLEAN, "--template", "chatml", "--system-prompt", "Be brief.",
                                "--train-on-prompt"])
    assert flags.exit_code == 0, flags.output
    assert "system\nBe brief." in flags.output and "trained bytes: 330 of 333 (99%)" in flags.output


def test_similar_pairs_equals_brute_force():
    rng = random.Random(0)
    sets = [frozenset(rng.sample(range(14), rng.randint(1, 7))) for _ in range(300)]
    for threshold in (0.5, 0.75, 0.9, 1.0):
        brute = {}
        for i, a in enumerate(sets):
            for j in range(i):
                similarity = jaccard(a, sets[j])
                if similarity >= threshold and similarity > brute.get(i, (None, -1))[1]:
                    brute[i] = (j, similarity)
        assert {i: (j, s) for i, j, s in similar_pairs(sets, threshold=threshold)} == brute
        queries, corpus = sets[:80], sets[80:]
        across = {}
        for i, a in enumerate(queries):
            for j, b in enumerate(corpus):
                similarity = jaccard(a, b)
                if similarity >= threshold and similarity > across.get(i, (None, -1))[1]:
                    across[i] = (j, similarity)
        assert {i: (j, s) for i, j, s in similar_pairs(queries, corpus, threshold)} == across


def test_similar_pairs_finds_planted_near_duplicates_among_many_rows():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(5000)]
    texts[4000] = texts[17].replace(texts[17].split()[0], "changed", 1)  # first word changed: 38 of 39 shingles kept
    texts[4500] = texts[900] + " extra"
    pairs = similar_pairs([shingles(t) for t in texts], threshold=0.9)
    assert [(i, j, round(s, 3)) for i, j, s in pairs] == [(4000, 17, round(37 / 39, 3)), (4500, 900, round(38 / 39, 3))]


def test_matches_exact_then_near_and_never_empty():
    corpus = ["", "What does json.dumps do?", "How do I open a file in Python for reading and writing text?"]
    queries = ["", "what does  JSON.dumps do?", "How do I open a file in Python for reading and writing text now?",
               "Something else entirely"]
    assert matches(queries, corpus, 0.9) == [(1, 1, None), (2, 2, 11 / 12)]  # 11 of 12 shingles shared


def test_shingles_keep_symbols_and_drop_sentence_punctuation():
    """Found on the demo's keyword data: "Same as a + b." and "Same as a >= b." ask about different functions."""
    assert shingles("Same as a + b.") != shingles("Same as a >= b.")
    assert shingles("What is  os.path.join?") == shingles("what is os path join")
