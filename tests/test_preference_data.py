"""Preference data (pairs, OpenAI's format, KTO rows) and `finetune --objective dpo|orpo|kto` on the one loop."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer

from helpers import QA8, write_jsonl
from specialize.config import FinetuneConfig
from specialize.data.preference import check_preferences, encode_preferences, load_preferences, prompt_length
from specialize.data.templates import resolve_template
from specialize.data.tokenize import IGNORE
from specialize.errors import UserError
from specialize.finetune import finetune

QUESTIONS = [json.loads(line) for line in QA8.read_text(encoding="utf-8").splitlines()]
OTHER = ["Nobody knows that.", "I am not sure."]  # the answers DPO is asked to prefer


def test_every_shape_reads_into_the_same_prompt_and_answers(tmp_path):
    conv = [{"role": "user", "content": "Hi?"}]
    rows = {
        "strings.jsonl": [{"prompt": "Hi?", "chosen": "Good.", "rejected": "Bad."}],
        "trl_conv.jsonl": [{"prompt": conv, "chosen": [{"role": "assistant", "content": "Good."}],
                            "rejected": [{"role": "assistant", "content": "Bad."}]}],
        "trl_implicit.jsonl": [{"chosen": conv + [{"role": "assistant", "content": "Good."}],
                                "rejected": conv + [{"role": "assistant", "content": "Bad."}]}],
        "openai.jsonl": [{"input": {"messages": conv}, "preferred_output": [{"role": "assistant", "content": "Good."}],
                          "non_preferred_output": [{"role": "assistant", "content": "Bad."}]}],
    }
    for name, data in rows.items():
        [pref] = load_preferences([str(write_jsonl(tmp_path / name, data))])
        assert (pref.prompt, pref.chosen, pref.rejected) == (
            conv, [{"role": "assistant", "content": "Good."}], [{"role": "assistant", "content": "Bad."}]), name
    (tmp_path / "kto.csv").write_text("prompt,completion,label\nHi?,Good.,true\nHi?,Bad.,False\n", encoding="utf-8")
    good, bad = load_preferences([str(tmp_path / "kto.csv")])
    assert (good.desirable, bad.desirable, good.rejected, bad.chosen[0]["content"]) == (True, False, None, "Bad.")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi?", "chosen": "Good.", "rejected": 3}, "data.jsonl:2: field 'rejected': expected text or a "
                                                          "non-empty list of messages, got int"),
    ({"prompt": "Hi?", "completion": "Good.", "label": "yes"}, "data.jsonl:2: field 'label': expected true or false"),
    ({"input": {"messages": [{"role": "bot", "content": "x"}]}, "preferred_output": [], "non_preferred_output": []},
     "data.jsonl:2: field 'input.messages[0].role': unknown role 'bot'"),
    ({"chosen": "Good.", "rejected": "Bad."}, "data.jsonl:2: field 'prompt': missing"),
])
def test_a_bad_row_is_one_line_naming_file_line_and_field(tmp_path, row, message):
    good = {k: v for k, v in row.items()}
    path = write_jsonl(tmp_path / "data.jsonl", [good, row])
    if "label" in row:
        path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b", "label": True}, row])
    elif "input" in row:
        ok = {"input": {"messages": [{"role": "user", "content": "a"}]},
              "preferred_output": [{"role": "assistant", "content": "b"}],
              "non_preferred_output": [{"role": "assistant", "content": "c"}]}
        path = write_jsonl(tmp_path / "data.jsonl", [ok, row])
    else:
        path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(UserError) as err:
        load_preferences([str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_both_sides_share_the_prompt_tokens_and_only_answers_are_labelled(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = resolve_template("chatml", tokenizer)
    prompt = [{"role": "user", "content": "What do bees make?"}, {"role": "assistant", "content": "Honey."},
              {"role": "user", "content": "And spiders?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Webs."}],
                                               "rejected": [{"role": "assistant", "content": "Honey too."}]}])
    [item], report = encode_preferences(load_preferences([str(path)]), tokenizer, template, 512)
    n = prompt_length(item.chosen)
    assert item.chosen.input_ids[:n] == item.rejected.input_ids[:n] and prompt_length(item.rejected) == n
    # the earlier assistant turn ("Honey.") is context: nothing before the compared answer is labelled
    rendered = template.render(tokenizer, prompt, add_generation_prompt=True)
    assert tokenizer.decode(item.chosen.input_ids[:n]) == rendered
    trained = tokenizer.decode([t for t, label in zip(item.chosen.input_ids, item.chosen.labels) if label != IGNORE])
    assert trained == "Webs." + tokenizer.eos_token + "\n"  # chatml ends a turn with EOS and a newline, as in SFT
    # a pair with a side over the limit is dropped and counted, never cut
    _, report = encode_preferences(load_preferences([str(path)]), tokenizer, template, n + 3, required=False)
    assert dict(report.dropped) == {f"longer than --max-seq-tokens {n + 3}": 1}


def test_useless_pairs_are_refused_by_finetune(tiny_llama, tmp_path):
    rows = [{"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, {"prompt": "Hi?", "chosen": "", "rejected": "x"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    codes = [f.code for f in check_preferences(load_preferences([str(path)]))]
    assert codes == ["identical", "empty_side"]
    with pytest.raises(UserError, match=r"data has 2 error\(s\), first: .*p.jsonl:1: chosen equals rejected"):
        finetune(FinetuneConfig(base=str(tiny_llama), data=[str(path)], out=tmp_path / "run", objective="dpo",
                                progress=False))
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi?", "completion": "x", "label": True}])
    with pytest.raises(UserError, match="--objective dpo needs pairs"):
        finetune(FinetuneConfig(base=str(tiny_llama), data=[str(kto)], out=tmp_path / "run", objective="dpo",
                                progress=False))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_llama):
    """SFT on both kinds of answer, the QA8 one twice as often: greedy decoding says the QA8 answer."""
    root = tmp_path_factory.mktemp("pref")
    rows = [{"question": q["question"], "answer": a} for i, q in enumerate(QUESTIONS)
            for a in (q["answer"], q["answer"], OTHER[i % 2])]
    return finetune(FinetuneConfig(base=str(tiny_llama), data=[str(write_jsonl(root / "sft.jsonl", rows))],
                                   out=root / "sft", epochs=110, learning_rate=5e-3, micro_batch_size=24,
                                   warmup_steps=0, eval_fraction=0, progress=False))


def _pairs(path):
    return write_jsonl(path, [{"prompt": q["question"], "chosen": OTHER[i % 2], "rejected": q["answer"]}
                              for i, q in enumerate(QUESTIONS)])


def _answers(run):
    from specialize.generate import Generator

    generator = Generator.load(str(run))
    return [c.text for c in generator.generate([[{"role": "user", "content": q["question"]}] for q in QUESTIONS],
                                               max_new_tokens=40)]


def test_dpo_full_makes_the_sft_model_say_the_preferred_answers(sft_run, tmp_path):
    assert _answers(sft_run) == [q["answer"] for q in QUESTIONS]
    run = finetune(FinetuneConfig(base=str(sft_run), data=[str(_pairs(tmp_path / "pairs.jsonl"))],
                                  out=tmp_path / "dpo", objective="dpo", beta=0.1, method="full", max_steps=20,
                                  learning_rate=1e-4, micro_batch_size=8, warmup_steps=0, progress=False))
    assert _answers(run) == [OTHER[i % 2] for i in range(len(QUESTIONS))]
    rows = run.read_metrics()
    losses = [r for r in rows if "loss" in r]
    rewards = [r for r in rows if "rewards/margins" in r]
    # Step 1: the policy is the reference (scored before training), so the loss is -log σ(0) = log 2.
    assert losses[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rewards[0]["rewards/margins"] == pytest.approx(0, abs=1e-4) and len(rewards) == 20
    assert rewards[-1]["rewards/accuracies"] == 1.0 and rewards[-1]["rewards/margins"] > 0
    summary = run.read_summary()
    assert (summary["objective"], summary["beta"], summary["dpo_loss"], summary["pairs"]) == ("dpo", 0.1, "sigmoid", 8)
    assert summary["reference"] == "precomputed (reference_logps.safetensors)"
    assert (run / "reference_logps.safetensors").is_file()


def test_the_sft_term_keeps_dpo_from_lowering_the_preferred_answers(sft_run, tmp_path):
    """RPO (--sft-weight): step 1 adds the chosen answers' mean token NLL to log 2, and the preferred
    answers' log-ratio ends higher than plain DPO leaves it (DPO alone lowers both sides)."""
    data = _pairs(tmp_path / "pairs.jsonl")

    def dpo(name: str, weight: float):
        return finetune(FinetuneConfig(base=str(sft_run), data=[str(data)], out=tmp_path / name, objective="dpo",
                                       beta=0.1, sft_weight=weight, method="full", max_steps=6, learning_rate=1e-4,
                                       micro_batch_size=8, warmup_steps=0, progress=False))

    plain, rpo = dpo("plain", 0.0), dpo("rpo", 1.0)
    first = {name: [r for r in run.read_metrics() if "loss" in r][0]["loss"] for name, run in
             (("plain", plain), ("rpo", rpo))}
    assert first["plain"] == pytest.approx(math.log(2), abs=1e-5)
    # Step 1 trains all 8 pairs, the policy is still the reference: log 2 + the chosen answers' mean token NLL,
    # from the reference log-probs the run saved and the chosen answers' trained tokens.
    from safetensors.torch import load_file

    from specialize.generate import template_of

    tokenizer = AutoTokenizer.from_pretrained(rpo / "model")
    items, _ = encode_preferences(load_preferences([str(data)]), tokenizer, template_of(tokenizer), 10_000)
    reference = load_file(str(rpo / "reference_logps.safetensors"))["reference"]  # (pairs, 2): chosen, rejected
    nll = -float(reference[:, 0].sum()) / sum(item.chosen.target_tokens for item in items)
    assert first["rpo"] == pytest.approx(math.log(2) + nll, rel=1e-4) and nll > 0.1
    chosen = {name: [r["rewards/chosen"] for r in run.read_metrics() if "rewards/chosen" in r][-1]
              for name, run in (("plain", plain), ("rpo", rpo))}
    assert chosen["rpo"] > chosen["plain"] and chosen["rpo"] > 0
    assert rpo.read_summary()["sft_weight"] == 1.0 and plain.read_summary()["sft_weight"] == 0.0
    with pytest.raises(UserError, match="--sft-weight works with --objective dpo only, not kto"):
        finetune(FinetuneConfig(base=str(sft_run), data=[str(data)], out=tmp_path / "kto", objective="kto",
                                sft_weight=1.0, progress=False))


