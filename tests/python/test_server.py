"""`quill serve` through the official `openai` Python client (unchanged), and its answers to
bad requests, run by ./run-tests.

The model is a tiny Llama trained here by quill, with a ChatML chat template: the tests check
the protocol (completions and chat, streamed and not, logprobs, stop, usage, errors), not the
quality of the text.
"""
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI
import openai

ROOT = Path(__file__).resolve().parents[2]
QUILL = os.environ.get("QUILL_BIN", str(ROOT / "target" / "release" / "quill"))
CORPUS = ROOT / "data" / "tinyshakespeare.txt"
KEY = "sk-quill-test"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    corpus = d / "c.txt"
    corpus.write_text(CORPUS.read_text()[:60000])
    model = d / "tiny"
    subprocess.run([QUILL, "train", "--arch", "llama", "--data", corpus, "--out", model, "--tokenizer", "bpe:400",
                    "--steps", "30", "--eval-interval", "30", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                    "--width", "64", "--context", "128", "--batch", "4", "--quiet"], check=True, capture_output=True)
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML}))
    proc, addr, log = start(model, d / "server.log", "--api-key", KEY)
    yield {"addr": addr, "proc": proc, "model": "tiny", "log": log, "dir": model}
    proc.terminate()
    proc.wait(timeout=10)


def start(model, log, *args):
    """Starts `quill serve` on a free port; returns (process, address, log path)."""
    f = open(log, "w")
    proc = subprocess.Popen([QUILL, "serve", "--model", model, "--port", "0", *args], stderr=f, text=True)
    for _ in range(200):
        m = re.search(r"http://([0-9.]+:[0-9]+)", Path(log).read_text())
        if m:
            return proc, m.group(1), log
        time.sleep(0.05)
    raise AssertionError(Path(log).read_text())


def rss_mb(proc):
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def health_seconds(addr):
    """Seconds /health takes to answer 200."""
    t0 = time.time()
    with urllib.request.urlopen(f"http://{addr}/health", timeout=5) as r:
        assert r.status == 200
    return time.time() - t0


def client(server, key=KEY):
    return OpenAI(base_url=f"http://{server['addr']}/v1", api_key=key, max_retries=0, timeout=60)


