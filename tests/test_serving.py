"""Tests for recgen.serving: the vLLM server's command line, adapters, and its lifecycle.

The unmarked tests run a stand-in ``vllm`` package (a tiny HTTP server that also starts a child
process), so start-up, health checks, failures and stopping are exercised without vLLM.
The ``server`` tests start ONE real vLLM server (the embedded model on CPU, with a random LoRA
adapter) for the whole module: ``make test-server``. The last of them kills it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from recgen import serving
from recgen._openai import ANSWER_LINE
from recgen.errors import ConfigError, ServerError
from recgen.serving import ServeConfig, VLLMServer

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- a stand-in vLLM

_FAKE_API_SERVER = """
import argparse, json, os, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--host"); parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
print("fake vllm starting", mode, " ".join(sys.argv[1:]), flush=True)
if mode == "crash":
    print("ValueError: no such model", flush=True)
    sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["FAKE_VLLM_PIDS"], "w") as f:
    json.dump([os.getpid(), child.pid], f)
if mode == "hang":
    time.sleep(600)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

HTTPServer((args.host, args.port), Handler).serve_forever()
"""


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A venv-shaped folder whose python runs the stand-in ``vllm`` package, and a model."""
    package = tmp_path / "site" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package.parents[1], package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(_FAKE_API_SERVER)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".installed").touch()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(tmp_path / "pids.json"))
    return {"venv": venv, "model": model, "pids": tmp_path / "pids.json"}


