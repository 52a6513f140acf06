"""`sami-mlx export` (fused weights and a model card) and `sami-mlx serve` (mlx-lm's OpenAI server)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from sami_mlx.cli.main import main
from sami_mlx.cli.serve import make_server, server_args, stop_server
from sami_mlx.export import GGUF_NAME
from sami_mlx.loop.kept import describe_kept

TEXT = "Human: How do I bake bread? Assistant:"


@pytest.fixture(scope="module")
def tiny_run(trained_run) -> Path:
    return trained_run(iterations=2) / "run"


def logits(model_dir, adapter_path=None) -> np.ndarray:
    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    return np.array(model(mx.array([tokenizer.encode(TEXT)])))


def run_copy(tiny_run: Path, dest: Path, **config) -> Path:
    """A copy of the run's files, with `config` changed in its config.yaml."""
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    data = yaml.safe_load((dest / "config.yaml").read_text())
    (dest / "config.yaml").write_text(yaml.safe_dump({**data, **config}))
    return dest


def one_error_line(capsys) -> str:
    """The one `error:` line, last on stderr after any progress lines, with no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("Traceback" in e or "error" in e for e in err[:-1]), err
    return err[-1]


def test_export_gives_the_logits_of_base_plus_kept_adapters_and_a_model_card(tiny_model, tiny_run, tmp_path):
    out = tmp_path / "fused"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    assert not (out / "adapters.safetensors").exists() and (out / "model.safetensors").is_file()
    fused, expected, base = logits(out), logits(tiny_model, tiny_run), logits(tiny_model)
    assert np.abs(expected - base).max() > 1e-3  # the adapters change the model, so the check below can fail
    assert np.abs(fused - expected).max() < 1e-4

    state = json.loads((tiny_run / "state.json").read_text())
    kept = state["kept"]["name"]
    summary = next(s for s in state["iterations"] if f"iter-{s['iteration']:02d}" == kept)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card
    assert "## Constitution: test" in card
    assert "| 1 | brief | Be brief. | Be long. |" in card and "| 2 | kind | Be kind. | Be rude. |" in card
    assert f"Adapters: {kept} ({describe_kept(state['kept'])})" in card
    assert f"Final MI bound: {summary['mi_bound']:+.3f} nats" in card
    assert f"held-out MI bound: {summary['heldout_mi']:+.3f} nats" in card
    for it in state["iterations"]:  # every iteration's row, with its loss
        assert f"| {it['iteration']} | {it['loss']:+.3f} | {it['mi_bound']:+.3f} |" in card
    assert (tiny_run / "config.yaml").read_text().strip() in card


def test_export_another_iteration_and_replace_with_force(tiny_model, tiny_run, tmp_path, capsys):
    kept = json.loads((tiny_run / "state.json").read_text())["kept"]["name"]
    other = "iter-02" if kept == "iter-01" else "iter-01"
    flags = ["export", str(tiny_run), "--out", str(tmp_path / "fused"), "--iteration", other[-1]]
    out = tmp_path / "fused"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(flags) == 2
    assert "exists and is not empty" in one_error_line(capsys) and (out / "stale.txt").exists()

    assert main([*flags, "--force"]) == 0
    assert not (out / "stale.txt").exists()
    fused, expected = logits(out), logits(tiny_model, tiny_run / other)
    assert np.abs(fused - expected).max() < 1e-4
    assert np.abs(fused - logits(tiny_model, tiny_run)).max() > 1e-3  # not the kept adapters
    assert f"Adapters: {other} (chosen with --iteration)" in (out / "README.md").read_text()


def test_export_dequantizes_a_quantized_base(tiny_model, tiny_run, tmp_path):
    quantized = tmp_path / "q8"
    mlx_lm.convert(str(tiny_model), str(quantized), quantize=True, q_group_size=32, q_bits=8, dtype="float32")
    run = run_copy(tiny_run, tmp_path / "run", model=str(quantized))
    out = tmp_path / "fused"
    assert main(["export", str(run), "--out", str(out), "--dequantize"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert not any(k.endswith(".scales") for k in mx.load(str(out / "model.safetensors")))
    assert np.abs(logits(out) - logits(quantized, run)).max() < 1e-4


def test_export_gguf_writes_the_file_or_says_why_not(tiny_model, tiny_qwen2, tiny_run, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(tiny_run), "--out", str(out), "--gguf"]) == 0
    capsys.readouterr()
    gguf = mx.load(str(out / GGUF_NAME))  # the fused weights, not the base model's
    key = "model.layers.1.self_attn.v_proj.weight"
    fused, base = mx.load(str(out / "model.safetensors"))[key], mx.load(str(tiny_model / "model.safetensors"))[key]
    assert mx.abs(gguf["blk.1.attn_v.weight"] - fused).max().item() < 1e-6
    assert mx.abs(fused - base).max().item() > 1e-4

    qwen_run = run_copy(tiny_run, tmp_path / "qwen-run", model=str(tiny_qwen2))
    assert main(["export", str(qwen_run), "--out", str(tmp_path / "q"), "--gguf"]) == 2
    assert "--gguf: mlx-lm writes GGUF only for llama, mixtral, mistral models, not qwen2" in one_error_line(capsys)
    assert not (tmp_path / "q").exists()


def test_export_and_serve_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    cases = [
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such run directory"),
        (["export", str(tiny_run), "--out", str(tiny_run.parent), "--force"], "--force will not replace it"),
        (["export", str(tiny_run), "--out", str(tmp_path / "o"), "--iteration", "7"], "no such checkpoint"),
        (["export", str(tiny_run), "--out", str(tmp_path / "o"), "--iteration", "base"], "nothing to ship"),
        (["export", str(tiny_run), "--out", str(tmp_path / "o"), "--constitution", "x.yaml"], "file not found"),
        (["serve", str(tmp_path / "nope")], "no such run directory"),
        (["serve", str(tiny_run), "--port", "70000"], "--port 70000"),
        (["serve", str(tiny_run), "--temperature", "-1"], "--temperature -1"),
    ]
    empty = tmp_path / "empty-run"
    empty.mkdir()
    shutil.copy(tiny_run / "config.yaml", empty)
    cases.append((["export", str(empty), "--out", str(tmp_path / "o")], "no adapters.safetensors yet"))
    (tmp_path / "not-a-run").mkdir()
    cases.append((["export", str(tmp_path / "not-a-run"), "--out", str(tmp_path / "o")], "no config.yaml there"))
    lost = run_copy(tiny_run, tmp_path / "lost", constitution=str(tmp_path / "gone.yaml"))
    cases.append((["export", str(lost), "--out", str(tmp_path / "o")], "pass --constitution FILE"))
    cases.append((["serve", str(lost), "--system-prompt", "constitution"], "pass --constitution FILE"))
    broken = run_copy(tiny_run, tmp_path / "broken")
    (broken / "adapters.safetensors").write_bytes(b"not tensors")
    cases.append((["export", str(broken), "--out", str(tmp_path / "o")], "mlx-lm could not load the adapters"))
    cases.append((["serve", str(broken), "--port", "0"], "mlx-lm could not load"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases.append((["serve", str(tiny_run), "--port", str(taken.getsockname()[1])], "cannot listen"))
    try:
        for argv, expected in cases:
            assert main(argv) == 2, argv
            assert expected in one_error_line(capsys), argv
    finally:
        taken.close()
    assert not (tmp_path / "o").exists()


def chat(port: int, messages: list[dict]) -> dict:
    body = json.dumps({"messages": messages, "max_tokens": 4}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


def prompt_length(model_dir: Path, messages: list[dict]) -> int:
    _, tokenizer = mlx_lm.load(str(model_dir))
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_server_answers_a_chat_request_with_the_run_adapters(tiny_model, tiny_run):
    httpd, generator = make_server(server_args(str(tiny_model), str(tiny_run), port=0))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        user = [{"role": "user", "content": "Hello there!"}]
        reply = chat(httpd.server_address[1], user)
        # The model answering is the run's: mlx-lm's loader put the run's adapters on it.
        served = dict(tree_flatten(generator.model_provider.model.parameters()))
        adapters = mx.load(str(tiny_run / "adapters.safetensors"))
        assert adapters and all(np.array_equal(np.array(served[k]), np.array(v)) for k, v in adapters.items())
    finally:
        httpd.shutdown()
        stop_server(httpd, generator)
    thread.join(timeout=10)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["usage"]["prompt_tokens"] == prompt_length(tiny_model, user)  # no system prompt added


def test_serve_command_puts_the_constitution_in_a_system_message(tiny_model, tiny_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "sami_mlx", "serve", str(tiny_run), "--port", "0", "--system-prompt", "constitution"]
    # Ctrl-C's default action: a test suite started in the background inherits SIGINT ignored.
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        port = None
        for line in proc.stderr:
            found = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the server did not start"
        # Keep reading its log (a request line each), so that a full pipe can never block the server.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        user = [{"role": "user", "content": "Hello there!"}]
        injected = chat(port, user)
        own = [{"role": "system", "content": "Be terse."}, *user]
        kept = chat(port, own)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    system = {"role": "system", "content": "1. Be brief.\n2. Be kind."}
    assert injected["choices"][0]["message"]["role"] == "assistant"
    assert injected["usage"]["prompt_tokens"] == prompt_length(tiny_model, [system, *user])
    assert kept["usage"]["prompt_tokens"] == prompt_length(tiny_model, own)  # the client's own system message wins
