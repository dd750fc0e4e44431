"""`edgesink serve` as clients use it: the official openai client and plain HTTP, on 127.0.0.1 only.

One server (8 slots) serves most tests, each on conversations of its own name; the restart and the
limits need servers of their own.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from serve_process import ServeProcess, free_port

REPO = Path(__file__).resolve().parents[1]
FAST = ["--n-ctx", "256", "--threads", "1"]
SYSTEM = "You are a terse assistant."


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    process = ServeProcess(model_path, *FAST, "--slots", "8", "--sessions", str(folder / "sessions"),
                           log_path=folder / "serve.log").start()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def ask(client, model_id, name, history, text, **options):
    """One chat turn in conversation ``name`` the way OpenAI clients do it: the whole history, resent."""
    history.append({"role": "user", "content": text})
    reply = client.chat.completions.create(model=model_id, messages=history, temperature=0,
                                           extra_headers={"X-Edgesink-Session": name}, **options)
    history.append({"role": "assistant", "content": reply.choices[0].message.content})
    return reply


def test_a_long_chat_feeds_only_each_new_turn(server, client, model_id):
    history = [{"role": "system", "content": SYSTEM}]
    fed, evicted, turns_after_eviction = [], 0, 0
    for i in range(30):
        if turns_after_eviction == 3:
            break
        reply = ask(client, model_id, "long", history, f"Name a colour, please ({i}).", max_tokens=24)
        extension = reply.model_extra["edgesink"]
        assert extension["session"] == "long" and extension["started_over"] is None
        # Everything but the new question and its reply (nothing at first).
        assert extension["reused_messages"] == (len(history) - 2 if i else 0)
        usage = reply.usage.model_extra
        assert 0 < usage["cached_tokens"] <= 256
        fed.append(reply.usage.prompt_tokens)
        evicted += usage["evicted_tokens"]
        turns_after_eviction += evicted > 0
    assert turns_after_eviction == 3  # the turns outgrew n_ctx 256: whole turns were evicted, the chat went on
    assert max(fed[1:]) < 40  # a question's tokens, however long the history resent
    info = server.request("GET", "/v1/sessions/long")[1]
    assert info["messages"] == len(history) and info["live"] and info["saved"]
    assert info["cached_text"].count(SYSTEM) == 1  # the system prompt stays, once
    assert f"please ({i - 1})." in info["cached_text"] and "please (0)." not in info["cached_text"]


def test_a_completion_past_n_ctx_is_what_a_lone_session_writes(server, client, model_id, model):
    """A served text stream evicts as a lone session does, the sinks moved forward and re-encoded in
    place in the shared context, and writes, greedily, exactly what the lone session writes."""
    prompt = "The history of the river towns, told slowly: " + "the boats came and went, " * 50
    reply = client.completions.create(model=model_id, prompt=prompt, max_tokens=150, temperature=0,
                                      extra_headers={"X-Edgesink-Session": "past-n-ctx"})
    usage = reply.usage.model_extra
    assert usage["evicted_tokens"] > 0 and usage["cached_tokens"] <= 256
    with model.session(n_ctx=256, n_threads=1) as lone:
        assert lone.kept_forward and lone.policy.evict_chunk == 1
        lone.feed(prompt)
        text = lone.generate_text(150, temperature=0)
        assert lone.stats.evictions == usage["evicted_tokens"]
        counts = lone.stats.shift_counts()
    assert reply.choices[0].text == text
    info = server.request("GET", "/v1/sessions/past-n-ctx")[1]
    assert info["shift_mode"] == "kept-forward"
    assert {key: info[key] for key in counts} == counts and counts["refreshes"] >= 1


def test_streaming_chat_and_completions(server, client, model_id):
    history = [{"role": "user", "content": "Count from one to five."}]
    stream = client.chat.completions.create(model=model_id, messages=history, max_tokens=20, stream=True,
                                            temperature=0, stream_options={"include_usage": True},
                                            extra_headers={"X-Edgesink-Session": "streamed"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > 5
    reply = client.chat.completions.create(model=model_id, messages=history, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == text  # streamed or not: the same reply from the same history

    first = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=6,
                                      temperature=0)
    prompt = "The capital of France is" + first.choices[0].text + " The capital of Spain is"
    second = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0)
    assert second.model_extra["edgesink"]["started_over"] is None
    assert second.usage.prompt_tokens < first.usage.prompt_tokens + 6  # only " The capital of Spain is" was fed
    pieces = list(client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices).strip()


def test_a_history_that_differs_starts_over_and_says_so(server, client, model_id):
    history = [{"role": "system", "content": SYSTEM}]
    ask(client, model_id, "differs", history, "Hello.", max_tokens=8)
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "A different first question."}]
    status, body, headers = server.request("POST", "/v1/chat/completions", {
        "model": model_id, "messages": other, "max_tokens": 4}, {"X-Edgesink-Session": "differs"})
    assert status == 200 and body["edgesink"]["started_over"] == "the request's history differs from the conversation's"
    assert headers.get("x-edgesink-started-over") == "1"
    info = server.request("GET", "/v1/sessions/differs")[1]
    assert "A different first question." in info["cached_text"] and "Hello." not in info["cached_text"]


def test_unnamed_requests_each_continue_the_conversation_they_resend(server, model_id):
    """Two unnamed clients, interleaved: each second turn finds the conversation holding its first."""
    histories = {"a": [{"role": "user", "content": "Remember the word lighthouse."}],
                 "b": [{"role": "user", "content": "Remember the word teacup."}]}
    for turn in range(2):
        for who, history in histories.items():
            status, reply, headers = server.request("POST", "/v1/chat/completions", {
                "model": model_id, "messages": history, "max_tokens": 8, "temperature": 0})
            assert status == 200 and "x-edgesink-session" not in headers
            assert reply["edgesink"]["session"] is None
            assert reply["edgesink"]["reused_messages"] == 2 * turn  # its question and the reply before
            assert reply["edgesink"]["started_over"] is None
            history += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "And now?"}]


def test_eight_concurrent_clients_stay_isolated(server, client, model_id):
    words = ["amber", "basalt", "cobalt", "damask", "ember", "fennel", "garnet", "hazel"]
    errors = []

    def chat(i):
        try:
            history = [{"role": "system", "content": f"The secret word is {words[i]}."}]
            for question in ("What is the secret word?", "Say it again."):
                ask(client, model_id, f"iso-{i}", history, question, max_tokens=16)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, word in enumerate(words):
        cached = server.request("GET", f"/v1/sessions/iso-{i}")[1]["cached_text"]
        assert [w for w in words if w in cached] == [word], (i, cached)


def test_a_client_gone_mid_stream_stops_its_generation(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"model": "any", "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 4000, "stream": True, "temperature": 0}
    body["model"] = server.request("GET", "/v1/models")[1]["data"][0]["id"]
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"content-type": "application/json", "X-Edgesink-Session": "gone"})
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(6):
        assert response.readline().startswith(b"data: ") and response.readline() == b"\n"
    connection.close()  # the client goes away
    health = server.wait_for(lambda h: h["running"] == 0)
    assert health["running"] == 0  # stopped long before 4000 tokens (minutes of work)
    info = server.request("GET", "/v1/sessions/gone")[1]
    assert info["messages"] == 2 and info["tokens_seen"] < 1000  # the reply so far is recorded, nothing more
    status, reply, _ = server.request("POST", "/v1/chat/completions", {
        "model": body["model"], "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4},
        {"X-Edgesink-Session": "gone"})
    assert status == 200 and reply["choices"][0]["message"]["content"]


BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "MODEL", "messages": "hello"}, 400, "messages"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "MODEL", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "n": 4}, 400, "n"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "session": "../../etc"}, 400, "session"),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "MODEL", "messages": [{"role": "system", "content": "long " * 400}, {"role": "user", "content": "x"}],
      "session": "too-long-system"}, 400, None),
    (b"x" * (2 << 20), 413, None),
]


@pytest.mark.parametrize("body, status, param", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_input_gets_a_clear_error_and_the_server_stays_up(server, model_id, body, status, param):
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body = {**body, "model": model_id}
    got, answer, _ = server.request("POST", "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert server.health()["status"] == "ok"


def test_unknown_paths_and_methods_are_openai_shaped(server):
    status, body, _ = server.request("GET", "/v1/engines")
    assert status == 404 and "no such endpoint" in body["error"]["message"]
    status, body, _ = server.request("GET", "/v1/chat/completions")
    assert status == 405 and body["error"]["message"]
    assert server.request("GET", "/v1/sessions/never-was")[0] == 404
    assert server.request("DELETE", "/v1/sessions/never-was")[0] == 404


@pytest.mark.slow(seconds=60)
def test_named_sessions_survive_kill_9_and_a_restart(model_path, tmp_path):
    sessions = tmp_path / "sessions"
    args = [*FAST, "--slots", "2", "--sessions", str(sessions)]
    first = ServeProcess(model_path, *args, log_path=tmp_path / "first.log").start()
    client = openai.OpenAI(base_url=first.base_url, api_key="unused", timeout=300, max_retries=0)
    model_id = client.models.list().data[0].id
    history = [{"role": "system", "content": SYSTEM}]
    for text in ("My name is Ada.", "I live by the sea."):
        ask(client, model_id, "ada", history, text, max_tokens=12)
    seen = first.request("GET", "/v1/sessions/ada")[1]["tokens_seen"]
    first.kill()
    (sessions / "bob.session").write_bytes(b"not a session file")

    second = ServeProcess(model_path, *args, log_path=tmp_path / "second.log").start()
    client = openai.OpenAI(base_url=second.base_url, api_key="unused", timeout=300, max_retries=0)
    assert second.request("GET", "/v1/sessions/ada")[1] == {"name": "ada", "live": False, "saved": True}
    reply = ask(client, model_id, "ada", history, "Where do I live?", max_tokens=12)
    assert reply.model_extra["edgesink"] == {"session": "ada", "reused_messages": 5, "started_over": None}
    info = second.request("GET", "/v1/sessions/ada")[1]
    assert info["tokens_seen"] == seen + reply.usage.total_tokens  # the stream went on where it was
    status, reply, _ = second.request("POST", "/v1/chat/completions", {
        "model": model_id, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}, {"X-Edgesink-Session": "bob"})
    assert status == 200 and reply["edgesink"]["started_over"].startswith("its saved session could not be restored")
    assert str(tmp_path) not in reply["edgesink"]["started_over"]  # the server's paths stay its own
    assert second.request("DELETE", "/v1/sessions/ada")[0] == 200
    assert not (sessions / "ada.session").exists()
    assert second.stop() == 0


@pytest.mark.slow(seconds=60)
def test_limits_key_queue_and_body(model_path, tmp_path):
    """One slot, one waiting request: past that 429; a wait past the timeout 503; a key; a body limit."""
    server = ServeProcess(model_path, *FAST, "--slots", "1", "--max-queue", "1", "--queue-timeout", "1",
                          "--api-key", "sesame", "--max-body", "4096", log_path=tmp_path / "serve.log").start()
    key = {"Authorization": "Bearer sesame"}
    wrong = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    model_id = server.request("GET", "/v1/models", headers=key)[1]["data"][0]["id"]
    body = {"model": model_id, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert server.request("POST", "/v1/chat/completions", body, key)[0] == 413

    # A long stream holds the only slot: greedy, the model counts on and on (1,500 tokens measured, ~20 s).
    long = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    long.request("POST", "/v1/completions", body=json.dumps({
        "model": model_id, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "max_tokens": 4000, "temperature": 0,
        "stream": True}), headers={"content-type": "application/json", **key})
    assert long.getresponse().status == 200
    waiting = {}
    short = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    waiter = threading.Thread(target=lambda: waiting.update(
        answer=server.request("POST", "/v1/chat/completions", short, {**key, "X-Edgesink-Session": "b"})))
    waiter.start()
    assert server.wait_for(lambda h: h["waiting"] == 1)["waiting"] == 1
    status, answer, headers = server.request("POST", "/v1/chat/completions", short, {**key, "X-Edgesink-Session": "c"})
    assert status == 429 and answer["error"]["code"] == "queue_full" and headers["retry-after"]
    waiter.join()
    status, answer, _ = waiting["answer"]
    assert status == 503 and answer["error"]["code"] == "overloaded"
    long.close()
    assert server.wait_for(lambda h: h["running"] == 0)["running"] == 0
    assert server.request("POST", "/v1/chat/completions", short, key)[0] == 200  # the slot came back
    assert server.stop() == 0


@pytest.mark.slow(seconds=60)  # Gemma 3 270M through 1,000 tokens twice, on one CPU
def test_gemma_is_served_past_its_sliding_window_and_past_n_ctx(gemma, prose, tmp_path):
    """A sliding-window model through the openai client: a completion whose prompt passes the 512-token
    window and whose stream passes n_ctx, written exactly as a lone session writes it, then a chat."""
    process = ServeProcess(gemma.path, "--n-ctx", "640", "--threads", "1", "--slots", "2",
                           log_path=tmp_path / "serve.log").start()
    try:
        client = openai.OpenAI(base_url=process.base_url, api_key="unused", timeout=600, max_retries=0)
        model_id = client.models.list().data[0].id
        prompt = gemma.detokenize(gemma.tokenize(prose[20_000:40_000])[:600])
        reply = client.completions.create(model=model_id, prompt=prompt, max_tokens=80, temperature=0,
                                          extra_headers={"X-Edgesink-Session": "gemma-text"})
        usage = reply.usage.model_extra
        assert reply.usage.prompt_tokens > 512 and usage["evicted_tokens"] > 0 and usage["cached_tokens"] <= 640
        with gemma.session(n_ctx=640, n_threads=1, shift_mode="window-back", evict_chunk=64) as lone:
            lone.feed(prompt)
            assert reply.choices[0].text == lone.generate_text(80, temperature=0)
            assert lone.stats.evictions == usage["evicted_tokens"]
        info = process.request("GET", "/v1/sessions/gemma-text")[1]
        assert info["shift_mode"] == "window-back" and info["evictions"] == usage["evicted_tokens"]
        chat = client.chat.completions.create(model=model_id, max_tokens=16, temperature=0,
                                              messages=[{"role": "user", "content": "Say hello."}])
        assert chat.choices[0].message.content.strip()
    finally:
        assert process.stop() == 0, process.log()


@pytest.mark.slow(seconds=90)
def test_clients_that_come_and_go_on_fewer_slots_lose_nothing_and_mix_nothing(tmp_path):
    """benchmarks/serve.py's soak, short: 6 clients on 2 slots (conversations saved and restored all
    the time), a quarter of the requests abandoned mid-reply. Every request is answered once or
    refused; each conversation's messages are its client's history; its cells in llama.cpp (read
    back from its saved file) hold exactly the tokens its bookkeeping names, none of another's."""
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), "--parts", "soak",
                             "--threads", "1", "--soak-seconds", "20", "--soak-clients", "6", "--soak-slots", "2",
                             "--soak-n-ctx", "256", "--port", str(free_port()), "--json", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    soak = json.loads(out.read_text())["soak"]
    assert soak["problems"] == [], soak["problems"]
    assert soak["lost"] == 0 and soak["answered_twice"] == 0, soak
    assert soak["answered"] >= 6 and soak["abandoned_by_client"] >= 1, soak
    assert soak["cells_checked"] > 6 * 100, soak  # every conversation, past its window at n_ctx 256
