"""Helpers shared by the tests: asset paths, tiny model builders, small file writers.

Fixtures live in conftest.py; plain functions and constants live here, so test modules import
them by name (`from helpers import QA8`) instead of importing conftest.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

ASSETS = Path(__file__).parent / "assets"
QA8 = ASSETS / "qa8.jsonl"


def corpus() -> list[str]:
    """Text to train the test tokenizers on: the Q&A assets plus some stdlib docstrings."""
    import collections
    import json as json_module
    import pathlib

    texts = [line for line in QA8.read_text(encoding="utf-8").splitlines()]
    for module in (collections, json_module, pathlib, inspect, os):
        texts.append(inspect.getdoc(module) or "")
        texts.extend(inspect.getdoc(getattr(module, n)) or "" for n in sorted(dir(module)) if not n.startswith("_"))
    texts.append("### Question:\n### Answer:\n<|im_start|>user assistant system\n")
    return texts


def save_llama(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with the tokenizer's own pad token, saved as a plain HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def short_context_gpt2(tokenizer_dir, positions: int = 32):
    """An untrained 1-layer GPT-2 with a 32-token context: learned positions, so past it is an IndexError."""
    from specialize.generate import Generator

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return Generator(AutoModelForCausalLM.from_config(config), tokenizer)



@contextmanager
def serving(app, cfg=None) -> Iterator[str]:
    """A real uvicorn server for `app` in a background thread, on a free port of 127.0.0.1; yields its URL.

    With `cfg` (a ServeConfig) it runs under `specialize serve`'s own uvicorn settings (deadlines).
    """
    import socket
    import threading
    import time

    import uvicorn

    if cfg is not None:
        from specialize.serve.app import server_config

        config = server_config(app, cfg, log_config=None)
    else:
        config = uvicorn.Config(app, log_config=None, access_log=False)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

class NetworkBlocked(ConnectionRefusedError):
    """What a test gets when it tries to reach anything but this machine."""


class NetworkGuard:
    """Refuses (and records) every connection to a non-loopback address and every DNS lookup of a name.

    Installed for the whole session by conftest: a library that swallows the refusal (the Hub
    client falls back to its cache) still fails the test, because conftest checks `attempts`
    after each one. Loopback servers (serve tests on 127.0.0.1) and Unix sockets keep working.
    """

    LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}

    def __init__(self):
        self.attempts: list[str] = []

    @staticmethod
    def _address(host):
        """The IP address `host` spells, or None for a name (which only a DNS server could resolve)."""
        import ipaddress

        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        try:
            address = ipaddress.ip_address(str(host).split("%")[0])
        except ValueError:
            return None
        return getattr(address, "ipv4_mapped", None) or address

    @classmethod
    def is_local_name(cls, host) -> bool:
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        return host is None or (isinstance(host, str) and host.lower() in cls.LOCAL_NAMES)

    @classmethod
    def is_loopback(cls, host) -> bool:
        if cls.is_local_name(host):
            return True
        address = cls._address(host)
        return address is not None and (address.is_loopback or address.is_unspecified)

    def _refuse(self, what: str):
        self.attempts.append(what)
        raise NetworkBlocked(f"network access in a test: {what} (the suite runs offline; only 127.0.0.1 is allowed)")

    def _check_address(self, sock, address) -> None:
        import socket

        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not self.is_loopback(address[0]):
                self._refuse(f"connect to {address[0]}:{address[1]}")

    def install(self) -> None:
        import socket

        guard = self
        real = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex", "sendto")}
        real_lookup = {name: getattr(socket, name) for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex")}

        def connect(sock, address):
            guard._check_address(sock, address)
            return real["connect"](sock, address)

        def connect_ex(sock, address):
            guard._check_address(sock, address)
            return real["connect_ex"](sock, address)

        def sendto(sock, data, *args):
            guard._check_address(sock, args[-1])  # sendto(data, address) or sendto(data, flags, address)
            return real["sendto"](sock, data, *args)

        def lookup(name):
            def checked(host, *args, **kwargs):
                if not guard.is_local_name(host) and guard._address(host) is None:  # addresses: checked at connect
                    guard._refuse(f"DNS lookup of {host!r}")
                return real_lookup[name](host, *args, **kwargs)
            return checked

        for name, function in (("connect", connect), ("connect_ex", connect_ex), ("sendto", sendto)):
            setattr(socket.socket, name, function)
        for name in real_lookup:
            setattr(socket, name, lookup(name))

    def take_attempts(self) -> list[str]:
        attempts, self.attempts = self.attempts, []
        return attempts


NETWORK_GUARD = NetworkGuard()


def run_lint(capsys, **fields) -> tuple[int, str]:
    """`specialize lint` with these LintConfig fields: (exit code, what it printed)."""
    from specialize.config import LintConfig
    from specialize.data.lint import lint

    code = lint(LintConfig(**fields))
    return code, capsys.readouterr().out