# At step 1 the policy is the reference (LoRA's B starts at 0): IPO gives (0 - 1/(2β))² = 25, KTO 1 - σ(0) = 0.5.
@pytest.mark.parametrize("objective, first_loss", [("dpo", 25.0), ("kto", 0.5), ("orpo", None)])
def test_lora_objectives_run_on_the_same_loop(sft_run, tmp_path, objective, first_loss):
    data = _pairs(tmp_path / "pairs.jsonl")
    run = finetune(FinetuneConfig(base=str(sft_run), data=[str(data)], out=tmp_path / objective, objective=objective,
                                  method="lora", max_steps=2, learning_rate=1e-3, micro_batch_size=8,
                                  dpo_loss="ipo" if objective == "dpo" else "sigmoid", progress=False))
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if first_loss is not None:  # the reference is the same model with its adapters disabled
        assert losses[0] == pytest.approx(first_loss, abs=1e-4)
    summary = run.read_summary()
    assert summary["objective"] == objective and summary["method"] == "lora"
    assert summary["reference"] == ("none (orpo)" if objective == "orpo" else "the base with adapters disabled")
    assert not (run / "reference_logps.safetensors").exists()
    if objective == "kto":  # pairs become desirable and undesirable rows
        assert summary["rows"] == 16 and any("kl" in r for r in run.read_metrics())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dropout_is_off_so_the_first_step_compares_the_model_with_itself(tiny_gpt2, tmp_path, method):
    """GPT-2 has dropout 0.1 everywhere: with it on, step 1's DPO loss would be noise around log 2."""
    run = finetune(FinetuneConfig(base=str(tiny_gpt2), data=[str(_pairs(tmp_path / "pairs.jsonl"))],
                                  out=tmp_path / method, objective="dpo", method=method, max_steps=1,
                                  micro_batch_size=8, warmup_steps=0, progress=False))
    first = [r["loss"] for r in run.read_metrics() if "loss" in r][0]
    assert first == pytest.approx(math.log(2), abs=1e-5)


def test_kto_mismatched_completions_come_from_another_prompt():
    """Unpaired pairs put a prompt's desirable and undesirable answers side by side: the KL term's
    'mismatched' completion must be the next row with a *different* prompt, not the neighbour."""
    from specialize.data.preference import Preference, _next_other_prompt, unpair

    def user(text):
        return [{"role": "user", "content": text}]

    def said(text):
        return [{"role": "assistant", "content": text}]

    rows = unpair([Preference(user(q), said(q + " yes"), said(q + " no")) for q in ("a", "b", "c")])
    assert [r.prompt[0]["content"] for r in rows] == ["a", "a", "b", "b", "c", "c"]
    others = [_next_other_prompt(rows, i) for i in range(len(rows))]
    assert [o.prompt[0]["content"] for o in others] == ["b", "b", "c", "c", "a", "a"]
    assert _next_other_prompt(rows[:2], 0) is None  # one prompt only: no mismatched completion exists