def raw(server, path, body, key=KEY, method="POST"):
    req = urllib.request.Request(f"http://{server['addr']}{path}", data=body, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    with urllib.request.urlopen(f"http://{server['addr']}/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_completions_streamed_and_not_with_logprobs(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=3)
    choice = r.choices[0]
    assert r.usage.completion_tokens == 12 and choice.finish_reason == "length"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    lp = choice.logprobs
    assert len(lp.tokens) == 12 and "".join(lp.tokens) == choice.text
    assert all(x <= 0 for x in lp.token_logprobs)
    # the chosen (greedy) token is the most likely one, so its log-prob tops the list
    for tok, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and abs(max(top.values()) - tok) < 1e-5
    parts = list(c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == choice.text
    assert parts[-1].choices[0].finish_reason == "length"


def test_chat_streamed_and_not_with_logprobs_and_stop(server):
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                  top_logprobs=2)
    m = r.choices[0]
    assert m.message.role == "assistant" and r.usage.completion_tokens <= 10
    assert len(m.logprobs.content) == r.usage.completion_tokens
    assert "".join(t.token for t in m.logprobs.content) == m.message.content
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == m.message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # sampling with a seed repeats; a stop string never appears in the text
    a = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=1.0, seed=7,
                                  stop=["e", "\n"], presence_penalty=0.5, frequency_penalty=0.5)
    b = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=1.0, seed=7,
                                  stop=["e", "\n"], presence_penalty=0.5, frequency_penalty=0.5)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert "e" not in a.choices[0].message.content and "\n" not in a.choices[0].message.content


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    c = client(server)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=1)
    cases = [
        (b'{"prompt": "x", "top_p": 2}', 400, "top_p"),
        (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
        (b'{"prompt": ', 400, None),
        (b'{"prompt": "\xff\xfe"}', 400, None),
        (b'[1, 2]', 400, None),
        (json.dumps({"prompt": "word " * 400}).encode(), 400, "messages"),
        (json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    ]
    for body, status, param in cases:
        code, err = raw(server, "/v1/completions", body)
        assert code == status, (body[:40], code, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, err
        if param:
            assert err["error"]["param"] == param, err
    code, err = raw(server, "/v1/completions", json.dumps({"prompt": "word " * 400}).encode())
    assert "128" in err["error"]["message"]  # the numbers: prompt tokens and the context
    code, err = raw(server, "/v1/chat/completions", b'{"messages": "hi"}')
    assert code == 400 and err["error"]["param"] == "messages"
    code, err = raw(server, "/v1/completions", b'{"prompt": "x"}', key=None)
    assert code == 401
    # a 50 MB body: the server answers 413 without reading it all (so send through a socket
    # and read the answer even if it closes the connection mid-body)
    host, port = server["addr"].split(":")
    s = socket.create_connection((host, int(port)))
    size = 50 << 20
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
    try:
        for _ in range(size >> 20):
            s.sendall(b"x" * (1 << 20))
    except OSError:
        pass
    answer = s.recv(65536).decode(errors="replace")
    s.close()
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"request_too_large"' in answer
    # still serving
    r = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_concurrent_streams_and_idle_connections(server):
    # warm up, then the memory baseline
    client(server).completions.create(model="tiny", prompt="x", max_tokens=4)
    base = rss_mb(server["proc"])
    idle = []
    host, port = server["addr"].split(":")
    for _ in range(1000):
        s = socket.create_connection((host, int(port)))
        idle.append(s)
    results, errors = [], []

    def one(i):
        try:
            parts = list(client(server).completions.create(model="tiny", prompt=f"Line {i}:", max_tokens=16,
                                                           temperature=0.8, seed=i, stream=True))
            results.append("".join(p.choices[0].text for p in parts))
        except Exception as e:  # noqa: BLE001 - collected and reported
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for s in idle:
        s.close()
    assert not errors, errors[:3]
    assert len(results) == 32
    assert server["proc"].poll() is None
    # the caches of finished requests are freed: memory returns to (near) its baseline
    time.sleep(0.5)
    client(server).completions.create(model="tiny", prompt="x", max_tokens=4)
    time.sleep(0.2)
    after = rss_mb(server["proc"])
    print(f"server RSS before {base:.1f} MB, after 32 streams and 1000 connections {after:.1f} MB")
    assert after < base + 4, (base, after)


def test_a_client_that_leaves_cancels_its_generation(server):
    # The tiny model can write all 100 tokens in the moment between the client's first chunk
    # and its leaving (the log then says "length"); such a try proves nothing either way, so
    # the client tries again. Cancellation that never happens fails every try.
    host, port = server["addr"].split(":")
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 100, "stream": True}).encode()
    log = Path(server["log"])
    cancelled = []
    for _ in range(20):
        seen = len(log.read_text().splitlines())
        s = socket.create_connection((host, int(port)))
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        s.settimeout(30)
        got = b""
        while b"data:" not in got:
            chunk = s.recv(4096)
            got += chunk
            # an error answer would leave the loop waiting on a kept-alive connection
            assert chunk and not re.match(rb"HTTP/1.1 [45]", got), got[:300]
        s.close()
        # wait for this request's line in the log (finished or cancelled)
        for _ in range(100):
            new = [l for l in log.read_text().splitlines()[seen:] if "completion tokens" in l]
            if new:
                break
            time.sleep(0.05)
        cancelled = [l for l in new if "cancelled" in l]
        if cancelled:
            break
    assert cancelled, log.read_text()[-500:]
    assert int(re.search(r"(\d+) completion", cancelled[0]).group(1)) < 100


def test_a_full_queue_answers_429(server, tmp_path):
    proc, addr, _ = start(server["dir"], tmp_path / "q.log", "--max-active", "1", "--queue", "1")
    codes = []

    def one():
        req = urllib.request.Request(f"http://{addr}/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "ROMEO:", "max_tokens": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                codes.append(r.status)
        except urllib.error.HTTPError as e:
            err = json.loads(e.read())
            assert err["error"]["code"] == "queue_full", err
            codes.append(e.code)

    try:
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert 429 in codes and 200 in codes, codes
    assert set(codes) <= {200, 429}


def test_serves_a_llama2c_checkpoint_with_its_tokenizer(tmp_path):
    """stories260K.bin with --tokenizer tok512.bin: greedy completion continues the prompt as
    llama2.c's run.c does (its reference output, made by run.c itself)."""
    fx = ROOT / "tests" / "fixtures" / "stories260K"
    ref = json.loads((fx / "reference_greedy.json").read_text())["cases"][0]
    proc, addr, _ = start(fx / "stories260K.bin", tmp_path / "l2c.log", "--tokenizer", fx / "tok512.bin")
    try:
        c = OpenAI(base_url=f"http://{addr}/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model="stories260K.bin", prompt=ref["prompt"], max_tokens=40, temperature=0)
        assert ref["stdout"].startswith(ref["prompt"] + r.choices[0].text), r.choices[0].text
        assert r.usage.completion_tokens == 40 and r.usage.prompt_tokens == len(ref["prompt_tokens"])
        # chat needs a template, which a llama2.c checkpoint has none of: a clear 400
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="stories260K.bin", messages=[{"role": "user", "content": "hi"}])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_min_p_and_penalties_work_over_http(server):
    """The sampler's options over HTTP, as on the command line: min_p = 1 keeps only the most
    likely token (so sampling equals greedy); penalties are accepted and range-checked."""
    c = client(server)
    greedy = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0).choices[0].text
    only_best = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=1.0, seed=3,
                                     extra_body={"min_p": 1.0}).choices[0].text
    assert only_best == greedy
    r = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0,
                             presence_penalty=2.0, frequency_penalty=2.0, extra_body={"repetition_penalty": 1.5})
    assert r.usage.completion_tokens > 0
    for field, value in [("min_p", 1.5), ("presence_penalty", 3), ("repetition_penalty", 0)]:
        status, body = raw(server, "/v1/completions", json.dumps({"prompt": "x", field: value}).encode())
        assert status == 400 and body["error"]["param"] == field, body


