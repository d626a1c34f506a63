"""`hpclm serve`: a real server process on 127.0.0.1 (a free port), talked to by the official openai client
and by httpx; every load loop is bounded in count and time and targets only the test's own server."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import child_env, hang_guard
from helpers.lm_fixtures import shakespeare_dir, tiny_config  # noqa: F401

httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e .[dev])")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e .[dev])")
pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install -e .[serve])")

PROMPT = "ROMEO:\n"


@pytest.fixture(scope="module")
def served_run(shakespeare_dir, tmp_path_factory):  # noqa: F811
    """A tiny GPT with a 256-token window, trained long enough that greedy text is not one repeated token."""
    from hpclm.train import train
    out = tmp_path_factory.mktemp("served") / "tiny-gpt"
    train(tiny_config(shakespeare_dir, "model.n_layer=2", "model.n_embd=48", "data.block_size=256",
                      "train.batch_size=4", "train.max_iters=120", "train.eval_interval=0", "train.log_interval=1000"),
          out, progress_bar=False)
    return out


class Server:
    """`hpclm serve --port 0 ...` in a child process; the port from the line it prints once listening."""

    def __init__(self, run, *sets: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "hpclm", "serve", "--ckpt", str(run), "--port", "0",
                                      *[a for s in sets for a in ("--set", s)]],
                                     env=child_env({"OMP_NUM_THREADS": "1"}), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self._line(hang_guard(60))
        self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        self.url = f"http://127.0.0.1:{self.port}"

    def _line(self, timeout):
        found = []
        reader = threading.Thread(target=lambda: found.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not found or "http://" not in found[0]:
            self.proc.kill()
            raise AssertionError(f"hpclm serve did not start: {found} {self.proc.stderr.read()}")
        return found[0]

    def client(self, key="test-key"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=hang_guard(60))

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(served_run):
    s = Server(served_run, "serve.max_running=8", "serve.max_queued=8")
    yield s
    s.close()


def _generate(run, **kw) -> str:
    """hpclm generate's text after PROMPT, 60 tokens."""
    from hpclm.generate import generate_text, load_trained
    return generate_text(load_trained(run), PROMPT, 60, **kw)[len(PROMPT):]


@pytest.fixture(scope="module")
def greedy(served_run):
    return _generate(served_run, temperature=0.0)


@pytest.fixture(scope="module")
def sampled(served_run):
    """Seeded sampling: a text that is not one word repeated, as a greedy tiny model's is."""
    return _generate(served_run, temperature=0.9, top_k=0, seed=123)


def _stream(url, body, key="k", on_open=None, stop_after=None):
    """(chunks parsed, saw [DONE]) of a streamed completion; stop_after closes the connection after that many."""
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=hang_guard(60),
                      headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks, True
            chunks.append(json.loads(line[len("data: "):]))
            if on_open and len(chunks) == 1:
                on_open()
            if stop_after and len(chunks) >= stop_after:
                return chunks, False
    return chunks, False


