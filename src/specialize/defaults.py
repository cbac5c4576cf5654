"""Defaults that fit the model: what `finetune` picks when a setting is left unset, and why.

Each choice comes back with its reason, which `finetune` prints and the README tabulates:

- `max_seq_tokens`: the smaller of the model's context and the longest training example (Q&A
  and chats), so a base with a short context just works and no memory is planned for lengths
  the data never reaches. Raw-text examples are cut into windows of at most TEXT_WINDOW tokens.
- `method`: LoRA from LORA_FROM_PARAMETERS parameters up, full fine-tuning below. At 135M
  parameters (SmolLM2-135M's shape) full fine-tuning keeps ~16 bytes per parameter of fp32
  weights, gradients and AdamW state (2.2 GB before activations) where LoRA rank 16 trains
  ~3% of them; tiny models (the demo's 1.3M) learn facts far faster with all weights.
- `learning_rate`: 2e-4 for LoRA and QLoRA (the QLoRA paper's and TRL's default); for full
  fine-tuning 2e-5 from LORA_FROM_PARAMETERS up (pre-trained models forget at higher rates)
  and 2e-4 below, where small randomly initialised or tiny pre-trained models barely move at 2e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

from specialize.model import adapter_base, context_length, is_adapter, model_dir

LORA_FROM_PARAMETERS = 100_000_000
TEXT_WINDOW = 1024
LORA_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE = 2e-5
SMALL_MODEL_LEARNING_RATE = 2e-4


@dataclass(frozen=True)
class Choice:
    """A setting picked for the user, and the words that say why."""

    name: str
    value: object
    reason: str

    def __str__(self) -> str:
        return f"{self.name} {self.value} ({self.reason})"


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"


def max_seq_tokens(context: int | None, longest: int, has_text: bool) -> Choice:
    """The limit for unset `--max-seq-tokens`.

    Args:
        context: positions the model holds (None when its config does not say).
        longest: tokens of the longest encoded conversation (0 when there is none).
        has_text: raw-text examples are present (they are cut into windows of the limit).
    """
    cover = max(longest, min(TEXT_WINDOW, context or TEXT_WINDOW) if has_text else 0, 2)
    if context is not None and context <= cover:
        return Choice("max_seq_tokens", context, "the model's context")
    if has_text and cover > longest:
        return Choice("max_seq_tokens", cover, f"text windows of at most {TEXT_WINDOW} tokens")
    return Choice("max_seq_tokens", cover, "covers the longest example")


def method(parameters: int) -> Choice:
    if parameters >= LORA_FROM_PARAMETERS:
        return Choice("method", "lora", f"{_count(parameters)} parameters: LoRA from {_count(LORA_FROM_PARAMETERS)} up; "
                      "--method full trains every weight")
    return Choice("method", "full", f"{_count(parameters)} parameters: full fine-tuning below "
                  f"{_count(LORA_FROM_PARAMETERS)}; --method lora trains adapters")


def learning_rate(method_name: str, parameters: int) -> Choice:
    if method_name in ("lora", "qlora"):
        return Choice("learning_rate", LORA_LEARNING_RATE, f"for {method_name}")
    if parameters >= LORA_FROM_PARAMETERS:
        return Choice("learning_rate", FULL_LEARNING_RATE, f"for full fine-tuning of {_count(parameters)} parameters")
    return Choice("learning_rate", SMALL_MODEL_LEARNING_RATE,
                  f"for full fine-tuning of a small model ({_count(parameters)} parameters)")


def model_parameters(ref: str, trust_remote_code: bool = False) -> int | None:
    """The parameter count of model `ref` from its config alone, built on the meta device (no
    memory, no weights read), so `--method auto` is decided before the weights load in the
    dtype that method wants. None when the config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_dir(ref)
    if is_adapter(path):
        path = model_dir(adapter_base(path))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def model_context(ref: str, trust_remote_code: bool = False) -> int | None:
    """Positions the model `ref` holds, read from its config alone (no weights loaded);
    a LoRA adapter or LoRA run answers for its base. None when unknown."""
    from transformers import AutoConfig

    path = model_dir(ref)
    if is_adapter(path):
        path = model_dir(adapter_base(path))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None  # load_model says what is wrong, with the full story
    return context_length(config)