def test_explain_cut_under_other_settings(server):
    """`/v1/quill/cut` (what the explain view's sliders ask): the first explained step's cut
    again, then under top_k = 3 (three kept, renormalised); bad ids get a 400 naming them."""
    status, ex = raw(server, "/v1/quill/explain", json.dumps(
        {"prompt": "ROMEO:", "max_tokens": 2, "temperature": 0.7, "top_k": 5, "seed": 2}).encode())
    assert status == 200, ex
    ids = [t["id"] for t in ex["prompt"]]
    step = ex["steps"][1]
    status, cut = raw(server, "/v1/quill/cut", json.dumps(
        {"ids": ids, "generated": [ex["steps"][0]["chosen"]], "temperature": 0.7, "top_k": 5}).encode())
    assert status == 200, cut
    assert cut["kept_count"] == step["kept_count"] == 5
    assert [c["id"] for c in cut["candidates"] if c["kept"]] == [k[0] for k in step["kept"]]
    status, cut = raw(server, "/v1/quill/cut", json.dumps({"ids": ids, "top_k": 3, "top": 10}).encode())
    assert status == 200, cut
    kept = [c for c in cut["candidates"] if c["kept"]]
    assert len(cut["candidates"]) == 10 and len(kept) == 3 and cut["rest_kept"] == 0
    mass = sum(c["prob"] for c in kept)
    for c in kept:
        assert abs(c["kept_prob"] - c["prob"] / mass) < 1e-5
    for body in ({"ids": []}, {"ids": [10**9]}, {"ids": "x"}, {"ids": ids, "generated": [-1]}):
        status, err = raw(server, "/v1/quill/cut", json.dumps(body).encode())
        assert status == 400 and err["error"]["param"] in ("ids", "generated"), (body, err)


