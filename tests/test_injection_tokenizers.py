"""Special-token strings in data are text with tokenizers off the common path (see test_injection.py): slow
(Python) tokenizers, whose `split_special_tokens` skips every added token, and tokenizers with thousands of
special tokens (Gemma's `<unusedN>`), whose benign rows must stay cheap to check."""

from __future__ import annotations


from tokenizers import Tokenizer, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_python import PreTrainedTokenizer

from specialize.data.formats import Example
from specialize.data.special import Rendered, special_strings
from specialize.data.tokenize import encode_rendered, encode_text


class CharTokenizer(PreTrainedTokenizer):
    """A slow (Python) tokenizer: one token per character."""

    def __init__(self, **kwargs):
        self.vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz<>/| ")}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab, **self.added_tokens_encoder)

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab[token]

    def _convert_id_to_token(self, index):
        return list(self.vocab)[index]


def test_slow_tokenizers_keep_added_tokens_and_read_special_strings_as_text():
    """`split_special_tokens` on a slow tokenizer splits at no added token at all, `<think>` included."""
    tokenizer = CharTokenizer(eos_token="</s>")
    tokenizer.add_tokens(["<think>"])  # not special: vocabulary, as Qwen3's
    assert not tokenizer.is_fast
    think, eos, chars = tokenizer.convert_tokens_to_ids("<think>"), tokenizer.eos_token_id, tokenizer.vocab
    [benign] = encode_text(Example(text="<think>plan</think> hi", shape="text"), tokenizer, 512)
    assert benign.input_ids == tokenizer("<think>plan</think> hi", add_special_tokens=False)["input_ids"] + [eos]
    [quoted] = encode_text(Example(text="<think>a</s>", shape="text"), tokenizer, 512)
    assert quoted.input_ids == [think, chars["a"], *(chars[c] for c in "</s>"), eos]
    rendered = Rendered("<think>a</s>b</s>", "<think>a\U00100000\U0010fffd\U0010fffd\U0010fffdb</s>")
    assert encode_rendered(tokenizer, rendered) == [think, chars["a"], *(chars[c] for c in "</s>b"), eos]


def test_thousands_of_special_tokens_keep_the_check_of_benign_rows_cheap():
    """Gemma ships 6,000+ `<unusedN>` tokens: the check of a benign row is one trie-shaped regex (an
    alternation of the strings took 83 ms on a 61k-character row), and the longest string still wins."""
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(ByteLevel.alphabet())}, merges=[]))
    core.pre_tokenizer = ByteLevel(add_prefix_space=False)
    core.add_special_tokens(["<eos>"] + [f"<unused{i}>" for i in range(6000)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    _, pattern = special_strings(tokenizer)
    row = "<div class='a'><a href='b'>link</a> <b>x</b> <unused</div>\n" * 1100
    assert pattern.search(row) is None
    # A trie, not an alternation of 6,001 strings: each shared prefix is written (and tried) once. What
    # that buys in time (0.07 ms vs 83 ms for this row) is measured, not asserted: timings are noisy here.
    assert pattern.pattern.count("unused") == 1 and pattern.pattern.startswith("<(?:")
    assert [m.group() for m in pattern.finditer("<unused12> <unused123><unused1234><eos>")] == \
        ["<unused12>", "<unused123>", "<unused1234>", "<eos>"]


def test_raw_text_never_flips_the_shared_tokenizer_to_text_mode(tokenizer_dir):
    """Reading a raw text row's special strings as text must not set the shared Rust tokenizer's flag:
    a serving thread tokenising a prompt at that moment would read its template's control tokens as text."""
    from transformers import AutoTokenizer

    from specialize.data.tokenize import _text_ids

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token
    ids = _text_ids(tokenizer, f"a{eos}b")
    assert ids == tokenizer(f"a{eos}b", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    tokenizer("reset", add_special_tokens=False)  # as any plain call leaves it
    _text_ids(tokenizer, f"a{eos}b")
    assert tokenizer.backend_tokenizer.encode_special_tokens is False
    assert tokenizer.eos_token_id not in ids
