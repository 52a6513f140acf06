"""The HTTP judge against a real OpenAI-compatible server on loopback, started by each test."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sami_mlx.errors import SamiError
from sami_mlx.evaluation.judge import Judge
from sami_mlx.evaluation.judge_backends import HTTPJudge, chat_completions_url, make_judge
from sami_mlx.evaluation.verdicts import parse_verdict

KEY = "sk-test-7d1e0c9a-never-write-me"
Reply = tuple[int, dict, bytes]


def completion(content: str | None) -> Reply:
    body = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    return 200, {}, json.dumps(body).encode()


class Endpoint:
    """A chat-completions server whose answer to request number n (from 0) is `behaviour(body, n)`."""

    def __init__(self, behaviour: Callable[[dict, int], Reply]):
        self.behaviour = behaviour
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    n = len(endpoint.requests)
                    endpoint.requests.append((dict(self.headers.items()), body))
                    endpoint.inflight += 1
                    endpoint.max_inflight = max(endpoint.max_inflight, endpoint.inflight)
                try:
                    status, headers, payload = endpoint.behaviour(body, n)
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with endpoint.lock:
                        endpoint.inflight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    closed = False

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.closed = True


@pytest.fixture
def serve():
    started = []

    def start(behaviour):
        e = Endpoint(behaviour)
        started.append(e)
        return e

    yield start
    for e in started:
        if not e.closed:
            e.close()


def judge_for(endpoint: Endpoint, **kw) -> HTTPJudge:
    options = {"concurrency": 4, "timeout": 5.0, "retries": 3, "backoff": 0.01, "max_tokens": 32}
    return HTTPJudge(endpoint.url, "judge-model", **{**options, **kw})


def prefers_marked(body: dict, n: int) -> Reply:
    """Pick the response that contains GOOD, after some reasoning, with the letter on the last line."""
    prompt = body["messages"][0]["content"]
    a = prompt.split("Response A:")[1].split("Response B:")[0]
    return completion(f"Thinking about it, one is better.\n{'A' if 'GOOD' in a else 'B'}")


def test_concurrent_requests_carry_the_key_and_parse(serve, monkeypatch):
    monkeypatch.setenv("SAMI_TEST_JUDGE_KEY", KEY)

    def slow(body, n):
        time.sleep(0.05)
        return prefers_marked(body, n)

    e = serve(slow)
    judge = judge_for(e, api_key_env="SAMI_TEST_JUDGE_KEY")
    prompts = [f"Response A: {'GOOD' if i % 3 else 'bad'}\nResponse B: {'bad' if i % 3 else 'GOOD'}" for i in range(12)]
    seen = []
    replies = judge(prompts, on_progress=lambda d, n: seen.append((d, n)))
    assert [parse_verdict(r.text) for r in replies] == ["B" if i % 3 == 0 else "A" for i in range(12)]
    assert all(r.error is None for r in replies)
    assert e.max_inflight >= 2  # requests overlapped
    assert len(e.requests) == 12 and seen[-1] == (12, 12)
    headers, body = e.requests[0]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "judge-model" and body["max_tokens"] == 32 and body["temperature"] == 0.0
    assert KEY not in json.dumps(judge.describe())


def test_malformed_answers_and_bodies(serve):
    broken = []

    def behaviour(body, n):
        prompt = body["messages"][0]["content"]
        if prompt == "undecided":
            return completion("Both responses are fine, I cannot decide.")
        if prompt == "broken-body":
            broken.append(n)
            return (200, {}, b"<html>oops</html>") if len(broken) == 1 else completion("Final verdict: **B**")
        if prompt == "null":
            return completion(None)
        return completion("A")

    e = serve(behaviour)
    replies = judge_for(e, concurrency=1)(["ok", "undecided", "broken-body", "null"])
    assert [r.error for r in replies] == [None] * 4
    assert [parse_verdict(r.text) for r in replies] == ["A", None, "B", None]
    assert len(broken) == 2  # the malformed body was asked again
    assert len(e.requests) == 5


def test_timeout_is_retried(serve):
    def behaviour(body, n):
        if n == 0:
            time.sleep(1.0)
        return completion("B")

    e = serve(behaviour)
    judge = judge_for(e, timeout=0.3, retries=2)
    t0 = time.perf_counter()
    reply = judge(["p"])[0]
    assert reply.text == "B" and reply.error is None
    assert len(e.requests) == 2 and time.perf_counter() - t0 < 3


def test_429_and_500_are_retried_with_backoff(serve):
    sequence = [
        (429, {"Retry-After": "0"}, b'{"error": {"message": "slow down"}}'),
        (500, {}, b"boom"),
        (503, {}, b""),
        completion("A"),
    ]
    e = serve(lambda body, n: sequence[min(n, 3)])
    reply = judge_for(e)(["p"])[0]
    assert reply.text == "A" and [r[1]["model"] for r in e.requests] == ["judge-model"] * 4


def test_persistent_errors_fail_clearly_or_are_counted(serve):
    e = serve(lambda body, n: (500, {}, b"boom"))
    with pytest.raises(SamiError, match=r"HTTP 500 after 3 attempt\(s\)"):
        judge_for(e, retries=2)(["p"])
    assert len(e.requests) == 3

    # Once the endpoint has answered, a request that keeps failing is an error for that comparison only.
    e2 = serve(lambda body, n: completion("A") if body["messages"][0]["content"] == "ok" else (502, {}, b""))
    judge = judge_for(e2, retries=1, concurrency=1)
    replies = judge(["ok", "bad"])
    assert replies[0].text == "A" and replies[1].error == "HTTP 502"


def test_unauthorised_is_fatal_at_once_and_names_the_variable(serve, monkeypatch):
    monkeypatch.setenv("SAMI_TEST_JUDGE_KEY", KEY)
    e = serve(lambda body, n: (401, {}, json.dumps({"error": {"message": f"bad key {KEY}"}}).encode()))
    with pytest.raises(SamiError) as err:
        judge_for(e, api_key_env="SAMI_TEST_JUDGE_KEY")(["p1", "p2"])
    assert "401" in str(err.value) and "$SAMI_TEST_JUDGE_KEY" in str(err.value)
    assert KEY not in str(err.value)  # an endpoint that echoes the key does not get it into our output
    assert len(e.requests) <= 2


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SAMI_TEST_UNSET_KEY", raising=False)
    with pytest.raises(SamiError, match="SAMI_TEST_UNSET_KEY is not set"):
        HTTPJudge("http://127.0.0.1:9/v1", "m", api_key_env="SAMI_TEST_UNSET_KEY")


def test_nothing_listening_fails_before_any_generation(serve):
    e = serve(lambda body, n: completion("A"))
    judge_for(e).check()  # a live server passes
    url = e.url
    e.close()
    with pytest.raises(SamiError, match="cannot connect"):
        HTTPJudge(url, "m").check()


def test_refused_max_tokens_is_renamed(serve):
    def behaviour(body, n):
        if "max_tokens" in body:
            return (
                400,
                {},
                json.dumps(
                    {"error": {"message": "Unsupported parameter: 'max_tokens'; use 'max_completion_tokens' instead."}}
                ).encode(),
            )
        return completion("B")

    e = serve(behaviour)
    assert judge_for(e)(["p"])[0].text == "B"
    assert e.requests[-1][1]["max_completion_tokens"] == 32


def test_urls_and_judge_choice():
    assert chat_completions_url("http://h:8080/v1") == "http://h:8080/v1/chat/completions"
    assert chat_completions_url("http://h:8080/v1/") == "http://h:8080/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    assert chat_completions_url("http://h:8080") == "http://h:8080/v1/chat/completions"
    with pytest.raises(SamiError, match="http"):
        chat_completions_url("ftp://h/v1")
    with pytest.raises(SamiError, match="--judge-model is required"):
        make_judge(None, "http://h/v1", None)
    assert isinstance(make_judge("http://h/v1", None, "m"), HTTPJudge)
    with pytest.raises(SamiError, match="both given"):
        make_judge("some/model", "http://h/v1", "m")


def test_both_judges_are_judges(tiny_model):
    http, local = make_judge("http://h/v1", None, "m"), make_judge(str(tiny_model), None, None)
    assert isinstance(http, Judge) and isinstance(local, Judge)
    assert (http.describe()["kind"], local.describe()["kind"]) == ("http", "local")
    # A function that only answers prompts is not one: eval checks, describes and closes its judge.
    assert not isinstance(lambda prompts, on_progress=None: [], Judge)


# ---- end to end: `sami-mlx eval` with an HTTP judge -------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(trained_run) -> Path:
    root = trained_run(iterations=1)
    (root / "held.txt").write_text("\n".join(f"Held-out question number {i}?" for i in range(10)) + "\n")
    return root


def test_eval_with_http_judge_never_writes_the_key(tiny_run, serve, eval_cli, monkeypatch, capsys):
    monkeypatch.setenv("SAMI_TEST_JUDGE_KEY", KEY)
    # A judge with a position bias and a few unreadable answers.
    e = serve(lambda body, n: completion("no idea") if n % 5 == 4 else completion("Verdict: A"))
    run = tiny_run / "run"
    code = eval_cli(
        run,
        tiny_run / "held.txt",
        judge_url=e.url,
        judge_model="gpt-judge",
        judge_api_key_env="SAMI_TEST_JUDGE_KEY",
        max_tokens=5,
        seed=7,
        intrinsic=False,
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((run / "eval" / "iter-01.json").read_text())
    assert result["n"] == 10 and result["unparsable"] == 2 and result["judge_errors"] == 0
    items = result["items"]
    expected = sum(0.5 if it["verdict"] is None else float(it["checkpoint_position"] == "A") for it in items)
    assert result["win_rate"] == pytest.approx(expected / 10)
    assert {it["checkpoint_position"] for it in items} == {"A", "B"}  # order randomised
    assert result["judge"] == {
        "kind": "http",
        "url": e.url + "/chat/completions",
        "model": "gpt-judge",
        "api_key_env": "SAMI_TEST_JUDGE_KEY",
        "max_tokens": 1024,
    }  # the default budget
    assert "| iter-01 | 10 |" in out
    # 2 of 10 answers without a verdict is over 10%: one warning line that points at the judge prompt.
    warnings = [line for line in err.splitlines() if line.startswith("warning:") and "verdict" in line]
    assert len(warnings) == 1 and "2 of 10" in warnings[0] and "--judge-template" in warnings[0]
    assert all(h["Authorization"] == f"Bearer {KEY}" for h, _ in e.requests)
    for path in run.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in out + err


def test_eval_with_missing_key_exits_2(tiny_run, eval_cli, monkeypatch, capsys):
    monkeypatch.delenv("SAMI_TEST_UNSET_KEY", raising=False)
    code = eval_cli(
        tiny_run / "run",
        tiny_run / "held.txt",
        judge_url="http://127.0.0.1:9/v1",
        judge_model="m",
        judge_api_key_env="SAMI_TEST_UNSET_KEY",
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "SAMI_TEST_UNSET_KEY" in err


PAPER_ANSWERS = (
    "Comparison: Response {x} answers the question directly; the other one drifts.\n\nFinal Response: {x}",
    "Comparison: Both are short, but {x} keeps to the principles better.\nFinal Response:\n{x}",
    "**Comparison:** The other reply ignores the first principle.\n\n**Final Response:** {x}",
    'Comparison: {x} follows principle 1; the other does not.\nFinal Response: "{x}"',
)


def test_eval_reads_every_verdict_of_a_judge_in_the_papers_format(tiny_run, serve, eval_cli, tmp_path, capsys):
    """The paper's judge prompt (chosen by the run's judge_template setting, as the recipes do) and a
    judge that answers as GPT-4 did in the paper: every verdict is read, none counts as a tie."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    with open(run / "config.yaml", "a") as f:
        f.write("judge_template: dialogue\n")
    said = {}

    def paper_judge(body, n):
        prompt = body["messages"][0]["content"]
        letter = "AB"[(n * 7) % 3 % 2]
        said[prompt.split("Human: ")[1].split("\n")[0]] = letter
        return completion(PAPER_ANSWERS[n % len(PAPER_ANSWERS)].format(x=letter))

    e = serve(paper_judge)
    code = eval_cli(run, tiny_run / "held.txt", judge_url=e.url, judge_model="gpt-judge", max_tokens=5, intrinsic=False)
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((run / "eval" / "iter-01.json").read_text())
    assert result["n"] == 10 and result["unparsable"] == 0 and result["judge_errors"] == 0
    assert result["settings"]["judge_template"] == "dialogue"
    prompts = [body["messages"][0]["content"] for _, body in e.requests]
    assert all("Final Response:" in p and "in at most 100 words" in p for p in prompts)
    assert [it["verdict"] for it in result["items"]] == [said[it["query"]] for it in result["items"]]
    assert set(said.values()) == {"A", "B"}
    # The principles are shuffled per query in the judge prompt, as in the reference's win rates.
    firsts = {p.split("Assistant constitution:\n1. ")[1].split("\n")[0] for p in prompts}
    assert firsts == {"Be brief.", "Be kind."}
    assert "warning:" not in err  # no unparsable-answer warning