def test_cross_site_bodies_and_oversized_attention_maps_are_refused(server):
    """A body declared as text/plain or a form (what a page on another site can send without
    asking) is refused with 415 before any work; an attention map is drawn for at most 1,024
    tokens; a key of the right length but wrong is still refused."""
    for ctype in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]:
        req = urllib.request.Request(f"http://{server['addr']}/v1/completions",
                                     data=b'{"prompt": "x", "max_tokens": 1}', method="POST")
        req.add_header("Authorization", f"Bearer {KEY}")
        req.add_header("Content-Type", ctype)
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError(f"{ctype} accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 415, (ctype, e.code)
            assert json.loads(e.read())["error"]["code"] == "unsupported_media_type"
    code, err = raw(server, "/v1/quill/attention", json.dumps({"ids": [5] * 1100}).encode())
    assert code == 400 and "1024" in err["error"]["message"], err
    # a token id above 2^32 is refused, not truncated to a valid one
    code, err = raw(server, "/v1/quill/attention", json.dumps({"ids": [5, 4294967301]}).encode())
    assert code == 400, (code, err)
    code, err = raw(server, "/v1/models", None, key=KEY[:-1] + "x", method="GET")
    assert code == 401
    # still serving
    r = client(server).completions.create(model="tiny", prompt="ROMEO:", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_a_loopback_server_answers_only_local_host_names(server, tmp_path):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends Host:
    evil.example; the server (bound to 127.0.0.1) answers 403 unless told --allow-host."""
    host, port = server["addr"].split(":")

    def ask(addr, name):
        s = socket.create_connection(addr)
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        answer = s.recv(65536).decode(errors="replace")
        s.close()
        return answer.split(" ")[1]

    addr = (host, int(port))
    assert ask(addr, f"127.0.0.1:{port}") == "200"
    assert ask(addr, f"localhost:{port}") == "200"
    assert ask(addr, "[::1]") == "200"
    assert ask(addr, f"evil.example:{port}") == "403"
    assert ask(addr, "127.0.0.1.evil.example") == "403"
    proc, addr2, _ = start(server["dir"], tmp_path / "h.log", "--allow-host", "quill.lan")
    try:
        h2, p2 = addr2.split(":")
        assert ask((h2, int(p2)), f"quill.lan:{p2}") == "200"
        assert ask((h2, int(p2)), "other.lan") == "403"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_slow_clients_are_cut_off_and_health_keeps_answering(server, tmp_path):
    """Slowloris: 500 connections that trickle half a request's headers and 500 that send
    nothing. /health answers within a second throughout; a connection whose headers do not
    arrive within --header-timeout is closed; a body that does not arrive within
    --body-timeout gets 408; three rounds of it leave the server's memory bounded."""
    proc, addr, _ = start(server["dir"], tmp_path / "slow.log", "--header-timeout", "2", "--body-timeout", "2")
    host, port = addr.split(":")

    def round_of_slow_clients():
        slow = []
        for i in range(1000):
            s = socket.create_connection((host, int(port)))
            if i % 2 == 0:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(s)
        for _ in range(5):
            assert health_seconds(addr) < 1.0
        # a body that stops halfway
        b = socket.create_connection((host, int(port)))
        b.settimeout(20)
        b.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\": ".encode())
        answer = b.recv(65536).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        b.close()
        # the trickling and idle connections have been closed by the server
        time.sleep(2.5)
        closed = 0
        for s in slow:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except (ConnectionResetError, socket.timeout):
                closed += 1
            s.close()
        assert closed == len(slow), closed
        assert health_seconds(addr) < 1.0
        time.sleep(0.3)
        return rss_mb(proc)

    try:
        health_seconds(addr)
        base = rss_mb(proc)
        rounds = [round_of_slow_clients() for _ in range(3)]
        print(f"server RSS {base:.1f} MB, after each round of 1000 slow clients {rounds}")
        # closed connections give their memory back to the allocator, which keeps some of
        # it: RSS stays within 32 kB per connection of a round (measured: +2 to +5 MB a
        # round at first, levelling off near +15 MB after ten rounds)
        assert max(rounds) < base + 32, (base, rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_health_and_memory_through_every_attack_at_once(tmp_path):
    """Everything of the hostile-input issue at the same time, on a model with a 1,024-token
    context: 1,000 idle connections, 300 slow clients trickling headers, chat requests whose
    long messages run the (per-character) template out of fuel, attention maps at the
    1,024-token limit, and 32 streamed completions of the load test. /health is asked every
    50 ms and answers within a second throughout; every honest request succeeds; every
    attack gets its 4xx. Two rounds: after the first the server's memory is near its
    baseline, and the second does not add to it as a leak would."""
    model = tmp_path / "long"
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS.read_text()[:60000])
    subprocess.run([QUILL, "train", "--arch", "llama", "--data", corpus, "--out", model, "--tokenizer", "bpe:400",
                    "--steps", "3", "--eval-interval", "3", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                    "--width", "64", "--context", "1024", "--batch", "1", "--quiet"], check=True, capture_output=True)
    # ChatML, after a loop that costs the square of each message's length: harmless for a
    # question, past the template's step limit for a 3,000-character message
    costly = ("{% for m in messages %}{% for a in m.content %}{% for b in m.content %}{% endfor %}{% endfor %}"
              "{% endfor %}" + CHATML)
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": costly}))
    proc, addr, _ = start(model, tmp_path / "all.log", "--header-timeout", "3")
    host, port = addr.split(":")
    srv = {"addr": addr}
    honest = client(srv, key="no-key-is-set")

    def attention():
        return raw(srv, "/v1/quill/attention", json.dumps({"ids": [7] * 1024, "layer": 1, "head": 3}).encode(),
                   key=None)

    def runaway_chat():
        return raw(srv, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "ab" * 1500}], "max_tokens": 4}).encode(), key=None)

    try:
        # warm every path once, then the memory baseline
        honest.completions.create(model="long", prompt="x", max_tokens=4)
        honest.chat.completions.create(model="long", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert attention()[0] == 200
        assert runaway_chat()[0] == 400
        time.sleep(0.3)
        base = rss_mb(proc)

        def attack():
            """One round of every attack at once; the /health latencies and any failures."""
            latencies, failures, done = [], [], threading.Event()

            def poll_health():
                while not done.is_set():
                    try:
                        latencies.append(health_seconds(addr))
                    except Exception as e:  # noqa: BLE001 - collected and reported
                        failures.append(f"health: {e!r}")
                    time.sleep(0.05)

            def stream(i):
                try:
                    parts = list(honest.completions.create(model="long", prompt=f"Line {i}:", max_tokens=16,
                                                           temperature=0.8, seed=i, stream=True))
                    if not parts:
                        failures.append(f"stream {i}: no chunks")
                except Exception as e:  # noqa: BLE001
                    failures.append(f"stream {i}: {e!r}")

            def expect(what, call, code):
                try:
                    got = call()[0]
                    if got != code:
                        failures.append(f"{what}: {got}, not {code}")
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{what}: {e!r}")

            poller = threading.Thread(target=poll_health)
            poller.start()
            idle = [socket.create_connection((host, int(port))) for _ in range(1000)]
            slow = []
            for _ in range(300):
                s = socket.create_connection((host, int(port)))
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                slow.append(s)
            work = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
            work += [threading.Thread(target=expect, args=("attention", attention, 200)) for _ in range(4)]
            work += [threading.Thread(target=expect, args=("runaway chat", runaway_chat, 400)) for _ in range(6)]
            for t in work:
                t.start()
            for s in slow:  # trickle one more byte each, slower than the server waits
                s.sendall(b"x")
            for t in work:
                t.join(timeout=180)
            time.sleep(3.5)  # past --header-timeout: the slow and idle connections are closed
            done.set()
            poller.join()
            for s in idle + slow:
                s.close()
            return latencies, failures

        # two rounds: the first may leave the allocator holding memory it will reuse; a leak
        # grows again in the second
        slowest, after = [], []
        for _ in range(2):
            latencies, failures = attack()
            assert not failures, failures[:5]
            assert len(latencies) > 20 and max(latencies) < 1.0, (len(latencies), max(latencies))
            slowest.append(max(latencies))
            honest.completions.create(model="long", prompt="x", max_tokens=4)
            time.sleep(0.5)
            after.append(rss_mb(proc))
        assert proc.poll() is None
        print(f"server RSS {base:.1f} MB before, {after[0]:.1f} and {after[1]:.1f} MB after each round; "
              f"slowest /health {max(slowest) * 1000:.0f} ms")
        # what the 1,300 connections and 42 requests of a round used is given back or reused
        assert after[0] < base + 64 and after[1] < after[0] + 24, (base, after)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