def _config(fake: dict[str, Path], **values: Any) -> ServeConfig:
    log = str(fake["model"].parent / "vllm.log")
    return ServeConfig(
        model=str(fake["model"]), venv=str(fake["venv"]), port=0, log_file=log, **values
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    status = Path(f"/proc/{pid}/status")
    return not status.is_file() or "zombie" not in status.read_text()


def _wait_gone(pids: list[int], seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def test_server_starts_answers_and_stops_with_its_children(fake_vllm: dict[str, Path]) -> None:
    with VLLMServer(_config(fake_vllm, startup_timeout=30)) as server:
        assert server.poll() is None
        assert httpx.get(server.base_url.removesuffix("/v1") + "/health").status_code == 200
        pids = json.loads(fake_vllm["pids"].read_text())
        assert all(_alive(p) for p in pids)
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert "fake vllm starting ok" in server.log_tail()
    assert server.pid is None
    assert _wait_gone(pids), "the server or its child survived stop()"


def test_a_crash_during_start_up_names_the_log_tail(
    fake_vllm: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*no such model"):
        VLLMServer(_config(fake_vllm, startup_timeout=30)).start()


def test_no_health_in_time_stops_the_server(
    fake_vllm: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    server = VLLMServer(_config(fake_vllm, startup_timeout=3))
    with pytest.raises(ServerError, match=r"not healthy(.|\n)*within 3 s(.|\n)*fake vllm"):
        server.start()
    assert server.pid is None
    assert _wait_gone(json.loads(fake_vllm["pids"].read_text()))


def test_a_taken_port_is_refused(fake_vllm: dict[str, Path]) -> None:
    with VLLMServer(_config(fake_vllm, startup_timeout=30)) as first:
        second = VLLMServer(
            _config(fake_vllm, startup_timeout=30).model_copy(update={"port": first.port})
        )
        with pytest.raises(ServerError, match="already answers"):
            second.start()


def test_recgen_serve_runs_until_sigterm_and_leaves_nothing(fake_vllm: dict[str, Path]) -> None:
    recgen = Path(sys.executable).with_name("recgen")
    cmd = [str(recgen), "serve", "--model", str(fake_vllm["model"]), "--port", "0"]
    cmd += ["--venv", str(fake_vllm["venv"]), "--no-install"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if "curl" in line:
            break
    text = "".join(lines)
    assert "recgen eval --backend openai --base-url http://127.0.0.1:" in text, text
    pids = json.loads(fake_vllm["pids"].read_text())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert _wait_gone(pids)


# --------------------------------------------------------------------------- configuration


def _adapter(folder: Path, peft_type: str = "LORA", r: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": peft_type, "r": r, "base_model_name_or_path": "x"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_command_line_has_the_model_adapters_and_explicit_settings(tmp_path: Path) -> None:
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text("{}")
    a, b = _adapter(tmp_path / "a", r=8), _adapter(tmp_path / "b", r=12)
    config = ServeConfig(model=str(model), adapters={"ml-a": str(a), "ml-b": str(b)}, port=8123)
    server = VLLMServer(config, python="/venv/bin/python")
    cmd = server.command(serving._model_path(config.model))
    text = " ".join(cmd)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert f"--model {model.resolve()} --served-model-name {model}" in text
    assert "--host 127.0.0.1 --port 8123" in text
    assert "--enable-lora --max-lora-rank 16 --max-loras 2" in text
    assert f"--lora-modules ml-a={a.resolve()} ml-b={b.resolve()}" in text
    assert "--enforce-eager" in cmd
    assert "--generation-config vllm" in text
    assert server.served_models == [str(model), "ml-a", "ml-b"]
    env = server.environment()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"].startswith("0-")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_embedded_is_served_under_its_config_name() -> None:
    server = VLLMServer(ServeConfig(port=8000), python="python")
    assert server.served_models == ["embedded"]
    assert server.base_url == "http://127.0.0.1:8000/v1"


def test_usage_names_the_served_adapter_and_its_folder(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "a", r=8)
    server = VLLMServer(ServeConfig(adapters={"ml-a": str(adapter)}, port=8000), python="python")
    text = serving.usage(server)
    assert f"--set generation.model=ml-a --set generation.adapter={adapter}" in text
    assert "generation.adapter" not in serving.usage(VLLMServer(ServeConfig(port=8000)))


def test_prefix_tuning_adapters_are_refused_with_the_alternative(tmp_path: Path) -> None:
    prefix = _adapter(tmp_path / "prefix", peft_type="PREFIX_TUNING")
    with pytest.raises(ConfigError, match=r"PREFIX_TUNING adapter: vLLM serves only LoRA"):
        VLLMServer(ServeConfig(adapters={"p": str(prefix)}))
    with pytest.raises(ConfigError, match=r"no adapter_config\.json"):
        serving.lora_rank(tmp_path)
    assert serving.lora_rank(_adapter(tmp_path / "lora", r=4)) == 4


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra"):
        ServeConfig(modle="x")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="adapter name"):
        ServeConfig(adapters={"a=b": "x"})
    with pytest.raises(ConfigError, match=r"without config\.json"):
        serving._model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="not a model folder"):
        serving._model_path(str(tmp_path / "missing"))
    assert serving._model_path("HuggingFaceTB/SmolLM2-135M-Instruct").startswith("Hugging")


def test_a_missing_vllm_environment_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"make vllm"):
        serving.vllm_python(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"make vllm"):
        VLLMServer(ServeConfig(venv=str(tmp_path / "nope"))).command("m")


def test_ensure_vllm_env_runs_the_make_vllm_steps_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[list[str]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        steps.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").touch()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(serving.subprocess, "run", run)
    venv = tmp_path / "v"
    assert serving.ensure_vllm_env(venv) == venv / "bin" / "python"
    install, uninstall = steps[1], steps[2]
    assert install[-1] == serving.VLLM_PACKAGE
    assert "-c" in install  # torch pinned to the CPU build
    assert uninstall[-3:] == ["torchvision", "torchaudio", "torchcodec"]
    serving.ensure_vllm_env(venv)
    assert len(steps) == 3  # the marker says it is done

    def fail(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(serving.subprocess, "run", fail)
    with pytest.raises(ConfigError, match=r"(?s)failed at `.*venv.*No matching distribution"):
        serving.ensure_vllm_env(tmp_path / "w")


# --------------------------------------------------------------------------- a real vLLM server


SERVED_ADAPTER = "rand-lora"
HISTORIES = [
    ["Heat (1995)", "Fargo (1996)", "Alien (1979)"],
    ["Toy Story (1995)", "Lion King, The (1994)"],
]
SERVER_OVERRIDES = [
    "collab.method=none",  # the top item comes from the LLM and grounding alone
    "generation.dtype=float32",  # the server runs float32 too: same numbers, same greedy path
    "generation.max_new_tokens=48",
    "generation.temperature=0",
]


def _random_lora(dest: Path) -> Path:
    """A LoRA adapter (r=8 on q,v) with small random, non-zero B weights: it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recgen.generation import embedded_model_dir

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    seeded = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=seeded) * 0.02)
    peft_model.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _random_lora(tmp_path_factory.mktemp("adapter") / SERVED_ADAPTER)


@pytest.fixture(scope="module")
def vllm_server(lora_adapter: Path) -> Iterator[VLLMServer]:
    """One real vLLM server for the module: the embedded model (float32) and the random LoRA."""
    python = os.environ.get("RECGEN_VLLM_PYTHON") or serving.vllm_python(REPO / ".venv-vllm")
    config = ServeConfig(port=0, dtype="float32", adapters={SERVED_ADAPTER: str(lora_adapter)})
    with VLLMServer(config, python=python) as server:
        yield server


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    """The 50-item test catalog, its MiniLM index and the config shared by both backends."""
    from recgen.config import load_config
    from recgen.data import load_catalog
    from recgen.grounding import CatalogIndex, make_encoder

    config = load_config(overrides=SERVER_OVERRIDES)
    catalog = load_catalog(REPO / "tests" / "data" / "catalog.jsonl")
    encoder = make_encoder(config.grounding)
    index = CatalogIndex.build(catalog, encoder, config.grounding, show_progress=False)
    return {"config": config, "catalog": catalog, "index": index}


def _traces(tiny: dict[str, Any], generator: Any) -> list[Any]:
    from recgen.pipeline import Recommender

    rec = Recommender(
        tiny["config"], catalog=tiny["catalog"], generator=generator, index=tiny["index"]
    )
    return rec.trace_batch(HISTORIES, n=5)


def _served(tiny: dict[str, Any], server: VLLMServer, **update: Any) -> Any:
    from recgen.generation import OpenAIGenerator

    config = tiny["config"].generation.model_copy(
        update={"backend": "openai", "base_url": server.base_url, **update}
    )
    return OpenAIGenerator(config)


def _local(tiny: dict[str, Any], **update: Any) -> Any:
    from recgen.generation import TransformersGenerator

    return TransformersGenerator(tiny["config"].generation.model_copy(update=update))


@pytest.mark.server
def test_pipeline_through_vllm_matches_transformers(
    vllm_server: VLLMServer, tiny: dict[str, Any]
) -> None:
    served = _traces(tiny, _served(tiny, vllm_server))
    local = _traces(tiny, _local(tiny))
    for s, t in zip(served, local, strict=True):
        assert s.generation.texts == t.generation.texts
        assert s.recommendations[0].item_id == t.recommendations[0].item_id
        assert [r.item_id for r in s.recommendations] == [r.item_id for r in t.recommendations]


@pytest.mark.server
def test_the_lora_adapter_is_selected_per_request(
    vllm_server: VLLMServer, tiny: dict[str, Any], lora_adapter: Path
) -> None:
    models = httpx.get(f"{vllm_server.base_url}/models").json()["data"]
    assert {m["id"] for m in models} == {"embedded", SERVED_ADAPTER}
    base = [t.generation.texts for t in _traces(tiny, _served(tiny, vllm_server))]
    tuned = [
        t.generation.texts for t in _traces(tiny, _served(tiny, vllm_server, model=SERVED_ADAPTER))
    ]
    assert tuned != base  # the adapter changes the output ...
    local = [t.generation.texts for t in _traces(tiny, _local(tiny, adapter=str(lora_adapter)))]
    assert tuned == local  # ... exactly as peft does in-process


@pytest.mark.server
def test_structured_answer_replies_always_parse(
    vllm_server: VLLMServer, tiny: dict[str, Any]
) -> None:
    from recgen.parsing import parse_generation

    traces = _traces(tiny, _served(tiny, vllm_server, structured="answer", max_new_tokens=120))
    for trace in traces:
        lines = trace.generation.texts[0].splitlines()
        # every line is in the answer format; only the last may be cut off by max_new_tokens
        assert all(re.fullmatch(ANSWER_LINE, line) for line in lines[:-1]), lines
        assert re.fullmatch(ANSWER_LINE, lines[0]), lines
        parsed = parse_generation(trace.generation)
        assert parsed.candidates
        assert len(parsed.candidates) + len(parsed.failures) == len(lines)


@pytest.mark.server
def test_candidate_mode_ranks_the_given_candidates_with_the_prefix_cache(
    vllm_server: VLLMServer, tiny: dict[str, Any]
) -> None:
    from recgen.prompting import clean_text

    catalog, config = tiny["catalog"], tiny["config"]
    prompts = _rerank_prompts(tiny)
    titles = [clean_text(it.title, config.prompt.max_title_chars) for it in catalog.items[10:22]]
    hits_before = _prefix_cache_hits(vllm_server)
    out = _served(tiny, vllm_server).rank_candidates(prompts, [titles, titles], k=4)
    for generation in out:
        lines = generation.texts[0].splitlines()
        picked = [line.split(". ", 1)[1] for line in lines]
        assert [line.split(". ", 1)[0] for line in lines] == ["1", "2", "3", "4"]
        assert len(set(picked)) == 4
        assert set(picked) <= set(titles)
    assert _prefix_cache_hits(vllm_server) > hits_before


@pytest.mark.server
def test_candidate_scores_through_vllm_match_the_in_process_verbalizer(
    vllm_server: VLLMServer, tiny: dict[str, Any]
) -> None:
    prompts = _rerank_prompts(tiny)
    served = _served(tiny, vllm_server).score_candidates(prompts)
    local = _local(tiny).score_candidates(prompts)
    for s, t in zip(served, local, strict=True):
        assert len(s) == len(t) == 12
        best = sorted(range(12), key=lambda k: -t[k])[:3]
        assert sorted(range(12), key=lambda k: -s[k])[:3] == best
        assert s[best[0]] == pytest.approx(t[best[0]], abs=0.05)


def _rerank_prompts(tiny: dict[str, Any]) -> list[Any]:
    from recgen.interests import build_interest_state
    from recgen.prompting import PromptRenderer
    from recgen.types import History

    catalog, config = tiny["catalog"], tiny["config"]
    renderer = PromptRenderer(config.prompt.model_copy(update={"template": "rerank"}))
    return [
        renderer.render(
            build_interest_state(History.create(ids), catalog, config.interests),
            candidates=list(catalog.items[10:22]),
        )
        for ids in (["1", "2", "3"], ["4", "5"])
    ]


def _prefix_cache_hits(server: VLLMServer) -> float:
    text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics").text
    found = re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", text, re.MULTILINE)
    return sum(float(v) for v in found)


@pytest.mark.server
def test_unknown_models_and_long_prompts_are_named(
    vllm_server: VLLMServer, tiny: dict[str, Any]
) -> None:
    from recgen.types import Message, Prompt

    prompt = Prompt(
        messages=(Message(role="user", content="word " * 3000),),
        template="test",
        template_hash="0",
        user_id="long",
    )
    with pytest.raises(ServerError, match=r"user 'long' is too long.*max-model-len"):
        _served(tiny, vllm_server).generate([prompt])
    with pytest.raises(ServerError, match=r"'nope' is not served.*served: embedded, rand-lora"):
        _served(tiny, vllm_server, model="nope").generate([prompt])


@pytest.mark.server
def test_a_killed_server_gives_the_documented_error_quickly(
    vllm_server: VLLMServer, tiny: dict[str, Any]
) -> None:
    """Runs last: it kills the module's server."""
    generator = _served(tiny, vllm_server, max_retries=2)
    assert vllm_server.pid is not None
    os.killpg(vllm_server.pid, signal.SIGKILL)
    start = time.perf_counter()
    with pytest.raises(ServerError, match=r"no server at http://127\.0\.0\.1:\d+/v1.*recgen serve"):
        _traces(tiny, generator)
    assert time.perf_counter() - start < 15
