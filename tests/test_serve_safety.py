"""`edgesink serve` refuses what a web page or a careless client could do to it, and keeps each owner's
conversations their own: one test per finding of the review that asked for it (rows 1-18), each
against a real server on 127.0.0.1.

One keyed server serves most tests; the queue, the slot eviction, the cancelled prompts and the
shutdown need servers of their own.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import openai
import pytest

from serve_process import ServeProcess

FAST = ["--n-ctx", "256", "--threads", "1"]
ALPHA, BETA = {"Authorization": "Bearer alpha-key"}, {"Authorization": "Bearer beta-key"}
HI = [{"role": "user", "content": "Hi."}]


@pytest.fixture(scope="module")
def keyed(model_path, tmp_path_factory):
    """Two keys (one from a file), a small prompt budget, short client timeouts, one allowed origin."""
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "keys").write_text("# keys file\nbeta-key\n")
    process = ServeProcess(model_path, *FAST, "--slots", "4", "--sessions", str(folder / "sessions"),
                           "--api-key", "alpha-key", "--api-keys-file", str(folder / "keys"),
                           "--max-prompt-tokens", "400", "--max-messages", "12", "--header-timeout", "5",
                           "--body-timeout", "3", "--max-connections", "24", "--cors-origin", "http://app.example",
                           log_path=folder / "serve.log").start()
    process.folder = folder
    process.model_id = process.request("GET", "/v1/models", headers=ALPHA)[1]["data"][0]["id"]
    yield process
    assert process.stop() == 0, process.log()


def chat(server, name, messages, key=ALPHA, **extra):
    body = {"model": server.model_id, "messages": messages, "max_tokens": 6, "temperature": 0, **extra}
    headers = {**key, **({"X-Edgesink-Session": name} if name else {})}
    return server.request("POST", "/v1/chat/completions", body, headers)


@pytest.fixture(scope="module")
def victim(keyed):
    """A named conversation of key alpha's with two turns, as GET shows it."""
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "My name is Ada."}]
    status, reply, _ = chat(keyed, "victim", history)
    assert status == 200
    history += [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                {"role": "user", "content": "I live by the sea."}]
    assert chat(keyed, "victim", history)[0] == 200
    return keyed.request("GET", "/v1/sessions/victim", headers=ALPHA)[1]


def untouched(server, victim):
    now = server.request("GET", "/v1/sessions/victim", headers=ALPHA)[1]
    return {k: now[k] for k in ("messages", "tokens_seen", "cached_text")} == \
        {k: victim[k] for k in ("messages", "tokens_seen", "cached_text")}


# -- rows 1 and 1b: cross-site writes and DNS rebinding ---------------------------------------------

def test_row_1_a_cross_site_post_is_refused_and_changes_nothing(keyed, victim):
    attack = json.dumps({"model": keyed.model_id, "session": "victim", "messages": HI}).encode()
    status, body, _ = keyed.request("POST", "/v1/chat/completions", attack,
                                    {**ALPHA, "Content-Type": "text/plain", "Origin": "http://attacker.example"})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    status, body, _ = keyed.request("POST", "/v1/chat/completions", attack, {**ALPHA, "Content-Type": "text/plain"})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"  # no page sends JSON cross-site unasked
    status, body, _ = keyed.request("POST", "/v1/chat/completions", attack, {**ALPHA, "Origin": "null"})
    assert status == 403
    assert untouched(keyed, victim)


