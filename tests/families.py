"""Tiny random-weight models of real families: their architecture class, special tokens, stop tokens
and real chat template (tests/assets/templates, see SOURCES.md there).

Each base is built from the family's own config class with tiny sizes, a byte-level BPE trained
here and extended with the family's special tokens, BOS/EOS/pad set as the family sets them, and a
`generation_config.json` listing the family's end-of-turn tokens, then saved as a plain HF folder:
exactly what a user passes as `--base`. Nothing downloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GenerationConfig, GPT2Config,
                          GPTNeoXConfig, LlamaConfig, MistralConfig, Olmo2Config, Phi3Config, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen3Config)

TEMPLATES = Path(__file__).parent / "assets" / "templates"
ATTENTION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    """How one family's checkpoint looks: what a tokenizer_config.json and generation_config.json hold."""

    name: str
    config_class: type
    specials: tuple[str, ...]  # added special tokens, beyond the BPE's own <|endoftext|> and <|pad|>
    eos: str  # the tokenizer's eos_token
    stops: tuple[str, ...]  # generation_config.json eos_token_id, in the family's order
    bos: str | None = None
    pad: str | None = None  # None: the family ships no pad token (specialize pads with EOS)
    adds_bos: bool = False  # the tokenizer puts BOS in front of every encoding (Llama, Gemma, Mistral)
    template: str | None = None  # file in tests/assets/templates; None: the family has no chat template
    system: bool = True  # the template accepts a system message
    config: dict = field(default_factory=dict)  # family-specific config values beyond ATTENTION

    @property
    def chat_template(self) -> str | None:
        return (TEMPLATES / self.template).read_text(encoding="utf-8") if self.template else None


LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")
CHATML = ("<|im_start|>", "<|im_end|>")
GEMMA = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")

FAMILIES = [
    Family("llama3", LlamaConfig, LLAMA3, eos="<|eot_id|>", bos="<|begin_of_text|>", adds_bos=True,
           stops=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), template="llama3.jinja",
           config=dict(tie_word_embeddings=True)),
    Family("qwen2.5", Qwen2Config, CHATML, eos="<|im_end|>", pad="<|endoftext|>",
           stops=("<|im_end|>", "<|endoftext|>"), template="qwen2.5.jinja", config=dict(tie_word_embeddings=True)),
    # Qwen3's <think> and </think> are added tokens that are not special: they decode as text.
    Family("qwen3", Qwen3Config, CHATML, eos="<|im_end|>", pad="<|endoftext|>",
           stops=("<|im_end|>", "<|endoftext|>"), template="qwen3.jinja",
           config=dict(tie_word_embeddings=True, head_dim=16)),
    # SmolLM2-Instruct pads with its EOS <|im_end|>, and uses <|im_start|> as BOS without adding it.
    Family("smollm2", LlamaConfig, CHATML, eos="<|im_end|>", bos="<|im_start|>", pad="<|im_end|>",
           stops=("<|im_end|>",), template="smollm2.jinja", config=dict(tie_word_embeddings=True)),
    Family("gemma2", Gemma2Config, GEMMA, eos="<eos>", bos="<bos>", pad="<pad>", adds_bos=True,
           stops=("<eos>", "<end_of_turn>"), template="gemma2.jinja", system=False,
           config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64)),
    Family("gemma3", Gemma3TextConfig, GEMMA, eos="<eos>", bos="<bos>", pad="<pad>", adds_bos=True,
           stops=("<eos>", "<end_of_turn>"), template="gemma3.jinja",
           config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64)),
    Family("mistral", MistralConfig, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), eos="</s>", bos="<s>",
           adds_bos=True, stops=("</s>",), template="mistral.jinja"),
    Family("phi3", Phi3Config, ("<s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"), eos="<|endoftext|>",
           bos="<s>", pad="<|endoftext|>", stops=("<|end|>", "<|assistant|>", "<|endoftext|>"),
           template="phi3.jinja"),
    Family("olmo2", Olmo2Config, (), eos="<|endoftext|>", bos="<|endoftext|>", pad="<|pad|>",
           stops=("<|endoftext|>",), template="olmo2.jinja"),
    # The classic fine-tuning course model: no chat template, pads with nothing, EOS <|endoftext|>.
    Family("pythia", GPTNeoXConfig, (), eos="<|endoftext|>", bos="<|endoftext|>", stops=("<|endoftext|>",),
           config=dict(rotary_pct=0.25, use_parallel_residual=True)),
    Family("gpt2", GPT2Config, (), eos="<|endoftext|>", bos="<|endoftext|>", stops=("<|endoftext|>",),
           config=dict(n_embd=32, n_layer=1, n_head=2, n_positions=512)),
]
BY_NAME = {family.name: family for family in FAMILIES}


def family_tokenizer(family: Family, bpe_dir: Path) -> PreTrainedTokenizerFast:
    """The BPE trained for the tests, extended with the family's special tokens and set up as the family's."""
    core = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    core.add_special_tokens(list(family.specials))
    if family.name == "qwen3":
        core.add_tokens(["<think>", "</think>"])
    if family.adds_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, core.token_to_id(family.bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=family.eos, bos_token=family.bos,
                                        pad_token=family.pad)
    if family.chat_template:
        tokenizer.chat_template = family.chat_template
    return tokenizer


def _config(family: Family, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    values = dict(vocab_size=len(tokenizer), bos_token_id=ids(family.bos) if family.bos else None,
                  eos_token_id=[ids(s) for s in family.stops] if len(family.stops) > 1 else ids(family.stops[0]),
                  pad_token_id=tokenizer.pad_token_id)
    if family.config_class is not GPT2Config:
        values.update(ATTENTION)
    values.update(family.config)
    return family.config_class(**values)


def save_family(family: Family, bpe_dir: Path, path: Path, seed: int = 0) -> Path:
    """A tiny random-weight model of `family`, saved as a plain HF folder with its generation_config.json."""
    tokenizer = family_tokenizer(family, bpe_dir)
    config = _config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    ids = tokenizer.convert_tokens_to_ids
    stops = [ids(s) for s in family.stops]
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=stops if len(stops) > 1 else stops[0])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