def _text(chunks):
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def test_openai_client_completes_and_streams_what_generate_writes(server, served_run, greedy):
    client = server.client()
    [model] = client.models.list().data
    assert model.id == "tiny-gpt" and model.max_model_len == 256
    done = client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=60, temperature=0)
    assert done.choices[0].text == greedy
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(PROMPT), 60)
    chunks = list(client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=60, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy and len(chunks) > 30
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 60
    # a stop string ends the text before it, with finish_reason stop
    stop = greedy[10:13]
    cut = client.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    # token ids are a prompt too
    from hpclm.data import tokenizers
    tok = tokenizers.from_json((served_run / "checkpoints").glob("*/tokenizer.json").__next__().read_text())
    ids = client.completions.create(model="tiny-gpt", prompt=[int(i) for i in tok.encode(PROMPT)], max_tokens=60,
                                    temperature=0)
    assert ids.choices[0].text == greedy


def test_errors_are_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
        client.completions.create(model="tiny-gpt", prompt="x" * 200, max_tokens=100)
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument: frobnicate"):
        client.completions.create(model="tiny-gpt", prompt="x", extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number"):
        client.completions.create(model="tiny-gpt", prompt="x", extra_body={"temperature": "hot"})
    with pytest.raises(openai.BadRequestError, match="'n' = 2 is not supported"):
        client.completions.create(model="tiny-gpt", prompt="x", n=2)
    post = lambda content, **kw: httpx.post(f"{server.url}/v1/completions", content=content, timeout=30, **kw)  # noqa: E731
    big = post(json.dumps({"prompt": "x" * (2 << 20)}))
    assert big.status_code == 413 and "larger than this server's limit" in big.json()["error"]["message"]
    bad = post(b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert post(json.dumps({"prompt": "x", "max_tokens": "5"})).status_code == 400
    assert post(json.dumps({"prompt": "x", "max_tokens": True})).status_code == 400
    assert post(json.dumps({"prompt": [1, 10**6]})).status_code == 400
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_batching_does_not_change_a_sequence(server, greedy, sampled):
    """Greedy and seeded sampling give hpclm generate's text alone and among 7 other running streams (fp32)."""
    body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0.9, "seed": 123}
    assert _text(_stream(server.url, body)[0]) == sampled and len(set(sampled)) > 12
    started, results, threads = threading.Barrier(8, timeout=hang_guard(60)), {}, []

    def other(i):
        results[i] = _stream(server.url, {"prompt": "ABCDEFG"[i] + PROMPT, "max_tokens": 200, "temperature": 1.0, "seed": i},
                             on_open=started.wait)

    for i in range(7):
        threads.append(threading.Thread(target=other, args=(i,), daemon=True))
        threads[-1].start()
    started.wait()  # all 7 are decoding
    assert server.metric("hpclm_serve_num_requests_running") >= 7
    among = server.client().completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=60, temperature=0)
    among_sampled = _text(_stream(server.url, body)[0])
    for t in threads:
        t.join(hang_guard(60))
    assert among.choices[0].text == greedy
    assert among_sampled == sampled
    assert all(done and len(chunks) > 100 for chunks, done in results.values()) and len(results) == 7


def test_a_client_that_disconnects_frees_its_slot(server):
    before = server.metric('hpclm_serve_requests_finished_total{finish_reason="cancelled"')
    chunks, done = _stream(server.url, {"prompt": PROMPT, "max_tokens": 240, "temperature": 1.0}, stop_after=3)
    assert not done and len(chunks) == 3
    deadline = time.monotonic() + hang_guard(10)
    while server.metric('hpclm_serve_requests_finished_total{finish_reason="cancelled"') == before:
        assert time.monotonic() < deadline, "the disconnected stream was not cancelled"
        time.sleep(0.05)
    assert server.metric("hpclm_serve_num_requests_running") == 0
    assert server.metric("hpclm_serve_generation_tokens_total") > 0


KEYS = [f"key-{i}" for i in range(40)]


def test_overload_gets_429_with_retry_after_and_admitted_requests_complete(served_run, greedy):
    """max_running 2 + max_queued 2 and 16 clients at once; then a rate-limited key beside a served one."""
    s = Server(served_run, "serve.max_running=2", "serve.max_queued=2", f"serve.api_keys={json.dumps(KEYS)}",
               "serve.requests_per_s=0.2", "serve.requests_burst=1")
    try:
        rss_before = s.rss_mib()
        results, go = {}, threading.Barrier(16, timeout=hang_guard(60))

        def client(i):
            go.wait()
            r = httpx.post(f"{s.url}/v1/completions", timeout=hang_guard(60), headers={"Authorization": f"Bearer {KEYS[i]}"},
                           json={"prompt": PROMPT, "max_tokens": 60, "temperature": 0})
            results[i] = r

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(hang_guard(90))
        codes = sorted(r.status_code for r in results.values())
        assert len(results) == 16 and set(codes) <= {200, 429}, codes
        ok = [r for r in results.values() if r.status_code == 200]
        refused = [r for r in results.values() if r.status_code == 429]
        assert 4 <= len(ok) < 16 and refused
        assert all(r.json()["choices"][0]["text"] == greedy for r in ok)
        assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in refused)
        assert s.metric('hpclm_serve_requests_rejected_total{model_name="tiny-gpt",reason="queue_full"') == len(refused)
        assert httpx.get(f"{s.url}/health").status_code == 200 and s.rss_mib() < rss_before + 200
        # per-client limits: KEYS[20] has used its one request of the burst; KEYS[21] is still served
        first = s.client(KEYS[20]).completions.with_raw_response.create(model="tiny-gpt", prompt="a", max_tokens=2)
        assert first.headers["x-ratelimit-limit-requests"] == "1" and first.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as limited:
            s.client(KEYS[20]).completions.create(model="tiny-gpt", prompt="a", max_tokens=2)
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert limited.value.response.headers["x-ratelimit-reset-requests"].endswith("s")
        assert s.client(KEYS[21]).completions.create(model="tiny-gpt", prompt="a", max_tokens=2).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            s.client("not-a-key").completions.create(model="tiny-gpt", prompt="a", max_tokens=2)
    finally:
        s.close()


