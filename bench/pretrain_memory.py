"""Peak memory of `specialize pretrain` on a corpus N MB and 10N MB large (issue 17, item 6).

    python bench/pretrain_memory.py                      # 5 MB and 50 MB of text files
    python bench/pretrain_memory.py --sizes 2 20 --tokenizer tests/assets/tokenizer

Each size runs `specialize pretrain --max-steps 2` in its own process on a generated folder of
text files (seeded: the same text every time), and the process's peak RSS is read from
`os.wait4`, so it counts everything the process ever held: the text, the token ids, the blocks,
the model and the imports. The claim checked: ten times the text raises the peak by less than 2x
(`--max-ratio`). Sizes are MB of UTF-8 text; the figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILE_BYTES = 40_000  # one document per file, as a folder of articles would be


def _words(rng: random.Random, count: int) -> list[str]:
    """A fixed made-up vocabulary: syllables glued together, so BPE has real merges to learn."""
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    return ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(count)]


def write_corpus(folder: Path, megabytes: float, seed: int = 0, one_file: bool = False) -> int:
    """`megabytes` of seeded text in files of ~FILE_BYTES (or all in one file); returns the number of files."""
    rng = random.Random(seed)
    vocabulary = _words(rng, 5000)
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocabulary))))  # Zipf-like
    folder.mkdir(parents=True, exist_ok=True)
    target, written, files = int(megabytes * 1e6), 0, 0
    while written < target:
        sentences = []
        size = 0
        while size < FILE_BYTES:
            sentence = " ".join(rng.choices(vocabulary, cum_weights=cumulative, k=rng.randint(5, 20))).capitalize() + "."
            sentences.append(sentence)
            size += len(sentence) + 1
        text = "\n".join(sentences) + "\n"
        if one_file:
            with open(folder / "corpus.txt", "a", encoding="utf-8") as f:
                f.write(text)
        else:
            (folder / f"doc-{files:06d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode())
        files += 1
    return 1 if one_file else files


def peak_rss_mib(argv: list[str], log: Path) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, exit status) of one child process running `argv`."""
    started = time.perf_counter()
    with open(log, "wb") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.perf_counter() - started, child.returncode  # ru_maxrss: KiB on Linux


def pretrain_argv(data: Path, out: Path, args) -> list[str]:
    argv = [sys.executable, "-m", "specialize", "pretrain", "--data", str(data), "--out", str(out),
            "--size", args.size, "--max-steps", "2", "--micro-batch-size", "4", "--max-seq-tokens",
            str(args.block), "--vocab-size", str(args.vocab_size), "--no-progress"]
    return argv + (["--tokenizer", args.tokenizer] if args.tokenizer else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs=2, default=[5, 50], metavar=("N", "TEN_N"),
                        help="corpus sizes in MB (default 5 50)")
    parser.add_argument("--size", default="micro", help="model size (default micro: the data is what is measured)")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--tokenizer", help="an existing tokenizer folder (skips training a BPE)")
    parser.add_argument("--one-file", action="store_true", help="the corpus as one text file (one document)")
    parser.add_argument("--max-ratio", type=float, default=2.0)
    parser.add_argument("--keep", help="keep corpora and runs in this folder instead of a temporary one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        rows = []
        for megabytes in args.sizes:
            corpus = root / f"corpus-{megabytes:g}mb"
            files = write_corpus(corpus, megabytes, one_file=args.one_file)
            log = root / f"pretrain-{megabytes:g}mb.log"
            rss, seconds, code = peak_rss_mib(pretrain_argv(corpus, root / f"run-{megabytes:g}mb", args), log)
            if code != 0:
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
                return f"pretrain on {megabytes:g} MB failed with exit status {code}"
            rows.append((megabytes, files, rss, seconds))
            print(f"{megabytes:g} MB ({files} files): peak RSS {rss:,.0f} MiB, {seconds:.1f}s", flush=True)
    ratio = rows[1][2] / rows[0][2]
    print("\n| corpus | files | peak RSS MiB | process s |\n| ---: | ---: | ---: | ---: |")
    for megabytes, files, rss, seconds in rows:
        print(f"| {megabytes:g} MB | {files:,} | {rss:,.0f} | {seconds:.1f} |")
    print(f"\n{rows[1][0] / rows[0][0]:g}x the text: peak RSS x{ratio:.2f} (limit x{args.max_ratio:g})")
    return 0 if ratio < args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
