"""One pydantic model per stage, and the one precedence rule: defaults < YAML < flags.

YAML keys are the flag names with `_` instead of `-` (`--max-seq-tokens` is `max_seq_tokens`).
An unknown or invalid key is a `UserError` that names the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from specialize.errors import UserError


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TrainConfig(StageConfig):
    """Knobs shared by pre-training and fine-tuning (one loop serves both)."""

    out: Path = Field(Path("runs/latest"), description="run folder to write (config, model/, checkpoints/, metrics.jsonl)")
    epochs: float = Field(3.0, gt=0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps to run; overrides epochs")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate after warmup")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps; default 3% of all steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients to this L2 norm; null turns clipping off")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward pass per process")
    grad_accum_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_seq_tokens: int = Field(512, gt=1, description="longest sequence in tokens; longer examples are dropped and reported")
    packing: bool = Field(True, description="pack several examples per row without cross-attention between them "
                          "(turned off automatically for models that ignore packed positions: OPT, Bloom, MPT)")
    seed: int = Field(42, description="seed for data order, split, init and dropout")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 where supported, else fp32")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    compile: bool = Field(False, description="torch.compile the model (GPUs; on CPU 20-60 s of compilation for ~12% faster steps)")
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit"] = Field(
        "adamw", description="adamw uses torch's fused kernel wherever supported (adamw_fused is an alias); "
                             "adamw_8bit needs bitsandbytes")
    eval_every: int | None = Field(None, gt=0, description="optimizer steps between eval-loss runs; default: at the end of each epoch")
    save_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints; default: at the end of each epoch but the last")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept; older ones are deleted")
    resume: bool = Field(False, description="continue from the newest complete checkpoint in out")
    log_every: int = Field(1, gt=0, description="optimizer steps between metrics.jsonl rows")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo (only for repos you trust)")
    progress: bool = Field(True, description="show a progress bar")
    report_to: list[str] = Field(
        default_factory=list, description="experiment trackers to log to, repeated or comma-separated: tensorboard, "
                                          "wandb, mlflow, trackio (tensorboard, wandb and mlflow write into the run "
                                          "folder, offline unless configured; trackio uses its own local store)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value
        names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r} (use {', '.join(TRACKERS)})")
        return list(dict.fromkeys(names))


class FinetuneConfig(TrainConfig):
    """`specialize finetune`: a base model + data → a specialist."""

    base: str = Field("", description="hub id, local HF folder, or a specialize run folder")
    data: list[str] = Field(default_factory=list, description="training files/folders or HF dataset names")
    eval_data: list[str] = Field(default_factory=list, description="held-out files; default: eval_fraction of data")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of data held out for eval loss when eval_data is empty")
    method: Literal["auto", "full", "lora", "qlora"] = Field(
        "auto", description="full weights, LoRA adapters, or LoRA on a 4-bit base (CUDA); auto: LoRA for models of "
                            "100M parameters and more, full below")
    template: Literal["auto", "qa", "alpaca", "chatml", "tokenizer"] = Field(
        "auto", description="prompt template; auto: the tokenizer's chat template if it has one, else qa/alpaca/chatml by data shape")
    system_prompt: str | None = Field(None, description="system message added to every example that has none")
    train_on_prompt: bool = Field(False, description="also train on prompt tokens (default: answer tokens + EOS only)")
    lora_rank: int = Field(16, gt=0, description="LoRA rank r; higher learns more, costs more memory")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling alpha (effective scale alpha/r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    lora_target_modules: list[str] | None = Field(None, description="module names to adapt; default: all linear layers but the output head")
    rag_docs: str | None = Field(None, description="documents to retrieve from while training (teaches the model to use context)")
    rag_fraction: float = Field(0.5, ge=0, le=1, description="share of training prompts that get retrieved context")
    rag_top_k: int = Field(3, gt=0, description="passages put into each RAG prompt")
    allow_data_errors: bool = Field(False, description="train even when lint finds errors in the data")
    learning_rate: float | None = Field(None, gt=0, description="peak learning rate after warmup; default: 2e-4 for "
                                        "LoRA, 2e-5 for full fine-tuning of 100M+ parameters, 2e-4 below")
    max_seq_tokens: int | None = Field(None, gt=1, description="longest sequence in tokens; longer examples are dropped "
                                       "and reported; default: the smaller of the model's context and the longest "
                                       "example")
    objective: Literal["sft", "dpo", "orpo", "kto", "grpo"] = Field(
        "sft", description="sft: next-token loss on answers; dpo, orpo: prompt/chosen/rejected pairs; kto: "
                           "prompt/completion/label rows (or pairs); grpo: prompts (with reference answers), "
                           "rewarded samples; same loop, full or LoRA")
    beta: float | None = Field(None, ge=0, description="dpo/kto: strength of the pull toward the reference model "
                               "(default 0.1); orpo: weight (lambda) of the odds-ratio term (default 0.1); grpo: "
                               "weight of the KL penalty to the reference (default 0: none)")
    reward: list[str] = Field(default_factory=list, description="grpo: reward(s), summed: exact_match, f1, json, "
                              "stop, length, judge, or module:function (your own Python code); default: f1")
    group_size: int = Field(4, ge=2, description="grpo: answers sampled per prompt (rewards are compared within "
                            "the group)")
    max_new_tokens: int = Field(64, gt=0, description="grpo: most tokens per sampled answer")
    temperature: float = Field(1.0, gt=0, le=2, description="grpo: sampling temperature of the answers")
    judge_url: str | None = Field(None, description="grpo --reward judge: OpenAI-compatible endpoint of the judge")
    judge_model: str | None = Field(None, description="grpo --reward judge: model name at the judge endpoint")
    retention: list[str] = Field(default_factory=list, description="general text (perplexity) or Q&A (F1) files "
                                 "scored before and after training, to measure what the model forgets; results "
                                 "in train_summary.json")
    replay_data: list[str] = Field(default_factory=list, description="general data mixed into training to reduce "
                                   "forgetting (text or Q&A files)")
    replay_fraction: float = Field(0.2, ge=0, lt=1, description="share of the trained target tokens that "
                                   "come from --replay-data")
    dpo_loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: sigmoid (Rafailov et al. 2023) or ipo "
                                                "(Azar et al. 2023, on per-token mean log-ratios as TRL)")
    sft_weight: float = Field(0.0, ge=0, description="dpo: add the chosen answers' SFT loss (mean token NLL) "
                              "times this weight, so DPO does not lower the preferred answers too (RPO, Pang et "
                              "al. 2024; TRL's loss_type [sigmoid or ipo, sft]); 0: plain DPO")


class PretrainConfig(TrainConfig):
    """`specialize pretrain`: random weights → a base model, on raw text."""

    data: list[str] = Field(default_factory=list, description="text files, folders of text, or JSONL with a text field")
    size: str = Field("tiny", description="named size (micro, tiny, small, base) or a transformers config.json")
    tokenizer: str | None = Field(None, description="existing tokenizer (hub id/folder); default: train a byte-level BPE here")
    vocab_size: int = Field(4096, gt=256, description="vocabulary of a locally trained tokenizer")
    eval_fraction: float = Field(0.02, ge=0, lt=1, description="share of text blocks held out for perplexity")
    learning_rate: float = Field(3e-3, gt=0, description="peak learning rate after warmup")
    epochs: float = Field(1.0, gt=0, description="passes over the text")
    max_seq_tokens: int = Field(256, gt=1, description="block length: text is packed into blocks of this many tokens")
    micro_batch_size: int = Field(16, gt=0, description="blocks per forward pass per process")


class GenerateConfig(StageConfig):
    """`specialize generate`: answers with a run's own template."""

    model: str = Field("", description="run folder, model folder or hub id")
    max_new_tokens: int = Field(128, gt=0, description="most tokens generated per answer")
    temperature: float = Field(0.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy (as are values "
                               "below 1e-5); up to 2, as OpenAI's API")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass when temperature > 0")
    batch_size: int = Field(16, gt=0, description="prompts per batch")
    system_prompt: str | None = Field(None, description="system message for every prompt")
    seed: int = Field(0, description="sampling seed")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo")


class EvalConfig(StageConfig):
    """`specialize eval`: metrics for one model (or a predictions file) on one test set."""

    model: str | None = Field(None, description="run folder, model folder or hub id")
    data: str | None = Field(None, description="test set (any supported data file)")
    predictions: str | None = Field(None, description="JSONL of {prediction, reference} rows to score without a model")
    task: Literal["qa", "classify", "extract", "generate", "tool_call"] = Field(
        "qa", description="task type, picks the metrics (tool_call: tool-name accuracy, argument match, when to call)")
    max_new_tokens: int = Field(64, gt=0, description="most tokens per answer")
    batch_size: int = Field(32, gt=0, description="prompts per generation batch")
    docs: str | None = Field(None, description="documents for RAG (folder or JSONL of passages)")
    top_k: int = Field(3, gt=0, description="passages per RAG prompt")
    out: Path | None = Field(None, description="folder for metrics.json and predictions.jsonl")
    json_output: bool = Field(False, description="print one JSON object of metrics on stdout")
    judge_url: str | None = Field(None, description="OpenAI-compatible endpoint for LLM-as-judge (off by default)")
    judge_model: str | None = Field(None, description="model name at the judge endpoint")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo")


class CompareConfig(StageConfig):
    """`specialize compare`: base vs base+RAG vs fine-tuned vs fine-tuned+RAG on one test set."""

    base: str = Field("", description="base model (hub id, folder or run)")
    model: str = Field("", description="fine-tuned run folder")
    data: list[str] = Field(default_factory=list, description="test files; each file is one split (name = file stem)")
    docs: str | None = Field(None, description="documents for RAG")
    predictions: list[str] = Field(default_factory=list, description="NAME=FILE predictions of other systems")
    fewshot: int = Field(0, ge=0, description="also run base+fewshot with this many examples (0: off)")
    task: Literal["qa", "classify", "extract", "generate", "tool_call"] = Field("qa", description="task type")
    runs: list[str] = Field(default_factory=list, description="other fine-tuned runs scored beside --model, as "
                            "NAME=RUN (e.g. sft+dpo=runs/dpo)")
    agent: bool | None = Field(None, description="also score finetuned+agent: the model may call a search_docs "
                               "tool over --docs; default: on when the run was trained with that tool")
    agent_rounds: int = Field(2, ge=1, description="finetuned+agent: most generations per question (a search costs "
                              "one more)")
    max_new_tokens: int = Field(64, gt=0, description="most tokens per answer")
    batch_size: int = Field(32, gt=0, description="prompts per generation batch")
    top_k: int = Field(3, gt=0, description="passages per RAG prompt")
    out: Path = Field(Path("runs/compare"), description="folder for scorecard.json and report.html")
    judge_url: str | None = Field(None, description="OpenAI-compatible endpoint for LLM-as-judge (off by default)")
    judge_model: str | None = Field(None, description="model name at the judge endpoint")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo")


class ConvertConfig(StageConfig):
    """`specialize convert`: FAQ / docs / chats / Slack → Q&A JSONL with provenance."""

    inputs: list[str] = Field(default_factory=list, description="files or folders to convert")
    to: Path = Field(Path("data.jsonl"), description="output JSONL")
    kind: Literal["auto", "faq", "docs", "chat", "slack"] = Field("auto", description="input kind; auto detects it")
    generator: str | None = Field(None, description="OpenAI-compatible base URL to generate Q&A with an LLM")
    generator_model: str | None = Field(None, description="model name at the generator endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the generator's API key")
    chunk_tokens: int = Field(400, gt=0, description="words (not tokens) per document chunk sent to the generator")
    chunk_overlap: int = Field(50, ge=0, description="words shared by neighbouring chunks")
    concurrency: int = Field(4, gt=0, description="generator requests in flight at once")
    # 2048: 8 pairs with room for a reasoning model's <think> block, and a 4k-context local model
    # still has room for the prompt (servers reject prompt + max_tokens > context).
    generator_max_tokens: int = Field(2048, gt=0, description="most tokens the generator may write per chunk; a reply "
                                      "cut off there is a failed chunk, sent again by the next run")
    cache: Path | None = Field(None, description="resumable cache of generator answers; default: next to the output")
    speaker_column: str = Field("speaker", description="CSV chats: column with the speaker")
    text_column: str = Field("text", description="CSV chats: column with the message text")
    conversation_column: str = Field("conversation_id", description="CSV chats: column with the conversation id")
    agent_speakers: list[str] = Field(default_factory=lambda: ["agent", "support", "assistant"],
                                      description="CSV chats: speaker values that are the agent")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1, description="similarity above which two pairs count as one")


