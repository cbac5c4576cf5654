"""End to end: fine-tune tiny models, answer through `specialize generate`, and outside specialize."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from specialize.config import FinetuneConfig
from specialize.data.formats import load_examples
from specialize.finetune import finetune
from specialize.generate import Generator
from helpers import QA8, write_jsonl

QUESTIONS = [json.loads(line)["question"] for line in QA8.read_text(encoding="utf-8").splitlines()]
ANSWERS = [json.loads(line)["answer"] for line in QA8.read_text(encoding="utf-8").splitlines()]


def _cfg(base, out, **kw) -> FinetuneConfig:
    values = dict(base=str(base), data=[str(QA8)], out=out, epochs=150, learning_rate=5e-3, micro_batch_size=8,
                  warmup_steps=0, progress=False)
    values.update(kw)
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def full_run(qa8_run):
    return qa8_run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama):
    return finetune(_cfg(tiny_llama, tmp_path_factory.mktemp("lora") / "run", method="lora", lora_rank=8,
                         lora_alpha=16, lora_dropout=0.0, epochs=20, learning_rate=1e-2))


def test_full_run_answers_every_trained_question_exactly_via_cli(full_run):
    proc = subprocess.run([sys.executable, "-m", "specialize", "generate", "--model", str(full_run),
                           "--max-new-tokens", "40", *QUESTIONS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ANSWERS


def test_full_run_stops_at_eos(full_run):
    completions = Generator.load(full_run).generate([[{"role": "user", "content": q}] for q in QUESTIONS],
                                                    max_new_tokens=40)
    assert [c.text for c in completions] == ANSWERS
    assert all(c.finish_reason == "stop" for c in completions)


def test_run_folder_is_complete(full_run):
    names = {p.name for p in (full_run / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert (full_run / "config.yaml").is_file() and (full_run / "metrics.jsonl").is_file()
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 150 and rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((full_run / "train_summary.json").read_text())
    assert summary["template"] == "qa" and summary["steps"] == 150


PLAIN = textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, kind, questions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if kind == "peft":
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out, prompts = [], []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=40, do_sample=False)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        prompts.append(ids["input_ids"][0].tolist())
    assert "specialize" not in sys.modules
    print(json.dumps({"answers": out, "prompts": prompts}))
""")


