"""`sami-mlx serve`: mlx-lm's OpenAI-compatible server (mlx_lm.server) with a run's adapters, and the
constitution as an optional system prompt."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from sami_mlx.cli.flags import add_sampling_arguments
from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError

SYSTEM_PROMPTS = ("none", "constitution")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags."""
    parser.add_argument("run", metavar="RUN", help="Run directory made by `sami-mlx train`.")
    parser.add_argument(
        "--iteration", help="Serve iteration N's adapters (RUN/iter-NN) instead of the kept ones (RUN/adapters)."
    )
    parser.add_argument(
        "--system-prompt",
        choices=SYSTEM_PROMPTS,
        default="none",
        help="'constitution': put the constitution's principles in a system message when a chat request has "
        "none (default: none, the aligned model as it is).",
    )
    parser.add_argument("--constitution", help="Constitution file for --system-prompt (default: the run's).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on (default: 8080).")
    add_sampling_arguments(
        parser,
        512,
        "Default maximum tokens a reply (default: 512).",
        temperature_help="Default sampling temperature (default: 0).",
        top_p_help="Default nucleus sampling threshold (default: 1).",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own Python code to run.")


def server_args(model: str, adapter_path: str, **overrides) -> argparse.Namespace:
    """The settings mlx_lm.server's ModelProvider and ResponseGenerator read, at mlx_lm.server's defaults."""
    from mlx_lm.server import DEFAULT_QUANTIZED_KV_START

    settings = dict(
        model=model,
        adapter_path=adapter_path,
        host="127.0.0.1",
        port=8080,
        allowed_origins=["*"],
        draft_model=None,
        num_draft_tokens=3,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        temp=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        max_tokens=512,
        chat_template_args={},
        decode_concurrency=32,
        prompt_concurrency=8,
        prefill_step_size=2048,
        prompt_cache_size=10,
        prompt_cache_bytes=None,
        kv_bits=None,
        kv_group_size=64,
        quantized_kv_start=DEFAULT_QUANTIZED_KV_START,
        pipeline=False,
    )
    return argparse.Namespace(**{**settings, **overrides})


def make_server(settings: argparse.Namespace, system_prompt: str | None = None):
    """(HTTP server, mlx-lm response generator), the model loaded, not yet serving; raises SamiError.
    Call `serve_forever()` on the first; `stop_server` once it returns."""
    from mlx_lm.models.cache import LRUPromptCache
    from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator, get_system_fingerprint

    from sami_mlx.export import first_line
    from sami_mlx.model import dequantize_for_cpu

    class Handler(APIHandler):
        """mlx-lm's handler; a chat request without a system message gets `system_prompt` as one."""

        def handle_chat_completions(self):
            messages = self.body.get("messages")
            if system_prompt and isinstance(messages, list) and not any(_is_system(m) for m in messages):
                self.body["messages"] = [{"role": "system", "content": system_prompt}, *messages]
            return super().handle_chat_completions()

    class Provider(ModelProvider):
        """mlx-lm's loader; it runs in the generation thread (the model's arrays must be made there:
        loading on this thread instead aborts the process at exit), and keeps a failure for us."""

        def __init__(self, cli_args):
            super().__init__(cli_args)
            self.loaded, self.error = threading.Event(), None
            self.note = ""  # how the weights were loaded when not as stored (--dequantize)

        def _load(self, *args, **kwargs):
            super()._load(*args, **kwargs)
            assert self.model is not None  # _load sets it or raises
            self.note = dequantize_for_cpu(self.model, getattr(self.cli_args, "dequantize", "auto")).reason

        def load_default(self):
            try:
                super().load_default()
            except Exception as e:
                self.error = e
            finally:
                self.loaded.set()

    fingerprint = get_system_fingerprint()
    generator: Any = None  # made below, once the port is ours
    try:  # the address family from getaddrinfo, as mlx_lm.server does, so that IPv6 hosts work
        family, _, _, _, address = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        httpd = server_class(address, lambda *a, **kw: Handler(generator, *a, system_fingerprint=fingerprint, **kw))
    except OSError as e:
        raise SamiError(f"--host {settings.host} --port {settings.port}: cannot listen ({e.strerror or e})") from None
    provider = Provider(settings)  # its thread starts loading now
    generator = ResponseGenerator(provider, LRUPromptCache(settings.prompt_cache_size))
    provider.loaded.wait()
    if provider.error is not None:  # one line, not a dead generation thread
        generator.stop_and_join()
        httpd.server_close()
        raise SamiError(
            f"{settings.adapter_path}: mlx-lm could not load {settings.model} with these adapters "
            f"({first_line(provider.error)})"
        )
    return httpd, generator


def stop_server(httpd, generator) -> None:
    """Close the socket, stop the generation thread and free the model and caches. Arrays made on
    that thread, if left for the interpreter's exit, can abort it on MLX's CPU backend ('terminate
    called without an active exception'), plain mlx_lm.server included."""
    import gc

    import mlx.core as mx

    httpd.server_close()
    generator.stop_and_join()
    generator.model_provider.reset()
    generator.prompt_cache = None
    gc.collect()
    mx.synchronize()
    mx.clear_cache()


def prompt_note(cfg: TrainConfig) -> str:
    """Which endpoint prompts the served model the way its run trained (the run's resolved config.yaml)."""
    template = cfg.generation_template or cfg.template
    if cfg.chat_template:
        return (
            f"the run trained through the chat template (template {template}): /v1/chat/completions "
            "prompts the model as it trained"
        )
    return (
        f"the run trained on plain-text prompts (template {template}, no chat template): send them to "
        "/v1/completions; /v1/chat/completions applies the tokenizer's chat template, which training did not use"
    )


def _is_system(message) -> bool:
    return isinstance(message, dict) and message.get("role") == "system"


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C."""
    import logging

    from sami_mlx.config import check_sampling
    from sami_mlx.export import find_run_adapters, system_prompt
    from sami_mlx.model import resolve_model_path

    if not 0 <= args.port <= 65535:
        raise SamiError(f"--port {args.port}: must be between 0 and 65535")
    check_sampling(args.temperature, args.top_p, args.max_tokens)
    wants_constitution = args.system_prompt == "constitution"
    adapters = find_run_adapters(args.run, args.iteration, args.constitution, need_constitution=wants_constitution)
    settings = server_args(
        str(resolve_model_path(adapters.model)),
        str(adapters.adapter_path),
        host=args.host,
        port=args.port,
        max_tokens=args.max_tokens,
        temp=args.temperature,
        top_p=args.top_p,
        trust_remote_code=args.trust_remote_code or bool(adapters.config.trust_remote_code),
        dequantize=adapters.config.dequantize,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")
    httpd, generator = make_server(
        settings, system_prompt(adapters.constitution) if wants_constitution and adapters.constitution else None
    )
    host, port = httpd.server_address[:2]
    if generator.model_provider.note:
        print(generator.model_provider.note, file=sys.stderr)
    print(
        f"serving {adapters.model} + {adapters.name} at http://{host}:{port}/v1 (OpenAI API; system prompt: "
        f"{args.system_prompt}); Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    print(prompt_note(adapters.config), file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(httpd, generator)
    return 0