def test_row_1_an_allowed_origin_gets_cors_and_its_preflight(keyed, victim):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-edgesink-session"}
    status, _, headers = keyed.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    assert "x-edgesink-session" in headers["access-control-allow-headers"].lower()
    status, _, headers = keyed.request("OPTIONS", "/v1/chat/completions",
                                       headers={**preflight, "Origin": "http://attacker.example"})
    assert status == 403 and "access-control-allow-origin" not in headers
    status, _, headers = keyed.request("GET", "/v1/models", headers={**ALPHA, "Origin": "http://app.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"


def test_row_1b_a_rebinding_host_is_refused(keyed, victim):
    status, body, _ = keyed.request("GET", "/v1/sessions/victim", headers={**ALPHA, "Host": "attacker.example"})
    assert status == 403 and body["error"]["code"] == "host_not_allowed" and "cached_text" not in json.dumps(body)
    for host in (f"localhost:{keyed.port}", f"127.0.0.1:{keyed.port}", f"[::1]:{keyed.port}"):
        assert keyed.request("GET", "/v1/sessions/victim", headers={**ALPHA, "Host": host})[0] == 200, host


# -- row 5: the key on every route, and namespaces ------------------------------------------------------

ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/sessions/victim"), ("DELETE", "/v1/sessions/victim")]


@pytest.mark.parametrize("method, path", ROUTES)
def test_row_5_every_route_needs_a_valid_key(keyed, victim, method, path):
    body = {"model": keyed.model_id, "messages": HI, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "alpha-key"},
                    {"Authorization": "Basic alpha-key"}):
        status, answer, _ = keyed.request(method, path, body if method == "POST" else None,
                                          {**headers, "X-Edgesink-Session": "victim"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", (headers, answer)
    assert untouched(keyed, victim)  # DELETE without a key deleted nothing


def test_row_14_the_bearer_scheme_is_case_insensitive(keyed, victim):
    assert keyed.request("GET", "/v1/models", headers={"Authorization": "bearer alpha-key"})[0] == 200
    assert keyed.request("GET", "/v1/models", headers={"Authorization": "BEARER  beta-key"})[0] == 200


def test_row_5_one_key_cannot_read_continue_or_delete_anothers_conversation(keyed, victim):
    assert keyed.request("GET", "/v1/sessions/victim", headers=BETA)[0] == 404
    assert keyed.request("DELETE", "/v1/sessions/victim", headers=BETA)[0] == 404
    status, reply, _ = chat(keyed, "victim", HI, key=BETA)  # beta's own "victim", new
    assert status == 200 and reply["edgesink"]["reused_messages"] == 0 and reply["edgesink"]["started_over"] is None
    assert untouched(keyed, victim)
    snapshots = sorted(p.relative_to(keyed.folder / "sessions").parent.name
                       for p in (keyed.folder / "sessions").rglob("victim.session"))
    assert len(snapshots) == 2 and all(s.startswith("key-") for s in snapshots)  # a folder per key
    assert not any("alpha-key" in p.name for p in (keyed.folder / "sessions").rglob("*"))
    assert keyed.request("DELETE", "/v1/sessions/victim", headers=BETA)[0] == 200
    assert untouched(keyed, victim)


def test_row_5_the_user_field_names_nothing_by_default(keyed, victim):
    status, reply, headers = chat(keyed, None, HI, user="bob")
    assert status == 200 and reply["edgesink"]["session"] is None and "x-edgesink-session" not in headers
    assert keyed.request("GET", "/v1/sessions/bob", headers=ALPHA)[0] == 404
    assert not list((keyed.folder / "sessions").rglob("bob.session"))


# -- rows 6, 2, 10, 11, 15: refused before anything is touched ------------------------------------------------

def test_row_6_a_system_only_request_is_refused_and_the_conversation_kept(keyed, victim):
    status, body, _ = chat(keyed, "victim", [{"role": "system", "content": "Only a system prompt."}])
    assert status == 400 and body["error"]["param"] == "messages" and "system" in body["error"]["message"]
    assert untouched(keyed, victim)


def test_row_2_prompts_over_the_limits_are_refused_before_anything_is_fed(keyed, victim):
    history = [{"role": "user", "content": "My name is Ada."}]
    status, body, _ = chat(keyed, "victim", history + [{"role": "user", "content": "word " * 600}])
    assert status == 400 and body["error"]["code"] == "prompt_too_long" and "400" in body["error"]["message"]
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(15)]
    status, body, _ = chat(keyed, "victim", many)
    assert status == 400 and body["error"]["code"] == "too_many_messages"
    status, body, _ = keyed.request("POST", "/v1/completions", {"model": keyed.model_id, "prompt": "word " * 600},
                                    {**ALPHA, "X-Edgesink-Session": "victim"})
    assert status == 400 and body["error"]["code"] == "prompt_too_long"
    assert untouched(keyed, victim)  # a differing history that would start over is refused first


def test_row_10_a_name_ending_in_a_newline_is_refused(keyed, victim):
    status, body, _ = chat(keyed, None, HI, session="alice\n")
    assert status == 400 and body["error"]["param"] == "session"
    assert keyed.request("GET", "/v1/sessions/victim%0A", headers=ALPHA)[0] == 400
    assert not [p for p in (keyed.folder / "sessions").rglob("*") if "\n" in p.name]


def test_row_11_deeply_nested_json_is_a_400(keyed, victim):
    for depth in (40, 1000, 100_000):
        deep = b'{"model": "x", "messages": ' + b"[" * depth + b"]" * depth + b"}"
        status, body, _ = keyed.request("POST", "/v1/chat/completions", deep, ALPHA)
        assert status == 400 and "nests deeper" in body["error"]["message"], depth
    assert keyed.health()["status"] == "ok"


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("functions", [{"name": "f"}]), ("logit_bias", {"50": 100}),
                                          ("logprobs", True), ("tool_choice", "required")])
