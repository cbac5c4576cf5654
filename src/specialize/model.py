"""Models: load by hub id / folder / run, build tiny ones from a config, LoRA/QLoRA via PEFT, save.

Weights are read from safetensors only, and `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from specialize.errors import UserError
from specialize.rundir import RunDir, save_pretrained

# Llama-shaped sizes for pre-training from scratch; parameter counts exclude embeddings.
SIZES: dict[str, dict[str, int]] = {
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024),
    "base": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
}


def model_dir(ref: str | Path) -> str:
    """A run folder means its `model/`; anything else (folder or hub id) is used as is."""
    run = RunDir.find(ref)
    return str(run.model) if run is not None else str(ref)


def is_adapter(ref: str | Path) -> bool:
    return (Path(model_dir(ref)) / "adapter_config.json").is_file()


def _check_exists(ref: str) -> None:
    path = Path(ref)
    looks_local = path.is_absolute() or ref.startswith(".") or path.exists() or ref.count("/") > 1
    if looks_local and not path.exists():
        raise UserError("no such model folder or run", path=ref)
    markers = ("config.json", "adapter_config.json", "tokenizer_config.json")
    if path.is_dir() and not any((path / name).is_file() for name in markers):
        raise UserError("not a model folder (no config.json, adapter_config.json or tokenizer_config.json)", path=ref)


def _where(ref: str) -> str:
    """How a failed load names `ref`: a name that is no local folder was looked up on the Hub."""
    if Path(ref).exists():
        return f"'{ref}'"
    return f"'{ref}' (no local folder of that name, so it was looked up as a Hugging Face Hub id)"


def load_tokenizer(ref: str | Path, trust_remote_code: bool = False):
    ref = model_dir(ref)
    _check_exists(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {_where(ref)}: {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{ref}' has no EOS token; set eos_token in its tokenizer_config.json")
    _record_end_of_turn(tokenizer, ref)
    return tokenizer


def _record_end_of_turn(tokenizer, ref: str) -> None:
    """Note the end-of-turn tokens of the folder's generation_config.json on the tokenizer.

    Instruct models end a turn with a token of their own that only generation_config.json names
    (Gemma `<end_of_turn>`, Phi-3 `<|end|>`); templates.segments then trains the turn to end there
    instead of appending the tokenizer's EOS after it. Saved with the tokenizer, so a run keeps them.
    """
    from specialize.data.templates import END_OF_TURN_KEY

    path = Path(ref) / "generation_config.json"
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        ids = None
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer)]
    tokens = [t for t in tokens if t and t != tokenizer.eos_token]
    if tokens:
        tokenizer.init_kwargs[END_OF_TURN_KEY] = tokens


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp32 elsewhere (CPU bf16 is slower and less exact)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def adapter_base(ref: str | Path) -> str:
    """The base a LoRA adapter folder (or LoRA run) was trained on: its `base_model_name_or_path`."""
    path = Path(model_dir(ref)) / "adapter_config.json"
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise UserError("adapter_config.json names no base model (base_model_name_or_path)", path=path)
    return base


def load_model(ref: str | Path, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               quantize_4bit: bool = False, merge_adapter: bool = False) -> PreTrainedModel:
    """Load a causal LM (full weights, or a PEFT adapter over its base) from safetensors.

    Args:
        merge_adapter: merge a LoRA adapter into its base and return a plain, fully trainable
            transformers model. Training from a LoRA run needs this: the adapter loads frozen, and
            LoRA over a PeftModel would nest two wrappers. A new adapter trained on the merged
            model points back to this adapter (its `name_or_path`), and loading it merges again.
    """
    ref = model_dir(ref)
    _check_exists(ref)
    if Path(ref).exists():
        # An absolute path, so a LoRA adapter's pointer to its base works from any working directory.
        ref = str(Path(ref).resolve())
    if not is_adapter(ref):
        # use_kernels=False: transformers 5 otherwise swaps in compiled layer code fetched from the
        # Hub on CUDA (remote code nobody asked for, and a crash when offline).
        kwargs = dict(trust_remote_code=trust_remote_code, dtype=dtype, use_safetensors=True, use_kernels=False)
        if quantize_4bit:
            kwargs["quantization_config"] = _bnb_config()
        try:
            return AutoModelForCausalLM.from_pretrained(ref, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {_where(ref)}: {str(e).splitlines()[0]}") from None
    # PEFT reads adapter_model.bin with torch.load whenever the safetensors file is missing,
    # whatever use_safetensors says; a pickle can run code, so such an adapter is refused.
    if not (Path(ref) / "adapter_model.safetensors").is_file():
        raise UserError("LoRA adapter folder has no adapter_model.safetensors (only safetensors weights are "
                        "read; convert adapter_model.bin with a trusted tool first)", path=ref)
    # The base is loaded by this function too: the same safetensors rule, and a base that is
    # itself a LoRA run (LoRA trained on a LoRA run) is merged first.
    base = load_model(adapter_base(ref), trust_remote_code=trust_remote_code, dtype=dtype,
                      quantize_4bit=quantize_4bit, merge_adapter=True)
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft calls a transformers API that warns about its own rename
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, ref)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {_where(ref)}: {str(e).splitlines()[0]}") from None
    if not merge_adapter:
        return model
    merged = model.merge_and_unload()  # W <- W + (alpha / r) * B @ A; plain transformers modules again
    for p in merged.parameters():  # the adapter loaded frozen; a base for training is trainable (4-bit ints cannot be)
        if p.is_floating_point():
            p.requires_grad_(True)
    merged.name_or_path = ref  # what a LoRA trained on this model records as its base
    return merged


def _bnb_config():
    if not torch.cuda.is_available():
        raise UserError("--method qlora needs a CUDA GPU (4-bit bitsandbytes kernels); use --method lora on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--method qlora needs bitsandbytes: pip install 'specialize[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def build_config(size: str, tokenizer, max_positions: int = 2048):
    """A transformers config for a named size, or from a config.json path."""
    if size in SIZES:
        return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                           tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           **SIZES[size])
    path = Path(size)
    if not path.is_file():
        raise UserError(f"unknown size '{size}' (use {', '.join(SIZES)}, or a path to a config.json)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        config = AutoConfig.for_model(**values)
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        raise UserError(f"not a transformers config.json with a model_type: {str(e).splitlines()[0]}",
                        path=path) from None
    config.vocab_size = len(tokenizer)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_model(config, seed: int = 0) -> PreTrainedModel:
    """Random weights from a config (seeded, so two builds are identical)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def add_lora(model: PreTrainedModel, rank: int, alpha: int, dropout: float, target_modules: list[str] | None,
             quantized: bool = False):
    """Wrap the model with LoRA adapters; the base weights are frozen.

    Default targets: every linear layer but the output head ("all-linear", as in the QLoRA
    paper), which works for any architecture without a per-model table.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=target_modules or "all-linear")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"LoRA: {str(e).splitlines()[0]}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS, then any other EOS in the model's generation_config.

    Instruct models often end a turn with a token other than the tokenizer's EOS and list it in
    generation_config.json (Gemma `<end_of_turn>`, Phi-3 `<|end|>`, Llama 3 `<|eot_id|>`); a
    generator that stopped only at the tokenizer's EOS would run on past the end of the turn.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids = [tokenizer.eos_token_id]
    for token in configured:
        if int(token) not in ids:
            ids.append(int(token))
    return ids


def context_length(config) -> int | None:
    """Positions the model holds (its context window), when its config says."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def set_generation_ids(model, tokenizer) -> None:
    """Generation stops at every stop token (`stop_token_ids`) and pads with the pad token (EOS when there is none)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stops = stop_token_ids(model, tokenizer)
    base.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    base.generation_config.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                           else tokenizer.eos_token_id)


def save_model(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Write a model folder atomically (see `rundir.save_pretrained`, the one implementation)."""
    save_pretrained(model, tokenizer, out, state_dict=state_dict)
