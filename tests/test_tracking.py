"""--report-to: every tracker writes into the run folder (or its own local store), offline, and
reads back exactly what was logged. The network guard (conftest) fails any test that tries the
network, so passing here means offline.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from specialize.config import FinetuneConfig
from specialize.errors import UserError
from specialize.tracking import Trackers, accelerator_kwargs, flat_config, tracker_values
from helpers import QA8

ROWS = [  # two training rows (the second without a gradient norm, as under DeepSpeed) and an eval
    {"step": 1, "epoch": 0.5, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens": 100, "tokens_per_s": 1000.0,
     "elapsed_s": 1.0},
    {"step": 2, "epoch": 1.0, "loss": 1.25, "lr": 5e-4, "grad_norm": None, "tokens": 200, "tokens_per_s": 1500.0,
     "elapsed_s": 2.0},
    {"step": 2, "eval_loss": 1.5, "eval_ppl": math.exp(1.5)},
]
LOSSES = [(1, 2.5), (2, 1.25)]
TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "TRACKIO_SPACE_ID",
               "TRACKIO_SERVER_URL")


@pytest.fixture(autouse=True)
def _tracker_env(monkeypatch, tmp_path):
    """No tracker settings from the machine; what a test sets (or accelerator_kwargs sets) is undone after it."""
    for name in TRACKER_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # wandb keeps settings and caches under the home folder; not the user's
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def run_trackers(names: list[str], run: Path, project: str = "specialize") -> FinetuneConfig:
    cfg = FinetuneConfig(base="base-model", data=["qa.jsonl"], out=str(run), learning_rate=1e-3, report_to=names)
    trackers = Trackers(Accelerator(**accelerator_kwargs(names, run)), cfg, run, project)
    for row in ROWS:
        trackers.log(row, row["step"])
    trackers.finish()
    return cfg


def test_no_trackers_no_kwargs_and_no_tracker_package_imported(tmp_path):
    # A fresh interpreter: this one may have imported them for the other tests.
    code = """if True:
        import sys
        from pathlib import Path
        from accelerate import Accelerator
        from specialize.tracking import Trackers, accelerator_kwargs
        kwargs = accelerator_kwargs([], Path(sys.argv[1]))
        trackers = Trackers(Accelerator(**kwargs), {"report_to": []}, Path(sys.argv[1]), "specialize")
        trackers.log({"step": 1, "loss": 1.0}, 1)
        trackers.finish()
        print(kwargs, sorted(m for m in sys.modules if m.split(".")[0] in
                             ("tensorboard", "tensorboardX", "wandb", "mlflow", "trackio")))
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{} []"
    assert list(tmp_path.iterdir()) == []


def test_metrics_rows_map_to_stable_tracker_names():
    assert tracker_values(ROWS[0]) == {"train/loss": 2.5, "train/learning_rate": 1e-3, "train/grad_norm": 0.75,
                                       "train/tokens_per_s": 1000.0, "train/epoch": 0.5, "train/tokens": 100.0,
                                       "train/elapsed_s": 1.0}
    assert "train/grad_norm" not in tracker_values(ROWS[1])
    assert tracker_values(ROWS[2]) == {"eval/loss": 1.5, "eval/perplexity": math.exp(1.5)}
    # an objective's own keys: namespaced ones kept, eval_x under eval/, flags and text left out
    assert tracker_values({"step": 3, "rewards/margin": 0.5, "eval_accuracy": 0.75, "packed": True,
                           "note": "x"}) == {"rewards/margin": 0.5, "eval/accuracy": 0.75}


def test_the_resolved_config_is_flat_and_scalar():
    flat = flat_config(FinetuneConfig(base="b", data=["a.jsonl", "b.jsonl"], report_to=["tensorboard"]))
    assert flat["base"] == "b" and flat["data"] == '["a.jsonl", "b.jsonl"]'
    assert flat["report_to"] == '["tensorboard"]'
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat_config({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


def test_a_missing_tracker_package_is_a_user_error_naming_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^field 'report_to': --report-to wandb needs the wandb package: "
                                        r"pip install wandb$"):
        accelerator_kwargs(["tensorboard", "wandb"], tmp_path)


def test_trackers_refuse_an_accelerator_made_without_them(tmp_path):
    with pytest.raises(ValueError, match=r"not made to log with \['tensorboard'\]"):
        Trackers(Accelerator(), {"report_to": ["tensorboard"]}, tmp_path, "specialize")


def test_tensorboard_reads_the_loss_curve_and_config_from_the_run_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_trackers(["tensorboard"], run)
    events = EventAccumulator(str(run / "tensorboard" / "specialize")).Reload()

    def curve(tag):
        return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]

    assert curve("train/loss") == LOSSES
    assert curve("train/learning_rate") == [(1, 1e-3), (2, 5e-4)]
    assert curve("train/grad_norm") == [(1, 0.75)]
    assert curve("train/tokens_per_s") == [(1, 1000.0), (2, 1500.0)]
    assert curve("eval/loss") == [(2, 1.5)]
    assert curve("eval/perplexity") == [(2, math.exp(1.5))]
    [hparams] = (run / "tensorboard" / "specialize").glob("*/hparams.yml")
    config = yaml.safe_load(hparams.read_text())
    assert config["learning_rate"] == 1e-3 and config["base"] == "base-model"