class LintConfig(StageConfig):
    """`specialize lint`: what the model will learn from the data, and what is wrong with it."""

    data: list[str] = Field(default_factory=list, description="training data")
    eval_data: list[str] = Field(default_factory=list, description="eval data checked for leakage")
    base: str | None = Field(None, description="tokenizer/model whose template and tokens are checked")
    template: Literal["auto", "qa", "alpaca", "chatml", "tokenizer"] = Field("auto", description="prompt template")
    max_seq_tokens: int | None = Field(None, gt=1, description="longest sequence allowed; default: the model's "
                                       "context with --base, else 512")
    show: int = Field(2, ge=0, description="examples rendered with trained tokens marked")
    system_prompt: str | None = Field(None, description="system message added to every example that has none (as finetune)")
    train_on_prompt: bool = Field(False, description="show prompt tokens as trained too (as finetune --train-on-prompt)")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1, description="similarity above which two rows count as near duplicates")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo")


class ServeConfig(StageConfig):
    """`specialize serve`: an OpenAI-compatible HTTP server for a run."""

    model: str = Field("", description="run folder, model folder or hub id")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = Field(8000, gt=0, lt=65536, description="TCP port")
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` (or set SPECIALIZE_API_KEY)")
    max_batch_size: int = Field(16, gt=0, description="requests generated together")
    max_queue: int = Field(256, gt=0, description="waiting requests before new ones get 503")
    max_new_tokens: int = Field(1024, gt=0, description="most tokens one answer may have; a request asking for more "
                                "gets a 400 (the model's context window limits it too)")
    model_name: str | None = Field(None, description="name shown in /v1/models; default: the run folder's name")
    log_contents: bool = Field(False, description="log message contents (off: only sizes and timings)")
    max_body_bytes: int = Field(4_194_304, gt=0, description="largest request body in bytes; a larger one gets 413 "
                                "before it is read")
    header_timeout_s: float = Field(10.0, gt=0, description="seconds a client has to send a request's line and "
                                    "headers; then 408 and the connection is closed")
    read_timeout_s: float = Field(30.0, gt=0, description="seconds a client has to send the body after the "
                                  "headers; then 408 and the connection is closed")
    health_open: bool = Field(False, description="answer GET /health without the API key (the status only), for "
                              "load balancers and supervisors")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo")


class ChatConfig(GenerateConfig):
    """`specialize chat`: interactive terminal chat."""

    max_new_tokens: int = Field(256, gt=0, description="most tokens generated per answer")


class ExportConfig(StageConfig):
    """`specialize export`: a standalone HF folder (LoRA merged)."""

    model: str = Field("", description="run folder to export")
    out: Path = Field(Path("export"), description="folder to write")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="weights dtype of the export")
    parity_prompts: int = Field(8, ge=0, description="prompts whose greedy outputs are compared before/after export")
    gguf: bool = Field(False, description="also convert to GGUF with llama.cpp's converter when it is installed "
                       "(else print the exact command)")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo")


class DemoConfig(StageConfig):
    """`specialize demo`: the whole life cycle on the embedded pydocs data.

    Budgets are optimizer steps, not minutes, so a config always trains the same base (which is
    what lets it be cached); the defaults take ~5 min (pre-training, once) + ~2 min (fine-tuning)
    on an idle 2-core CPU.
    """

    out: Path = Field(Path("runs/demo"), description="folder for the fine-tuned run, scorecard.json, report.html and predictions")
    facts: int = Field(200, gt=0, description="facts (documented functions) in the train split")
    eval_examples: int = Field(200, gt=0, description="questions per evaluation split (seen, unseen)")
    size: Literal["micro", "tiny", "small", "base"] = Field("tiny", description="named size of the pre-trained base")
    vocab_size: int = Field(2048, gt=256, description="vocabulary of the BPE tokenizer trained on the docs")
    pretrain_steps: int = Field(600, gt=0, description="pre-training optimizer steps of 16 x 256 tokens (the base is cached)")
    pretrain_learning_rate: float = Field(3e-3, gt=0, description="peak learning rate of pre-training")
    finetune_steps: int = Field(400, gt=0, description="fine-tuning optimizer steps")
    finetune_learning_rate: float = Field(5e-3, gt=0, description="peak learning rate of full fine-tuning (tiny models want it high)")
    finetune_batch_size: int = Field(32, gt=0, description="examples per fine-tuning step")
    rag_fraction: float = Field(0.3, ge=0, le=1, description="share of the training questions asked with their retrieved passage")
    reading_facts: int = Field(3000, ge=0, description="other functions asked once each with their passage: practice in reading context")
    top_k: int = Field(1, gt=0, description="passages per RAG prompt, in training and evaluation")
    passage_words: int = Field(64, ge=8, description="longest retrieval passage in words (docstrings are cut into windows)")
    max_new_tokens: int = Field(40, gt=0, description="most tokens per generated answer (the longest test answer is 30)")
    eval_batch_size: int = Field(64, gt=0, description="prompts per generation batch")
    modules: list[str] | None = Field(None, description="document only these stdlib modules (default: all; for quick runs)")
    agent: bool = Field(False, description="also train the search_docs agent (tool-call trajectories over the "
                        "reading practice) and compare finetuned+agent; off by default: the tiny base learns the "
                        "call format but not what to search for (README, the demo)")
    updates: bool = Field(False, description="run the knowledge-update scenario instead: some facts change, the "
                          "specialist is fine-tuned on the updates and compared with RAG over the updated docs")
    seed: int = Field(0, description="seed for every stage")
    rebuild: bool = Field(False, description="ignore the caches and rebuild data and base")
    progress: bool = Field(True, description="show progress bars")


class CurveConfig(FinetuneConfig):
    """`specialize curve`: one fine-tuning run per data fraction and seed → quality (and retention) vs examples."""

    out: Path = Field(Path("runs/curve"), description="folder for curve.json, report.html and one run per point")
    fractions: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0],
                                   description="shares of --data trained on, one point each (nested subsets)")
    seeds: int = Field(2, gt=0, description="seeds per fraction (data order and subset)")
    jobs: int | None = Field(None, gt=0, description="points trained at once, each its own process; default: what "
                             "memory and cores allow")
    plan: bool = Field(False, description="only write each point's finetune command into curve.json (run them on "
                       "your scheduler, then run curve again to gather)")
    max_new_tokens: int = Field(64, gt=0, description="most tokens per generated answer when scoring a point")
    compare: list[str] = Field(default_factory=list, description="other curve folders (the same curve with "
                               "--method lora, or --replay-data) drawn in this report: quality and retention "
                               "side by side")

    @field_validator("fractions", mode="before")
    @classmethod
    def _fractions(cls, value: Any) -> Any:
        items = [value] if isinstance(value, (str, float, int)) else value
        if not isinstance(items, list):
            return value
        out = [float(f) for item in items for f in str(item).split(",") if f.strip()]
        if not out or any(not 0 < f <= 1 for f in out):
            raise ValueError("fractions are shares of the data in (0, 1]")
        return sorted(set(out))


class PairsConfig(StageConfig):
    """`specialize pairs`: a run's own sampled answers, graded → chosen/rejected preference pairs."""

    model: str = Field("", description="run folder (or model folder / hub id) to sample from")
    data: list[str] = Field(default_factory=list, description="questions with reference answers (any Q&A format)")
    out: Path = Field(Path("prefs.jsonl"), description="preference JSONL to write (prompt/chosen/rejected)")
    samples: int = Field(4, ge=2, description="answers sampled per question")
    grade: str = Field("f1", description="how answers are graded: f1, exact_match, judge, or module:function")
    min_margin: float = Field(0.1, ge=0, description="smallest grade difference between chosen and rejected; "
                              "questions whose answers all grade alike give no pair")
    chosen: Literal["best", "reference"] = Field("best", description="chosen side: best, the best-graded sample; "
                                                  "reference, the question's reference answer (graded too), so "
                                                  "questions the model always gets wrong also give pairs")
    temperature: float = Field(1.0, gt=0, le=2, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(64, gt=0, description="most tokens per answer")
    batch_size: int = Field(16, gt=0, description="prompts per generation batch")
    system_prompt: str | None = Field(None, description="system message for every prompt")
    judge_url: str | None = Field(None, description="--grade judge: OpenAI-compatible endpoint of the judge")
    judge_model: str | None = Field(None, description="--grade judge: model name at the judge endpoint")
    seed: int = Field(0, description="sampling seed")
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub repo")
    progress: bool = Field(True, description="show a progress bar")


class StudioConfig(StageConfig):
    """`specialize studio`: the life cycle in the browser, over one workspace folder."""

    workspace: Path = Field(Path("."), description="folder whose data and runs the studio shows; files are read "
                            "and written only inside it")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the studio to the network")
    port: int = Field(7860, gt=0, lt=65536, description="TCP port")
    token: str | None = Field(None, description="access token (or set SPECIALIZE_TOKEN); default: a random one, "
                              "printed as the URL to open")
    max_upload_bytes: int = Field(52_428_800, gt=0, description="largest uploaded file in bytes")
    jobs: int = Field(1, gt=0, description="training/compare runs at once; the rest wait in a queue")
    progress: bool = Field(True, description="show progress in the terminal")


C = TypeVar("C", bound=StageConfig)


class _Null:
    """A flag's explicit `none`: sets a nullable field to null (a flag left out is plain None)."""

    def __repr__(self) -> str:
        return "none"


NULL = _Null()


def _describe_error(err: dict[str, Any], cls: type[StageConfig]) -> str:
    key = ".".join(str(p) for p in err.get("loc", ())) or "config"
    if err.get("type") == "extra_forbidden":
        allowed = ", ".join(sorted(cls.model_fields))
        return f"unknown key '{key}' (allowed: {allowed})"
    return f"invalid value for '{key}': {err.get('msg', 'invalid')} (got {err.get('input')!r})"


def load_config(cls: type[C], config_file: str | Path | None = None, **flags: Any) -> C:
    """Build a stage config: defaults < YAML file < flags (flags left as None are not set)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError("config file not found", path=path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"not valid YAML: {problem}", path=path,
                            line=mark.line + 1 if mark is not None else None) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError("a config file must be a mapping of key: value", path=path)
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        for key, value in values.items():  # `data: train.jsonl` means a list of one
            field = cls.model_fields.get(key)
            if isinstance(value, str) and field is not None and "list[" in str(field.annotation):
                values[key] = [value]
    values.update({k: None if v is NULL else v for k, v in flags.items() if v is not None and v != [] and v != ()})
    try:
        return cls(**values)
    except ValidationError as e:
        prefix = f"{config_file}: " if config_file else ""
        raise UserError(prefix + _describe_error(e.errors()[0], cls)) from None


def save_config(config: StageConfig, path: Path) -> None:
    """Write the resolved config as YAML (exactly what ran)."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