def test_row_15_fields_the_server_would_ignore_are_refused_by_name(keyed, victim, field, value):
    status, body, _ = chat(keyed, "victim", HI, **{field: value})
    assert status == 400 and body["error"]["param"] == field
    assert untouched(keyed, victim)


def test_row_15_the_developer_role_is_a_system_message(keyed, victim):
    messages = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello."}]
    status, reply, _ = chat(keyed, "dev", messages)
    assert status == 200
    info = keyed.request("GET", "/v1/sessions/dev", headers=ALPHA)[1]
    assert "system" in info["cached_text"] and "Answer in French." in info["cached_text"]


def test_row_15_response_format_constrains_the_reply_to_json(keyed, victim):
    client = openai.OpenAI(base_url=keyed.base_url, api_key="alpha-key", timeout=300, max_retries=0)
    reply = client.chat.completions.create(
        model=keyed.model_id, messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}], max_tokens=120,
        temperature=0, response_format={"type": "json_object"}, extra_headers={"X-Edgesink-Session": "json"})
    assert reply.choices[0].finish_reason == "stop" and isinstance(json.loads(reply.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    stream = client.chat.completions.create(
        model=keyed.model_id, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=120,
        temperature=0, stream=True,  # greedy: a sampled string may run on past max_tokens (sampling: test_grammar)
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    person = json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=keyed.model_id, messages=HI, response_format={"type": "yaml"})
    assert refused.value.body["param"].startswith("response_format")


# -- row 16: completions hold exactly what the client saw -------------------------------------------------------

def test_row_16_completions_take_back_the_stop_string_so_the_next_prompt_extends_the_text(keyed, victim):
    prompt = "1, 2, 3, 4, 5,"
    first = keyed.request("POST", "/v1/completions", {"model": keyed.model_id, "prompt": prompt, "max_tokens": 12,
                                                      "temperature": 0, "stop": [" 8"]},
                          {**ALPHA, "X-Edgesink-Session": "counting"})[1]
    returned = first["choices"][0]["text"]
    assert first["choices"][0]["finish_reason"] == "stop" and " 8" not in returned and returned
    cached = keyed.request("GET", "/v1/sessions/counting", headers=ALPHA)[1]["cached_text"]
    assert cached.endswith(prompt + returned)  # the stop string's tokens are not in the stream
    more = prompt + returned + " nine, ten,"
    second = keyed.request("POST", "/v1/completions", {"model": keyed.model_id, "prompt": more, "max_tokens": 3,
                                                       "temperature": 0}, {**ALPHA, "X-Edgesink-Session": "counting"})[1]
    assert second["edgesink"]["started_over"] is None and second["usage"]["prompt_tokens"] < 8
    cached = keyed.request("GET", "/v1/sessions/counting", headers=ALPHA)[1]["cached_text"]
    assert more in cached
    other = keyed.request("POST", "/v1/completions", {"model": keyed.model_id, "prompt": "Once upon a time",
                                                      "max_tokens": 2}, {**ALPHA, "X-Edgesink-Session": "counting"})[1]
    assert other["edgesink"]["started_over"] == "the prompt does not extend the conversation's text"


# -- row 13: reading a busy conversation never waits ----------------------------------------------------------

def test_row_13_get_on_a_busy_session_answers_at_once(keyed, victim):
    connection = http.client.HTTPConnection("127.0.0.1", keyed.port, timeout=120)
    body = {"model": keyed.model_id, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 2000,
            "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", body=json.dumps(body),
                       headers={"content-type": "application/json", "X-Edgesink-Session": "busy", **ALPHA})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    try:
        for _ in range(8):  # eight GETs while it generates: each answers from the last finished state
            status, info, _ = keyed.request("GET", "/v1/sessions/busy", headers=ALPHA)
            assert status == 200 and info["busy"] is True
        assert keyed.health()["running"] >= 1  # the generation went on meanwhile: nothing waited for it
    finally:
        connection.close()
    assert keyed.wait_for(lambda h: h["running"] == 0)["running"] == 0


# -- row 9: slow and silent clients ---------------------------------------------------------------------------

def test_row_9_silent_connections_are_closed_and_capped(keyed, victim):
    silent = [socket.create_connection(("127.0.0.1", keyed.port)) for _ in range(30)]
    try:
        status, body, _ = keyed.request("GET", "/v1/models", headers=ALPHA)
        assert status == 503  # over --max-connections 24
        for s in silent:
            s.settimeout(60)
        assert all(s.recv(1) == b"" for s in silent)  # closed by the server after --header-timeout
    finally:
        for s in silent:
            s.close()
    assert keyed.request("GET", "/v1/models", headers=ALPHA)[0] == 200


def test_row_9_a_body_that_trickles_in_times_out(keyed, victim):
    body = json.dumps({"model": keyed.model_id, "messages": HI}).encode()
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=60) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer alpha-key\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        answer = s.recv(4096)  # the rest never comes: after --body-timeout (3 s) the server answers
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


# -- /health checks what it says --------------------------------------------------------------------------------

def test_health_reports_a_sessions_folder_that_cannot_be_written(keyed, victim):
    health = keyed.health()
    assert health["status"] == "ok" and health["problems"] == []
    sessions = keyed.folder / "sessions"
    moved = keyed.folder / "moved-away"
    sessions.rename(moved)
    try:
        status, health, _ = keyed.request("GET", "/health")
        assert status == 503 and health["status"] == "unavailable"
        assert any("sessions folder" in p for p in health["problems"])
        assert str(keyed.folder) not in json.dumps(health)  # row 14: no server paths
    finally:
        moved.rename(sessions)
    assert keyed.request("GET", "/health")[0] == 200


# -- rows 8 and 18: the queue counts only those that wait; each unnamed client its own -------------------------------

@pytest.fixture(scope="module")
def open_server(model_path, tmp_path_factory):
    """No keys, no sessions folder, two slots, no queue at all."""
    folder = tmp_path_factory.mktemp("open")
    process = ServeProcess(model_path, *FAST, "--slots", "2", "--max-queue", "0", log_path=folder / "serve.log").start()
    process.model_id = process.request("GET", "/v1/models")[1]["data"][0]["id"]
    yield process
    assert process.stop() == 0, process.log()


def test_row_8_requests_that_get_a_slot_at_once_are_not_queued(open_server):
    answers = []
    go = threading.Barrier(2)

    def ask(i):
        go.wait()
        answers.append(chat(open_server, f"q{i}", HI, key={}, max_tokens=16)[0])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [200, 200]  # --max-queue 0 refused every request before


def test_a_slot_freed_by_lru_is_saved_without_a_sessions_folder(open_server):
    """Three names alternate on two slots: each turn frees another's slot (saved to the temporary
    folder), and each name's next turn is restored and feeds only its new message."""
    histories = {name: [{"role": "system", "content": f"The password is {name}."}] for name in ("ann", "ben", "cy")}
    for turn in range(3):
        for name, history in histories.items():
            history.append({"role": "user", "content": f"Question {turn}?"})
            status, reply, _ = chat(open_server, name, history, key={}, max_tokens=8)
            assert status == 200 and reply["edgesink"]["started_over"] is None
            assert reply["edgesink"]["reused_messages"] == (len(history) - 1 if turn else 0)
            if turn:
                assert reply["usage"]["prompt_tokens"] < 20  # the question, not the history again
            history.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    for name in histories:
        info = open_server.request("GET", f"/v1/sessions/{name}")[1]
        if info["live"]:
            assert f"The password is {name}." in info["cached_text"]


# -- rows 2, 3 and 4: cancelled prompts and generations, shutdown ------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (all its threads), from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post_and_leave(server, path, body, headers, *, until):
    """Send a request, wait until ``until(health)``, then disconnect; the CPU time the server spent after."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json", **headers})
    assert until(server.wait_for(until))
    time.sleep(1.0)  # well into the work
    before = cpu_seconds(server.proc.pid)
    connection.close()
    assert server.wait_for(lambda h: h["running"] == 0)["running"] == 0
    return cpu_seconds(server.proc.pid) - before


HUNDRED_KB = "The lighthouse keeper counted the waves and wrote each one down. " * 1600


@pytest.mark.slow(seconds=60)
def test_rows_2_4_a_client_that_leaves_stops_its_prompt_and_its_generation(model_path, tmp_path, measured):
    server = ServeProcess(model_path, "--n-ctx", "512", "--threads", "1", "--max-prompt-tokens", "100000",
                         "--sessions", str(tmp_path / "sessions"), log_path=tmp_path / "serve.log").start()
    model_id = server.request("GET", "/v1/models")[1]["data"][0]["id"]
    assert len(HUNDRED_KB) > 100_000
    held = [{"role": "user", "content": "Remember: the harbour is blue."}]
    status, reply, _ = server.request("POST", "/v1/chat/completions", {"model": model_id, "messages": held,
                                      "max_tokens": 4, "temperature": 0}, {"X-Edgesink-Session": "keeper"})
    assert status == 200
    held.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    for stream in (True, False):
        spent = post_and_leave(server, "/v1/chat/completions",
                               {"model": model_id, "messages": held + [{"role": "user", "content": HUNDRED_KB}],
                                "max_tokens": 4, "stream": stream},
                               {"X-Edgesink-Session": "keeper"}, until=lambda h: h["running"] == 1)
        measured(f"CPU after a 100 KB prompt's client left (stream={stream})", f"{spent:.3f} s")
        assert spent < 1.0
        # Dropped unsaved: the snapshot from before the prompt is what the conversation is.
        assert server.request("GET", "/v1/sessions/keeper")[1] == {"name": "keeper", "live": False, "saved": True}
        held.append({"role": "user", "content": "What colour is the harbour?"})
        status, reply, _ = server.request("POST", "/v1/chat/completions", {"model": model_id, "messages": held,
                                          "max_tokens": 4, "temperature": 0}, {"X-Edgesink-Session": "keeper"})
        assert status == 200 and reply["edgesink"] == {"session": "keeper", "reused_messages": len(held) - 1,
                                                       "started_over": None}
        held.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    # A non-streaming generation stops too when its client leaves (row 4).
    spent = post_and_leave(server, "/v1/completions", {"model": model_id, "prompt": "1, 2, 3, 4, 5,",
                                                       "max_tokens": 4000, "temperature": 0},
                           {"X-Edgesink-Session": "counter"}, until=lambda h: h["running"] == 1)
    info = server.request("GET", "/v1/sessions/counter")[1]
    assert info["tokens_seen"] < 1000 and spent < 1.0  # ~30 s of generation left when it stopped
    assert server.stop() == 0


@pytest.mark.slow(seconds=60)
def test_rows_3_7_shutdown_within_its_deadline_and_a_restart_with_another_n_ctx(model_path, tmp_path, measured):
    sessions = tmp_path / "sessions"
    first = ServeProcess(model_path, *FAST, "--sessions", str(sessions), "--max-prompt-tokens", "100000",
                         "--shutdown-timeout", "5", log_path=tmp_path / "first.log").start()
    model_id = first.request("GET", "/v1/models")[1]["data"][0]["id"]
    history = [{"role": "user", "content": "My name is Ada."}]
    status, reply, _ = first.request("POST", "/v1/chat/completions", {"model": model_id, "messages": history,
                                     "max_tokens": 6, "temperature": 0}, {"X-Edgesink-Session": "ada"})
    assert status == 200
    seen = first.request("GET", "/v1/sessions/ada")[1]["tokens_seen"]
    connection = http.client.HTTPConnection("127.0.0.1", first.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": model_id, "messages": [{"role": "user", "content": HUNDRED_KB}], "stream": True}),
        headers={"content-type": "application/json", "X-Edgesink-Session": "long"})
    assert first.wait_for(lambda h: h["running"] == 1)["running"] == 1
    time.sleep(1.0)
    start = time.monotonic()
    os.kill(first.proc.pid, signal.SIGTERM)
    code = first.proc.wait(timeout=60)
    took = time.monotonic() - start
    measured("SIGTERM to exit with a 100 KB prompt in flight (--shutdown-timeout 5)", f"{took:.2f} s")
    assert code == 0 and took < 5.0, first.log()
    connection.close()

    second = ServeProcess(model_path, "--n-ctx", "512", "--threads", "1", "--sessions", str(sessions),
                          log_path=tmp_path / "second.log").start()
    history.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    history.append({"role": "user", "content": "What is my name?"})
    status, answer, headers = second.request("POST", "/v1/chat/completions", {
        "model": model_id, "messages": history, "max_tokens": 6}, {"X-Edgesink-Session": "ada"})
    assert status == 200 and headers["x-edgesink-started-over"] == "1"
    reason = answer["edgesink"]["started_over"]
    assert reason.startswith("its saved session could not be restored here") and "n_ctx" in reason
    assert str(tmp_path) not in reason  # row 14: the server's paths stay its own
    info = second.request("GET", "/v1/sessions/ada")[1]
    assert info["tokens_seen"] > seen and "My name is Ada." in info["cached_text"]  # the history, fed afresh
    history += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                {"role": "user", "content": "Thanks."}]
    status, answer, _ = second.request("POST", "/v1/chat/completions", {
        "model": model_id, "messages": history, "max_tokens": 4}, {"X-Edgesink-Session": "ada"})
    assert status == 200 and answer["edgesink"]["started_over"] is None  # no error loop: it goes on
    assert second.stop() == 0


def test_row_17_a_claim_waits_for_a_held_victim_without_spinning(model):
    """With the only slot's idle session locked by someone else, a request needing the slot waits
    sleeping (it used to spin at full speed, holding the claim)."""
    import resource

    from edgesink import SessionConfig
    from edgesink.serve import SessionPool

    config = SessionConfig.of(n_ctx=256, shift_mode="window-back", n_threads=1)
    pool = SessionPool(model, config, slots=1, sessions_dir=None)
    try:
        first = pool.conversation("", "first")
        with pool.using(first) as session:
            session.feed("Hello there.")
        second, done = pool.conversation("", "second"), threading.Event()

        def claim():
            with pool.using(second) as session:
                session.feed("Hi.")
            done.set()

        with first.lock:  # held elsewhere (a describe, say): the victim cannot be freed yet
            worker = threading.Thread(target=claim)
            worker.start()
            before = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(1.0)
            after = resource.getrusage(resource.RUSAGE_SELF)
            assert not done.is_set()
        worker.join(60)
        assert done.is_set() and first.session is None  # freed (saved) once its lock was let go
        spent = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert spent < 0.3, f"{spent:.2f} s of CPU in 1 s of waiting"
    finally:
        pool.close()


@pytest.mark.slow(seconds=30)
def test_row_12_snapshots_are_kept_under_their_byte_limit(model_path, tmp_path):
    sessions = tmp_path / "sessions"
    server = ServeProcess(model_path, *FAST, "--slots", "1", "--sessions", str(sessions),
                          "--sessions-max-bytes", str(1), log_path=tmp_path / "serve.log").start()
    model_id = server.request("GET", "/v1/models")[1]["data"][0]["id"]
    for name in ("a1", "a2", "a3"):
        assert server.request("POST", "/v1/chat/completions", {"model": model_id, "messages": HI, "max_tokens": 2},
                              {"X-Edgesink-Session": name})[0] == 200
    # Only the live session's snapshot may stay over the limit; the idle ones were removed, oldest first.
    assert [p.name for p in sessions.glob("*.session")] == ["a3.session"]
    assert "removed the snapshot" in server.log()
    assert server.stop() == 0