def test_mlflow_logs_to_a_local_store_in_the_run_folder_unless_the_user_set_one(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    run_trackers(["mlflow"], run)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # mlflow phones home at import otherwise
    store = f"sqlite:///{run / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    [found] = client.search_runs([client.get_experiment_by_name("specialize").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train/loss")] == LOSSES
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "eval/loss")] == [(2, 1.5)]
    assert found.data.params["learning_rate"] == "0.001" and found.data.params["base"] == "base-model"
    # mlflow's tracking URI is process-wide: left set, the next run in this process would log here
    import mlflow

    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() != store

    # The user's store and telemetry setting win (and the first run left mlflow's process-wide URI unset).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    run_trackers(["mlflow"], tmp_path / "second", project="other")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert not (tmp_path / "second" / "mlflow.db").exists()
    [second] = client.search_runs([client.get_experiment_by_name("other").experiment_id])
    assert second.info.run_name == "second"


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (wandb ships no Python reader any more; the format is LevelDB's log:
    a 7-byte file header, then 32 KiB blocks of records, each `crc32, length, type` + payload)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


def test_wandb_runs_offline_into_the_run_folder(tmp_path):
    run = tmp_path / "run"
    run_trackers(["wandb"], run)
    [offline] = (run / "wandb").glob("offline-run-*")
    [log] = offline.glob("run-*.wandb")
    # wandb-core writes the file in its own process: under load the last records can land a moment
    # after finish() returns (one full-suite run here saw no history yet). Its own end marker, the
    # exit record, says the file is complete; everything below is asserted on the complete file.
    deadline = time.monotonic() + 30
    records = wandb_records(log)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "wandb never wrote its exit record"
        time.sleep(0.2)
        records = wandb_records(log)
    history = {r.history.step.num: {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                    for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"}
    assert [(step, row["train/loss"]) for step, row in history.items()] == LOSSES
    assert history[2]["eval/loss"] == 1.5  # the eval at step 2 joins that step's row
    [config] = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    values = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in config.update}
    assert values["learning_rate"] == {"value": 1e-3} or values["learning_rate"] == 1e-3
    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == "run" and run_record.project == "specialize"


def test_wandb_follows_the_users_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_trackers(["wandb"], tmp_path / "run")
    assert not list((tmp_path / "run").glob("wandb/offline-run-*"))


def test_trackio_logs_to_its_local_store(tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    project = f"specialize-{tmp_path.name}"  # trackio's store is one folder for the whole process
    run_trackers(["trackio"], tmp_path / "run", project)
    logs = SQLiteStorage.get_logs(project, "run")
    assert [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row] == LOSSES
    assert [(row["step"], row["eval/loss"]) for row in logs if "eval/loss" in row] == [(2, 1.5)]
    assert SQLiteStorage.get_run_config(project, "run")["learning_rate"] == 1e-3


def test_the_training_loop_curve_reaches_tensorboard(tmp_path, tiny_llama):
    """End to end through `train`: TensorBoard's loss curve is metrics.jsonl's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from specialize.data.formats import load_examples
    from specialize.data.templates import resolve_template
    from specialize.data.tokenize import encode_examples, pad_token_id
    from specialize.train import train

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    examples = load_examples([str(QA8)])
    items = encode_examples(examples, tokenizer, resolve_template("auto", tokenizer, {e.shape for e in examples}),
                            512)[0]
    run = tmp_path / "run"
    cfg = FinetuneConfig(max_steps=3, micro_batch_size=4, learning_rate=3e-3, warmup_steps=0, progress=False,
                         report_to=["tensorboard"])
    # the loop builds its accelerator with the trackers and logs every metrics row to them
    train(AutoModelForCausalLM.from_pretrained(tiny_llama), items, [], cfg, run, pad_id=pad_token_id(tokenizer))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard" / "specialize")).Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == \
           [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(rows) == 3


def test_finetune_report_to_tensorboard_writes_the_loss_curve_into_the_run(tmp_path, tiny_llama):
    """Done when TensorBoard reads a run's loss curve from its folder: through `finetune` itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import QA8
    from specialize.config import FinetuneConfig
    from specialize.finetune import finetune

    out = tmp_path / "run"
    run = finetune(FinetuneConfig(base=str(tiny_llama), data=[str(QA8)], out=out, max_steps=3, micro_batch_size=4,
                                  warmup_steps=0, progress=False, report_to=["tensorboard"]))
    events = EventAccumulator(str(out / "tensorboard" / "specialize"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(row["step"], row["loss"]) for row in run.read_metrics() if "loss" in row]
    assert [step for step, _ in logged] == [1, 2, 3]
    assert all(abs(a[1] - b[1]) < 1e-6 for a, b in zip(logged, expected))


def test_preference_rewards_reach_the_trackers(tmp_path, tiny_llama):
    """An objective's own metrics (DPO's reward margins) go to metrics.jsonl and to the trackers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import QA8, write_jsonl
    from specialize.config import FinetuneConfig
    from specialize.finetune import finetune

    rows = [json.loads(line) for line in QA8.read_text().splitlines()]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["question"], "chosen": r["answer"],
                                                     "rejected": "I do not know."} for r in rows])
    out = tmp_path / "dpo"
    run = finetune(FinetuneConfig(base=str(tiny_llama), data=[str(pairs)], out=out, objective="dpo", max_steps=2,
                                  micro_batch_size=8, progress=False, report_to=["tensorboard"]))
    margins = [r["rewards/margins"] for r in run.read_metrics() if "rewards/margins" in r]
    events = EventAccumulator(str(out / "tensorboard" / "specialize"))
    events.Reload()
    assert len(margins) == 2
    assert [e.value for e in events.Scalars("rewards/margins")] == pytest.approx(margins, abs=1e-6)