def _plain(path, kind, with_prompts: bool = False):
    """Greedy answers to QUESTIONS (and, with_prompts, the prompt ids) in a process without specialize."""
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(path), kind, json.dumps(QUESTIONS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return (result["answers"], result["prompts"]) if with_prompts else result["answers"]


def test_full_run_in_plain_transformers_equals_generate(full_run):
    ours = [c.text for c in Generator.load(full_run).generate([[{"role": "user", "content": q}] for q in QUESTIONS],
                                                              max_new_tokens=40)]
    assert _plain(full_run / "model", "transformers") == ours == ANSWERS


OWN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _parity(run, expected_prompt: str) -> None:
    """Plain transformers renders exactly the training prompt and answers as `specialize generate` does."""
    generator = Generator.load(run)
    ours = [c.text for c in generator.generate([[{"role": "user", "content": q}] for q in QUESTIONS],
                                               max_new_tokens=40)]
    answers, prompts = _plain(Path(run) / "model", "transformers", with_prompts=True)
    assert prompts == [generator.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert generator.tokenizer.decode(prompts[0]) == expected_prompt
    assert answers == ours == ANSWERS


def test_a_base_with_its_own_chat_template_trains_and_answers_with_it_in_plain_transformers(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    base = tmp_path / "instruct-base"
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(base)
    run = Path(finetune(_cfg(base, tmp_path / "own")))
    assert json.loads((run / "train_summary.json").read_text())["template"] == "tokenizer"
    assert AutoTokenizer.from_pretrained(run / "model").chat_template == OWN_TEMPLATE  # travels unchanged
    eos = tokenizer.eos_token
    _parity(run, f"<|user|>\n{QUESTIONS[0]}{eos}\n<|assistant|>\n")


def test_a_chatml_run_with_a_system_prompt_answers_the_same_in_plain_transformers(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    run = Path(finetune(_cfg(tiny_llama, tmp_path / "chatml", template="chatml",
                             system_prompt="You answer short questions.")))
    end = AutoTokenizer.from_pretrained(tiny_llama).eos_token  # ours ends chatml turns with the model's EOS
    _parity(run, f"<|im_start|>system\nYou answer short questions.{end}\n"
                 f"<|im_start|>user\n{QUESTIONS[0]}{end}\n<|im_start|>assistant\n")


def test_lora_run_in_plain_peft_equals_generate(lora_run):
    ours = [c.text for c in Generator.load(lora_run).generate([[{"role": "user", "content": q}] for q in QUESTIONS],
                                                              max_new_tokens=40)]
    assert _plain(lora_run / "model", "peft") == ours


def test_lora_trainable_count_and_base_unchanged(lora_run, tiny_llama):
    summary = json.loads((lora_run / "train_summary.json").read_text())
    # Tiny Llama: hidden 64, MLP 128, 4 heads of 16 with 2 KV heads, 2 layers; r = 8 on all 7 linears:
    # q 8*(64+64) + k 8*(64+32) + v 8*(64+32) + o 8*(64+64) + gate/up/down 3 * 8*(64+128) = 8192 per layer.
    assert summary["trainable_parameters"] == 2 * 8192
    adapter = load_file(lora_run / "model" / "adapter_model.safetensors")
    assert sum(t.numel() for t in adapter.values()) == 2 * 8192
    assert all("lora_" in name for name in adapter)
    base_before = load_file(tiny_llama / "model.safetensors")
    config = json.loads((lora_run / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)
    base_after = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    for name, tensor in base_before.items():
        assert torch.equal(base_after[name], tensor), name
    assert (lora_run / "model" / "tokenizer_config.json").is_file()


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


VARIED = [{"question": "Q" + "x" * (3 * i) + "?", "answer": "A" + " word" * (i % 5 + 1) + "."} for i in range(8)]


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_8x1_equals_2x4(tmp_path, tiny_llama, packing):
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in VARIED), encoding="utf-8")
    lengths = {len(e.messages[0]["content"]) + len(e.messages[1]["content"]) for e in load_examples([str(data)])}
    assert len(lengths) == 8  # different lengths, or the test proves nothing
    common = dict(data=[str(data)], max_steps=3, learning_rate=1e-3, packing=packing)
    one = finetune(_cfg(tiny_llama, tmp_path / "8x1", micro_batch_size=8, grad_accum_steps=1, **common))
    four = finetune(_cfg(tiny_llama, tmp_path / "2x4", micro_batch_size=2, grad_accum_steps=4, **common))
    a, b = _weights(one), _weights(four)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    la = [json.loads(line)["loss"] for line in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (four / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5)


def test_system_prompt_is_saved_in_the_template(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    run = finetune(_cfg(tiny_llama, tmp_path / "sys", max_steps=1, system_prompt="You answer about capitals."))
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "You answer about capitals.\n\n### Question:\nQ?\n\n### Answer:\n"


def test_max_seq_tokens_beyond_the_model_context_is_one_clear_error(tmp_path, tiny_gpt2):
    from specialize.errors import UserError

    with pytest.raises(UserError, match=r"--max-seq-tokens 100000 is longer than the \d+ positions"):
        finetune(_cfg(tiny_gpt2, tmp_path / "long", max_steps=1, max_seq_tokens=100000))
    assert not (tmp_path / "long" / "model").exists()


def test_dropped_eval_examples_are_reported_and_never_blamed_on_training_data(tmp_path, tiny_llama, capsys):
    long = {"question": "Tell me everything.", "answer": " ".join(["word"] * 400)}
    short = {"question": "Which city is the capital of Peru?", "answer": "Lima is the capital of Peru."}
    mixed, too_long = tmp_path / "mixed.jsonl", tmp_path / "long.jsonl"
    mixed.write_text(json.dumps(long) + "\n" + json.dumps(short) + "\n", encoding="utf-8")
    too_long.write_text(json.dumps(long) + "\n", encoding="utf-8")
    run = finetune(_cfg(tiny_llama, tmp_path / "mixed", max_steps=1, max_seq_tokens=128, eval_data=[str(mixed)]))
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "warning: eval data: dropped 1 example(s): longer than --max-seq-tokens 128 (first: " in err
    assert "mixed.jsonl:1)" in err and "8 training sequences, 1 eval" in err
    assert json.loads((run / "train_summary.json").read_text())["eval_loss"] is not None
    run = finetune(_cfg(tiny_llama, tmp_path / "none", max_steps=1, max_seq_tokens=128, eval_data=[str(too_long)]))
    assert "no eval example is left, so this run reports no eval loss" in " ".join(capsys.readouterr().err.split())
    assert json.loads((run / "train_summary.json").read_text())["eval_loss"] is None


def test_an_unwritable_out_is_one_line_and_exit_2(tmp_path, tiny_llama):
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "specialize", "finetune", "--base", str(tiny_llama), "--data",
                           str(QA8), "--out", str(blocker / "run"), "--max-steps", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {blocker}") and errors[0].endswith(": Not a directory")


def test_data_with_lint_errors_is_refused_unless_allowed(tmp_path, tiny_llama):
    from specialize.errors import UserError

    leaked = write_jsonl(tmp_path / "eval.jsonl", [json.loads(line) for line in QA8.read_text().splitlines()[:2]])
    common = dict(max_steps=1, eval_data=[str(leaked)])  # eval questions that are training questions: leakage
    with pytest.raises(UserError, match=r"data has 1 error\(s\), first: 2 eval examples whose prompt is \(nearly\) a "
                                        r"training prompt.*--allow-data-errors trains anyway\)$"):
        finetune(_cfg(tiny_llama, tmp_path / "refused", **common))
    assert not (tmp_path / "refused" / "model").exists()
    run = Path(finetune(_cfg(tiny_llama, tmp_path / "allowed", allow_data_errors=True, **common)))
    assert (run / "model" / "model.safetensors").is_file()
    assert json.loads((run / "train_summary.json").read_text())["eval_loss"] is not None


def _split_data(tmp_path, n: int) -> list:
    """n distinct questions, then three more copies of question 3 (case and spacing changed)."""
    rows = [{"question": f"What is fact number {i}?", "answer": f"Fact {i}."} for i in range(n)]
    rows += [{"question": "what is  FACT number 3?", "answer": "Fact 3 again."}] * 3
    return load_examples([str(write_jsonl(tmp_path / f"split{n}.jsonl", rows))])


def test_eval_hold_out_is_seeded_keeps_duplicates_together_and_skips_small_data(tmp_path):
    from specialize.finetune import split_examples

    examples = _split_data(tmp_path, 40)  # 43 rows, 40 distinct prompts: 5% is 2 prompts
    train, held = split_examples(examples, 0.05, seed=42)
    assert [e.source for e in split_examples(examples, 0.05, seed=42)[1]] == [e.source for e in held]  # repeatable
    assert len({e.messages[0]["content"] for e in held}) == 2
    assert sorted(e.source for e in train + held) == sorted(e.source for e in examples)  # a partition
    copies = [e.source for e in examples if " ".join(e.messages[0]["content"].lower().split()) == "what is fact number 3?"]
    assert len(copies) == 4
    helds = []
    for seed in range(40):
        held_sources = {e.source for e in split_examples(examples, 0.05, seed=seed)[1]}
        assert len({source in held_sources for source in copies}) == 1  # all four on one side
        helds.append(frozenset(held_sources))
    assert len(set(helds)) > 10  # the seed decides which prompts are held out
    assert any(copies[0] in h for h in helds)  # and the duplicated prompt was held out whole at least once

    assert split_examples(examples[:19], 0.05, seed=42) == (examples[:19], [])  # under 20 examples: all trained
    assert len(split_examples(examples[:20], 0.05, seed=42)[1]) == 1
    assert split_examples(examples, 0.0, seed=42) == (examples, [])


def test_finetune_holds_out_5_percent_by_default_and_nothing_from_small_data(tmp_path, tiny_llama, capsys):
    _split_data(tmp_path, 40)
    run = Path(finetune(_cfg(tiny_llama, tmp_path / "big", data=[str(tmp_path / "split40.jsonl")], max_steps=1)))
    assert "data: 41 training sequences, 2 eval" in " ".join(capsys.readouterr().err.split())
    assert json.loads((run / "train_summary.json").read_text())["eval_loss"] is not None
    run = Path(finetune(_cfg(tiny_llama, tmp_path / "small", max_steps=1)))  # QA8: 8 examples
    assert "data: 8 training sequences, 0 eval" in " ".join(capsys.readouterr().err.split())
    assert json.loads((run / "train_summary.json").read_text())["eval_loss"] is None
