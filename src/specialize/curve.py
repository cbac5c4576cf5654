"""`specialize curve`: how much data the task needs, what each size costs, and what it forgets.

    specialize curve --base runs/base --data train.jsonl --eval-data seen.jsonl --eval-data unseen.jsonl \\
        --fractions 0.1,0.25,0.5,1.0 --seeds 2 --out runs/curve [any finetune flag]

One fine-tuning run per (fraction, seed), each its own `specialize finetune` process, `--jobs` at a time:
- subsets are nested: seed s shuffles the rows once, and fraction f trains on the first round(f x n)
  of that order, so a larger point's data holds every smaller point's (the curve measures more
  data, not other data); the subset is written to `DIR/points/<name>/data.jsonl`;
- each point's exact command is in `curve.json` (`--plan` writes only that: run the commands on
  your scheduler, then run `curve` again to gather); a point whose run finished with the same
  command is never run again, so gathering is idempotent;
- each run is scored on every `--eval-data` split (greedy answers, `evaluate_system`, as eval
  and compare) and carries its retention (`finetune --retention`, by default the held-out
  documents of a specialize pretrain base) → `DIR/curve.json` and `DIR/report.html`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from specialize.config import CurveConfig, FinetuneConfig
from specialize.errors import UserError
from specialize.files import write_atomic, write_json
from specialize.flags import flag_name

console = Console(stderr=True, markup=False)  # paths are printed verbatim

# CurveConfig fields that are not finetune's, and finetune fields every point sets itself.
OWN_FIELDS = {"fractions", "seeds", "jobs", "plan", "max_new_tokens", "compare"}
POINT_FIELDS = {"out", "data", "eval_data", "seed", "progress"}
PATH_FIELDS = {"base", "retention", "replay_data", "rag_docs"}
PROCESS_BYTES = 1.5e9  # one finetune process before its model: torch, transformers, the data


def read_rows(sources: list[str]) -> list[dict]:
    """Every training row as it was written (any format `data.io` reads), in source order."""
    from specialize.data.io import read_source

    rows = [record.data for source in sources for records in read_source(source).values() for record in records]
    if not rows:
        raise UserError(f"no training rows in {', '.join(sources)}")
    return rows


def nested_subsets(n: int, fractions: list[float], seed: int) -> dict[float, list[int]]:
    """{fraction: row indices}: the first round(f x n) (at least 1) of one seeded order of the rows,
    so every smaller fraction's rows are part of every larger one's. Indices come sorted."""
    order = list(range(n))
    random.Random(f"curve-{seed}").shuffle(order)
    return {f: sorted(order[:max(1, round(f * n))]) for f in fractions}


def point_name(fraction: float, seed: int) -> str:
    return f"f{fraction:g}-s{seed}"


def _flag_values(field: str, value) -> list[str]:
    """One config value as finetune's command-line flags (flags.py's rules: lists repeat, on/off, none)."""
    flag = flag_name(field)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if value is None:
        return [flag, "none"]
    if isinstance(value, (list, tuple)):
        return [part for item in value for part in (flag, str(item))]
    return [flag, str(value)]


def _absolute(value):
    """Paths that exist here, made absolute: the command then runs from any folder (a scheduler's)."""
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return str(Path(value).resolve()) if isinstance(value, str) and value and Path(value).exists() else value


def point_settings(cfg: CurveConfig, data: Path, out: Path, seed: int) -> dict:
    """The finetune settings of one point: the finetune flags given to curve, plus the point's data,
    run folder and seed. Unless told otherwise every row is trained on (no eval split: the curve's
    x axis is the examples trained on). Paths are absolute, so the command runs from any folder."""
    given = {f: getattr(cfg, f) for f in FinetuneConfig.model_fields
             if f in cfg.model_fields_set and f not in OWN_FIELDS | POINT_FIELDS}
    given = {f: _absolute(v) if f in PATH_FIELDS else v for f, v in given.items()}
    return {"base": _absolute(cfg.base), "eval_fraction": 0.0} | given | {
        "data": [str(data.resolve())], "out": str(out.resolve()), "seed": cfg.seed + seed, "progress": False}


def finetune_command(settings: dict) -> list[str]:
    """The exact `specialize finetune` command for these settings (no shell: one argument each)."""
    command = [sys.executable, "-m", "specialize", "finetune"]
    for field, value in settings.items():
        command += _flag_values(field, value)
    return command


def default_jobs(cfg: CurveConfig, points: int) -> tuple[int, str]:
    """Points trained at once: one per GPU; on CPU as many as cores and memory allow, and the reason."""
    import psutil
    import torch

    from specialize.defaults import model_parameters

    if torch.cuda.is_available():
        return max(1, min(points, torch.cuda.device_count())), f"{torch.cuda.device_count()} GPU(s)"
    cores = os.cpu_count() or 1
    parameters = model_parameters(cfg.base, cfg.trust_remote_code) or 0
    # fp32 weights + gradients + AdamW's two moments: 16 bytes a parameter (LoRA: the weights, ~4).
    per_point = PROCESS_BYTES + parameters * (4 if cfg.method in ("lora", "qlora") else 16)
    by_memory = int(psutil.virtual_memory().available * 0.8 // per_point)
    jobs = max(1, min(points, cores, by_memory))
    return jobs, f"{cores} cores, {psutil.virtual_memory().available / 2**30:.1f} GiB free, ~{per_point / 2**30:.1f} GiB a point"


class Point:
    """One (fraction, seed): its subset, command and run folder."""

    def __init__(self, root: Path, fraction: float, seed: int, rows: list[dict], cfg: CurveConfig):
        self.fraction, self.seed, self.examples = fraction, seed, len(rows)
        self.name = point_name(fraction, seed)
        self.folder = root / "points" / self.name
        self.data, self.run = self.folder / "data.jsonl", self.folder / "run"
        self.text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.settings = point_settings(cfg, self.data, self.run, seed)
        self.command = finetune_command(self.settings)
        self.key = hashlib.sha256((json.dumps(self.command) + self.text).encode()).hexdigest()[:16]

    def write(self) -> None:
        """The subset (rewritten only when it changed: its age tells a finished run is still valid)
        and the command."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.data.is_file() or self.data.read_text(encoding="utf-8") != self.text:
            write_atomic(self.data, self.text)
        write_json(self.folder / "point.json", {"command": self.command})

    def done(self) -> bool:
        """Its run finished after the subset was last written, with this point's settings (whoever
        ran it: this curve, or a scheduler running the command from curve.json)."""
        from specialize.rundir import RunDir

        run = RunDir(self.run)
        if run.read_summary() is None or self.data.stat().st_mtime_ns > run.summary_path.stat().st_mtime_ns:
            return False
        ran = run.read_config()
        expected = FinetuneConfig(**self.settings).model_dump(mode="json")
        # Settings finetune resolves (method auto, a learning rate left to the model) are not compared.
        return all(ran.get(k) == expected[k] for k, v in self.settings.items()
                   if v is not None and v != "auto" and k != "progress")


def run_points(points: list[Point], jobs: int, on_done) -> None:
    """Run the points' commands, `jobs` processes at a time; `on_done(point)` as each one finishes.

    Each process gets an equal share of the cores (torch would otherwise start a thread per core
    in every process), or its own GPU. A failed point stops the curve with its log's last line.
    """
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    waiting, running = list(points), {}
    free = list(range(max(jobs, 1)))
    threads = str(max(1, (os.cpu_count() or 1) // max(jobs, 1)))
    try:
        while waiting or running:
            while waiting and free:
                point, slot = waiting.pop(0), free.pop(0)
                env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                log = open(point.folder / "log.txt", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
                process = subprocess.Popen(point.command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[point.name] = (point, process, log, slot, time.perf_counter())
                console.print(f"curve: training {point.name} ({point.examples:,} examples)")
            time.sleep(0.5)
            for name, (point, process, log, slot, started) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                free.append(slot)
                if process.returncode != 0:
                    lines = (point.folder / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
                    raise UserError(f"point {name} failed (exit {process.returncode}): "
                                    f"{lines[-1] if lines else 'no output'} (log: {point.folder / 'log.txt'})")
                write_json(point.folder / "seconds.json", {"seconds": time.perf_counter() - started})
                on_done(point)
    finally:
        for point, process, log, _, _ in running.values():
            process.terminate()
            process.wait()
            log.close()


def score_point(point: Point, splits: list[str], cfg: CurveConfig) -> dict:
    """F1 and exact match of the point's run on every split, cached beside the run (by split content)."""
    cache_file = point.folder / "scores.json"
    inputs = [cfg.max_new_tokens, point.key] + [hashlib.sha256(Path(s).read_bytes()).hexdigest() for s in splits]
    digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8"))
        if cached.get("digest") == digest:
            return cached["scores"]
    except (OSError, ValueError):
        pass
    from specialize.evaluate.systems import (
        evaluate_system,
        load_test_examples,
        run_settings,
    )
    from specialize.generate import Generator

    generator = Generator.load(str(point.run), trust_remote_code=cfg.trust_remote_code)
    system_prompt = run_settings(str(point.run)).get("system_prompt")
    scores = {}
    for split in splits:
        result = evaluate_system(generator, load_test_examples(split, system_prompt), "qa",
                                 max_new_tokens=cfg.max_new_tokens, batch_size=64, description=point.name)
        scores[Path(split).stem] = {"f1": result.metrics["f1"], "exact_match": result.metrics["exact_match"]}
    write_json(cache_file, {"digest": digest, "scores": scores})
    return scores


def gather(point: Point, splits: list[str], cfg: CurveConfig) -> dict:
    """curve.json's row of one finished point."""
    summary = json.loads((point.run / "train_summary.json").read_text(encoding="utf-8"))
    try:
        seconds = json.loads((point.folder / "seconds.json").read_text(encoding="utf-8"))["seconds"]
    except (OSError, ValueError, KeyError):
        seconds = summary.get("seconds")  # run elsewhere: its training time
    retention = {name: {row["kind"]: row["after"], "change": row["change"]}
                 for name, row in (summary.get("retention") or {}).items()}
    return {"name": point.name, "fraction": point.fraction, "examples": point.examples, "seed": point.seed,
            "scores": score_point(point, splits, cfg), "retention": retention, "seconds": seconds,
            "train_seconds": summary.get("seconds"), "train_loss": summary.get("train_loss"),
            "method": summary.get("method"), "replay": summary.get("replay"), "run": str(point.run),
            "command": point.command}


def run_curve(cfg: CurveConfig) -> dict:
    """Train (or plan) every point, score the finished ones; writes and returns curve.json."""
    from specialize.curve_report import summarize, write_curve_report

    if not cfg.base:
        raise UserError("no base model given (use --base HUB_ID_OR_FOLDER)")
    if not cfg.data:
        raise UserError("no training data given (use --data FILE)")
    if not cfg.eval_data and not cfg.plan:
        raise UserError("no test split given (use --eval-data FILE, once per split)")
    stems: set[str] = set()
    for split in cfg.eval_data:
        if not Path(split).is_file():
            raise UserError("test split not found", path=split)
        # Scores are keyed by file stem (as compare's splits are): a second qa.jsonl would overwrite
        # the first one's. The message is compare's (evaluate/compare.py load_splits).
        if Path(split).stem in stems:
            raise UserError(f"two test files are both named '{Path(split).stem}'; splits are named by file stem, "
                            "rename one", path=split)
        stems.add(Path(split).stem)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = read_rows(cfg.data)
    points = []
    for seed in range(cfg.seeds):
        for fraction, indices in nested_subsets(len(rows), cfg.fractions, seed).items():
            points.append(Point(out, fraction, seed, [rows[i] for i in indices], cfg))
    for point in points:
        point.write()
    todo = [p for p in points if not p.done()]
    console.print(f"curve: {len(rows):,} rows, {len(points)} points ({len(cfg.fractions)} fractions x "
                  f"{cfg.seeds} seeds); {len(points) - len(todo)} already finished")
    gathered: dict[str, dict] = {}
    try:

        if todo and not cfg.plan:
            jobs, why = (cfg.jobs, "--jobs") if cfg.jobs else default_jobs(cfg, len(todo))
            console.print(f"curve: {len(todo)} point(s) to train, {jobs} at a time ({why})")
            # A finished point is scored in a thread while the next ones train: scoring in the scheduling
            # loop left the other slots idle until it was done (minutes on a busy CPU).
            with ThreadPoolExecutor(max_workers=1) as scorer:
                futures = {}

                def on_done(point: Point) -> None:
                    if cfg.eval_data:
                        futures[point.name] = scorer.submit(gather, point, cfg.eval_data, cfg)

                run_points(todo, jobs, on_done)
                gathered.update({name: future.result() for name, future in futures.items()})
        for point in points:
            if point.name not in gathered and point.done() and cfg.eval_data:
                gathered[point.name] = gather(point, cfg.eval_data, cfg)
    except BaseException as e:
        # A curve.json or report.html of an earlier run would look like this run's, complete: the
        # report goes, and curve.json says what failed and holds only the points scored before it.
        (out / "report.html").unlink(missing_ok=True)
        write_json(out / "curve.json", {"status": "failed", "error": str(e) or e.__class__.__name__,
                                        "base": {"model": cfg.base},
                                        "data": {"files": list(cfg.data), "rows": len(rows)},
                                        "splits": [Path(s).stem for s in cfg.eval_data],
                                        "points": [gathered[p.name] for p in points if p.name in gathered],
                                        "seconds": time.perf_counter() - started})
        raise
    rows_out = [gathered.get(p.name) or {"name": p.name, "fraction": p.fraction, "examples": p.examples,
                                         "seed": p.seed, "status": "planned", "run": str(p.run),
                                         "command": p.command} for p in points]
    curve = {"base": {"model": cfg.base, "retention": _base_retention(points)},
             "data": {"files": list(cfg.data), "rows": len(rows)}, "splits": [Path(s).stem for s in cfg.eval_data],
             "points": rows_out, "seconds": time.perf_counter() - started}
    curve["summary"] = summarize(curve)
    write_json(out / "curve.json", curve)
    if any("scores" in p for p in rows_out):
        write_curve_report(curve, out / "report.html", others=_other_curves(cfg.compare))
    else:  # nothing scored (a plan): an earlier run's report would be announced as this one's
        (out / "report.html").unlink(missing_ok=True)
    for line in curve["summary"].get("lines", []):
        print(line, flush=True)
    console.print(f"curve: {out / 'curve.json'}" + (f", {out / 'report.html'}" if (out / 'report.html').exists() else ""))
    return curve


def _other_curves(folders: list[str]) -> dict[str, dict]:
    """The curve.json of each `--compare` folder, by folder name."""
    others = {}
    for folder in folders:
        path = Path(folder) / "curve.json"
        try:
            others[Path(folder).name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"not a finished curve folder ({e.__class__.__name__})", path=path) from None
        if others[Path(folder).name].get("status") == "failed":
            raise UserError("that curve failed; run it again before comparing with it", path=path)
    return others


def _base_retention(points: list[Point]) -> dict:
    """The base's retention scores: every run measured them before training (the same base)."""
    for point in points:
        try:
            summary = json.loads((point.run / "train_summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return {name: {row["kind"]: row["before"]} for name, row in (summary.get("retention") or {}).items()}
    return {}