def test_deadline_ends_a_request_with_timeout_and_a_drain_timeout_ends_the_rest_with_an_error(served_run):
    # a 0.01 s deadline (queue wait included) ends 240 tokens early on any machine (0.05 s let a fast one finish)
    s = Server(served_run, "serve.request_timeout_s=0.01", "serve.max_running=1")
    try:
        slow = {"prompt": PROMPT, "max_tokens": 240, "temperature": 1.0}
        chunks, done = _stream(s.url, slow)
        assert done and chunks[-1]["choices"][0]["finish_reason"] == "timeout" and len(chunks) < 240
        r = httpx.post(f"{s.url}/v1/completions", json=slow, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    finally:
        s.close()
    # SIGTERM with no time to drain: the running stream ends with an error event, the server exits 0
    s = Server(served_run, "serve.drain_timeout_s=0")
    try:
        chunks, done = _stream(s.url, slow, on_open=lambda: s.proc.send_signal(signal.SIGTERM))
        assert done and chunks[-1]["error"]["code"] == "generation_ended"
        assert "drain_timeout_s" in chunks[-1]["error"]["message"]
        assert s.proc.wait(timeout=hang_guard(30)) == 0
    finally:
        s.close()


def test_sigterm_drains_running_streams_refuses_new_requests_and_exits_0(served_run):
    s = Server(served_run, "serve.max_running=4")
    try:
        results, opened = {}, threading.Barrier(4, timeout=hang_guard(60))

        def stream(i):
            results[i] = _stream(s.url, {"prompt": PROMPT, "max_tokens": 240, "temperature": 1.0, "seed": i},
                                 on_open=opened.wait)

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        opened.wait()
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + hang_guard(10)
        while httpx.get(f"{s.url}/ready", timeout=30).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.005)
        refused = httpx.post(f"{s.url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert httpx.get(f"{s.url}/ready", timeout=30).status_code == 503
        for t in threads:
            t.join(hang_guard(60))
        assert s.proc.wait(timeout=hang_guard(30)) == 0, s.proc.stderr.read()
        assert len(results) == 3
        for chunks, done in results.values():
            assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == 240
    finally:
        s.close()


def test_bad_serve_settings_are_one_line(served_run):
    import socket
    from conftest import run_python
    proc = run_python(["-m", "hpclm", "serve", "--ckpt", str(served_run), "--set", "serve.max_running=0"])
    assert proc.returncode == 2 and proc.stderr.strip() == "hpclm serve: error: serve.max_running must be >= 1"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        proc = run_python(["-m", "hpclm", "serve", "--ckpt", str(served_run), "--port", str(busy.getsockname()[1])])
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
