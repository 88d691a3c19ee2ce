"""fastgpt serve, end to end: the real server in a subprocess on a free 127.0.0.1 port (started as a user
starts it), talked to with the openai client and raw HTTP.

One server per module serves most tests (the bundled model, CPU, fp32, a chat template file); a second,
tiny one (--max-num-seqs 1 --max-queue 1, an API key) serves the key and queue-full tests; the SIGTERM
test starts its own. Greedy texts are checked against the offline engine on the same prompts, run in
this process on the same (plain PyTorch) path as the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from benchmarks.serve_process import ServerProcess, httpx, metrics, process_tree, rss_bytes  # noqa: E402

MODEL = "fastgpt-test"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["The os module", "def main():", "import sys\n", "class Foo", "Return the", "# A comment about",
           "for i in range(", "The quick brown fox"]
BODY_LIMIT = 65536
MAX_NUM_SEQS = 64


@pytest.fixture(scope="module")
def chat_template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "chat.jinja"
    path.write_text(CHAT_TEMPLATE)
    return str(path)


@pytest.fixture(scope="module")
def server(chat_template_file):
    with ServerProcess("--device", "cpu", "--dtype", "float32", "--num-blocks", "1024",
                       "--served-model-name", MODEL, "other-name",
                       "--chat-template", chat_template_file, "--max-num-seqs", str(MAX_NUM_SEQS),
                       "--max-body-bytes", str(BODY_LIMIT)) as proc:
        yield proc


@pytest.fixture(scope="module")
def small_server():
    """One running sequence, one waiting; a key."""
    with ServerProcess("--device", "cpu", "--num-blocks", "64", "--max-num-seqs", "1", "--max-queue", "1",
                       "--api-key", "sesame") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline():
    """fastgpt's offline engine on the bundled model, on the path the server runs (kernels.reference)."""
    from fastgpt import Engine

    engine = Engine.from_pretrained(device="cpu", dtype="float32")

    def generate(prompts, params):
        # one thread, as the server on this 2-core machine (and a CPU shared with the server runs
        # far faster so)
        previous, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
        os.environ["TRITON_INTERPRET"] = "0"
        torch.set_num_threads(1)
        try:
            return engine.generate(prompts, params)
        finally:
            torch.set_num_threads(threads)
            if previous is None:
                os.environ.pop("TRITON_INTERPRET")
            else:
                os.environ["TRITON_INTERPRET"] = previous

    generate.engine = engine
    return generate


def _greedy(max_tokens, **kw):
    from fastgpt import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def _post(url, path, body, **kw):
    return httpx.post(url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, timeout=60, **kw)


def _sse_events(response) -> list:
    """The data payloads of an SSE response, [DONE] as the string "[DONE]"; checks the framing."""
    text = response.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


# ----------------------------------------------------------------------------------------- basics
def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    listed = client.models.list()
    assert [m.id for m in listed.data] == [MODEL, "other-name"]
    assert listed.data[0].owned_by == "fastgpt"


def test_greedy_completion_equals_offline_engine(server, client, offline):
    from fastgpt import Tokenizer, default_model_dir

    tok = Tokenizer.from_pretrained(default_model_dir())
    expected = offline(PROMPTS[:3], _greedy(24))
    for prompt, want in zip(PROMPTS[:3], expected):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == MODEL
        choice = got.choices[0]
        assert choice.text == want.outputs[0].text
        assert choice.finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(tok.encode(prompt))
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    # the other served name, and a prompt of token ids, reach the same engine
    ids = tok.encode(PROMPTS[0])
    got = client.completions.create(model="other-name", prompt=ids, max_tokens=24, temperature=0)
    assert got.choices[0].text == expected[0].outputs[0].text and got.model == "other-name"


def test_batch_of_prompts_and_n_index_choices(client, offline):
    expected = offline(PROMPTS[:2], _greedy(8))
    got = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [expected[0].outputs[0].text] * 2 + [expected[1].outputs[0].text] * 2
    assert got.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected) * 2


def test_streaming_matches_non_streaming(server):
    body = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    whole = _post(server.url, "/v1/completions", body).json()
    r = _post(server.url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r)
    chunks, last = events[:-1], events[-1]
    assert chunks and all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
    assert all(e["usage"] is None and len(e["choices"]) == 1 for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == whole["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    # without include_usage: no usage key at all, and the same text
    events = _sse_events(_post(server.url, "/v1/completions", {**body, "stream": True}))
    assert all("usage" not in e for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]


def test_openai_client_streams(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0)
    parts = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


# ----------------------------------------------------------------------------------- sampling
def test_seed_repeats_and_samples_differ(client):
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=1.0, n=3, seed=1234)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    c = [c.text for c in client.completions.create(**{**kw, "seed": 99}).choices]
    assert a == b  # same seed, same texts
    assert len(set(a)) > 1  # the n samples have generators of their own
    assert a != c
    # a seeded sample does not depend on what runs beside it: alone it gives the same text
    alone = client.completions.create(**{**kw, "n": 1}).choices[0].text
    assert alone == a[0]


def test_stop_string_ends_the_text(client):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert len(stop) == 3
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "zzzq"])
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == free[:free.index(stop)]
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in streamed) == free[:free.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_in_openai_format(client):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=10, temperature=0, logprobs=3)
    choice = got.choices[0]
    lp = choice.logprobs
    n = got.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    if choice.finish_reason == "length" and "\ufffd" not in "".join(lp.tokens):
        assert "".join(lp.tokens) == choice.text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4 and top[token] == value
        assert value == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the likeliest
    zero = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4, temperature=0, logprobs=0)
    assert all(len(t) == 1 for t in zero.choices[0].logprobs.top_logprobs)


def test_echo_and_prompt_logprobs(server, client, offline):
    from fastgpt import Tokenizer, default_model_dir

    tok = Tokenizer.from_pretrained(default_model_dir())
    got = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0)
    assert got.choices[0].text == PROMPTS[4] + plain.choices[0].text
    # the log-probabilities echo gives a prompt's tokens are those the engine gave when it generated them
    gen = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    prompt_ids = tok.encode(PROMPTS[4])
    generated = offline([PROMPTS[4]], _greedy(5, ignore_eos=True))[0].outputs[0].token_ids
    echoed = client.completions.create(model=MODEL, prompt=prompt_ids + generated, max_tokens=1, temperature=0,
                                       logprobs=2, echo=True)
    lp = echoed.choices[0].logprobs
    P = len(prompt_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == P + 5 + 1
    assert lp.token_logprobs[P:P + 5] == pytest.approx(gen.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # streamed echo: the prompt first, then the text
    r = _post(server.url, "/v1/completions", dict(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0,
                                                  echo=True, stream=True))
    events = _sse_events(r)
    assert events[0]["choices"][0]["text"] == PROMPTS[4]
    assert "".join(e["choices"][0]["text"] for e in events) == got.choices[0].text


def test_top_k_and_ignore_eos(client):
    one = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=12, temperature=1.5, seed=3,
                                    extra_body={"top_k": 1})
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=12, temperature=0)
    assert one.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy whatever the temperature
    full = client.completions.create(model=MODEL, prompt=[0], max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 40 and full.choices[0].finish_reason == "length"


# --------------------------------------------------------------------------------------- chat
def test_chat_completion_renders_the_template(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    rendered = "system: Be brief.\nuser: Hello there\nassistant:"
    plain = client.completions.create(model=MODEL, prompt=rendered, max_tokens=12, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage == plain.usage
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert stream[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == plain.choices[0].finish_reason
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == plain.usage.completion_tokens
    # content as a list of text parts; logprobs in chat's format
    lp = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                               {"type": "text", "text": " there"}]}])
    entries = lp.choices[0].logprobs.content
    assert len(entries) == lp.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)
    assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in entries)


# -------------------------------------------------------------------------------- concurrency
def test_32_concurrent_streams_are_independent(server, offline):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    max_tokens = [4 + (7 * i) % 13 for i in range(32)]
    expected = offline(prompts, [_greedy(m) for m in max_tokens])

    async def one(aclient, prompt, m):
        text, reasons = "", []
        async for chunk in await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=m, temperature=0,
                                                            stream=True):
            text += chunk.choices[0].text
            reasons.append(chunk.choices[0].finish_reason)
        return text, reasons[-1]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(aclient, p, m) for p, m in zip(prompts, max_tokens)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    for (text, reason), want in zip(results, expected):
        assert (text, reason) == (want.outputs[0].text, want.outputs[0].finish_reason)


# ------------------------------------------------------------------------------------- errors
ERROR_ROWS = [  # (id, path, raw body or dict, status, param)
    ("malformed-json", "/v1/completions", b'{"prompt": "x",', 400, None),
    ("json-not-object", "/v1/completions", b'["x"]', 400, None),
    ("nan", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("empty-body", "/v1/completions", b"", 400, None),
    ("missing-prompt", "/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("wrong-type", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("bool-as-int", "/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("temperature-range", "/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("top-p-range", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top-k-range", "/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("max-tokens-zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("n-zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("n-too-large", "/v1/completions", {"prompt": "x", "n": 129}, 400, "n"),
    ("n-past-max-num-seqs", "/v1/completions", {"prompt": "x", "n": MAX_NUM_SEQS + 1}, 400, "n"),
    ("logprobs-too-large", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("seed-range", "/v1/completions", {"prompt": "x", "seed": 1 << 64}, 400, "seed"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty-prompt-list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty-ids", "/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("mixed-prompt", "/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("id-outside-vocab", "/v1/completions", {"prompt": [1, 4096]}, 400, "prompt"),
    ("negative-id", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("surrogate", "/v1/completions", b'{"prompt": "bad \\ud800 text"}', 400, "prompt"),
    ("context-exceeded", "/v1/completions", {"prompt": [1] * 200, "max_tokens": 100}, 400, "max_tokens"),
    ("prompt-fills-context", "/v1/completions", {"prompt": [1] * 256}, 400, "prompt"),
    ("too-many-stops", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty-stop", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("unsupported-penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("unknown-model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("model-as-path", "/v1/completions", {"prompt": "x", "model": "/etc/passwd"}, 404, "model"),
    ("chat-no-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("chat-bad-role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("chat-image", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    ("chat-top-logprobs-range", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat-unknown-model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "m"},
     404, "model"),
    ("body-too-large", "/v1/completions", {"prompt": "x" * (BODY_LIMIT + 1)}, 413, None),
]


def _check_error(r, status, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    return err


@pytest.mark.parametrize("path,body,status,param", [r[1:] for r in ERROR_ROWS], ids=[r[0] for r in ERROR_ROWS])
def test_error_rows(server, path, body, status, param):
    _check_error(_post(server.url, path, body), status, param)
    assert httpx.get(server.url + "/health").status_code == 200


def test_errors_of_the_http_layer(server, small_server):
    r = httpx.get(server.url + "/v1/nothing-here")
    _check_error(r, 404, None)
    _check_error(httpx.get(server.url + "/v1/completions"), 405, None)
    # a body over the limit that announces no length (chunked) is cut off as it streams in
    chunks = (b"x" * 8192 for _ in range(2 * BODY_LIMIT // 8192))
    r = httpx.post(server.url + "/v1/completions", content=chunks, headers={"content-type": "application/json"})
    _check_error(r, 413, None)
    # a template that raises on the messages it gets is the request's fault (here: no template at all)
    r = _post(small_server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
              headers={"authorization": "Bearer sesame"})
    assert _check_error(r, 400, "messages")["code"] == "no_chat_template"
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key(small_server):
    url = small_server.url
    assert httpx.get(url + "/health").status_code == 200  # probes stay open
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sesame"},
                    {"authorization": "Basic sesame"}, {"authorization": "Bearer sesame-and-more"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert _check_error(r, 401, None)["code"] == "invalid_api_key"
    # the key is checked before the body is even read
    _check_error(_post(url, "/v1/completions", b"{not json"), 401, None)
    keyed = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
    assert keyed.completions.create(model=keyed.models.list().data[0].id, prompt="Hi", max_tokens=2).usage
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_answers_503(small_server):
    """Capacity 2 (one running, one waiting): of 6 long requests sent at once, the first two run one after
    the other (each takes ~250 steps) and the others are refused at once, not queued."""
    url, auth = small_server.url, {"authorization": "Bearer sesame"}
    body = dict(prompt=[0], max_tokens=250, temperature=0, ignore_eos=True, stream=True)

    async def one(c):
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.headers.get("retry-after"), r.json()
            lines = [line async for line in r.aiter_lines() if line]
            return 200, None, lines[-1]

    async def main():
        async with httpx.AsyncClient(timeout=120, headers=auth) as c:
            return await asyncio.gather(*(one(c) for _ in range(6)))

    results = asyncio.run(main())
    refused = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert len(refused) + len(served) == 6 and len(served) >= 2 and len(refused) >= 3, results
    for _, retry_after, body_ in refused:
        assert retry_after == "1" and body_["error"]["code"] == "queue_full"
    assert all(last == "data: [DONE]" for _, _, last in served)
    _wait_idle(url)
    assert httpx.get(url + "/health").status_code == 200


# -------------------------------------------------------------------------------- disconnects
def _wait_idle(url, timeout_s=30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url)
        busy = (m["fastgpt_requests_running"] + m["fastgpt_requests_waiting"] + m["fastgpt_kv_blocks_used"]
                + m["fastgpt_samples_in_flight"])
        if busy == 0:
            return m
        assert time.monotonic() < deadline, f"engine not idle after {timeout_s} s: {m}"
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_blocks(server):
    before = _wait_idle(server.url).get('fastgpt_request_aborts_total{reason="disconnect"}', 0)
    body = dict(model=MODEL, prompt=PROMPTS[7], max_tokens=200, temperature=0, ignore_eos=True, stream=True)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            m = metrics(server.url)
            assert m["fastgpt_requests_running"] == 1 and m["fastgpt_kv_blocks_used"] > 0
        # leaving the block closed the connection mid-stream
    m = _wait_idle(server.url)
    assert m['fastgpt_request_aborts_total{reason="disconnect"}'] == before + 1
    # a client that times out waiting for a non-streamed answer frees its blocks too. Three samples of 200
    # tokens take ~0.6 s on the 2-core CI machine (one took 0.3 s once the batched products were packed,
    # under the 0.5 s this used to wait), and the server hears of the disconnect at once
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "n": 3}, timeout=0.1)
    m = _wait_idle(server.url)
    assert m['fastgpt_request_aborts_total{reason="disconnect"}'] == before + 2
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_count_tokens_and_statuses(server, client):
    before = metrics(server.url)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=7, temperature=0, n=2)
    _post(server.url, "/v1/completions", {"prompt": "x", "n": 0})
    after = metrics(server.url)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta("fastgpt_generation_tokens_total") == got.usage.completion_tokens
    assert delta("fastgpt_prompt_tokens_total") == got.usage.prompt_tokens
    assert delta('fastgpt_http_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert delta('fastgpt_http_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert delta("fastgpt_time_to_first_token_seconds_count") == 1
    assert delta("fastgpt_time_per_output_token_seconds_count") == 2  # one per sample
    assert after["fastgpt_kv_blocks_total"] > 0


class _Faulty:
    """The engine, with faults on demand: add_request fails for one prompt, step fails once when armed."""

    BAD_PROMPT = [7, 7, 7]

    def __init__(self, engine):
        self._engine = engine
        self.fail_next_step = self.stall_next_step = False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def add_request(self, request_id, prompt, params=None):
        if prompt == self.BAD_PROMPT:
            raise RuntimeError("injected fault")
        return self._engine.add_request(request_id, prompt, params)

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step fault")
        if self.stall_next_step:  # as if nothing could be scheduled: no step taken
            self.stall_next_step = False
            return []
        return self._engine.step()


def test_an_engine_fault_fails_only_its_requests(offline, reference_path):
    """In process: the engine loop turns an exception in add_request into a 500 for that request alone,
    and one in a step (or a step that schedules nothing) into a 500 for the requests in it; the loop goes
    on serving."""
    from fastgpt.serve.engine_loop import EngineLoop
    from fastgpt.serve.errors import APIError

    engine = _Faulty(offline.engine)
    params = _greedy(6)
    want = offline([[1, 2, 3]], params)[0].outputs[0].text

    async def result(loop, prompt):
        queue = asyncio.Queue()
        stream = loop.submit(prompt, params, queue)
        try:
            while True:
                _, item = await asyncio.wait_for(queue.get(), 60)
                stream.take(item)
                if item.finished:
                    return item.outputs[0].text
        except APIError as e:
            return e.status
        finally:
            stream.close()

    async def main():
        loop = EngineLoop(engine, max_queue=4)
        loop.start(asyncio.get_running_loop())
        try:
            first = await asyncio.gather(result(loop, _Faulty.BAD_PROMPT), result(loop, [1, 2, 3]))
            engine.fail_next_step = True
            second = await result(loop, [1, 2, 3])
            engine.stall_next_step = True
            stalled = await result(loop, [1, 2, 3])
            third = await result(loop, [1, 2, 3])
            return first, (second, stalled), third, loop.alive, loop.in_flight
        finally:
            loop.stop()

    first, second, third, alive, in_flight = asyncio.run(main())
    assert first == [500, want]
    assert second == (500, 500) and third == want
    assert alive and in_flight == 0
    assert not offline.engine.has_unfinished_requests()
    assert offline.engine.block_manager.num_free_blocks == offline.engine.num_blocks


# ----------------------------------------------------------------------------------- shutdown
@pytest.mark.parametrize("engine_where", ["process", "thread"])
def test_sigterm_drains_in_flight_requests_and_exits_0(engine_where):
    """Either way the engine runs (its own process, the default, or --engine-thread), SIGTERM lets the
    stream in flight finish, exits 0, and leaves no engine process behind."""
    import threading

    extra = ["--engine-thread"] if engine_where == "thread" else []
    with ServerProcess("--device", "cpu", "--num-blocks", "64", "--grace-period", "60", *extra,
                       env={"FASTGPT_API_KEY": "k"}) as proc:
        assert len(_engine_pids(proc.pid)) == (1 if engine_where == "process" else 0), proc.log()
        helpers = process_tree(proc.pid)[1:]  # the engine process, multiprocessing's resource tracker
        url, auth = proc.url, {"authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the environment
        result = {}
        first_chunk = threading.Event()

        def stream():
            body = dict(prompt=[0], max_tokens=60, temperature=0, ignore_eos=True, stream=True)
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=120) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first_chunk.set()
            result["lines"] = lines

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(60)
        code = proc.terminate(timeout_s=90)
        t.join(30)
        assert code == 0, proc.log()
        data = [line for line in result["lines"] if line]
        assert data[-1] == "data: [DONE]"
        tokens = sum(len(json.loads(line[6:])["choices"][0]["text"]) > 0 for line in data[:-1])
        assert tokens > 0 and json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.TransportError):  # it no longer listens
            httpx.get(url + "/health", timeout=5)
        assert all(_gone(pid) for pid in helpers)


def _engine_pids(server_pid: int) -> list[int]:
    """The server's engine process (multiprocessing's spawned child; not its resource tracker)."""
    found = []
    for pid in process_tree(server_pid)[1:]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    """True once pid has exited (a zombie counts: it runs nothing), waiting up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("State:") and "Z" in line.split()[1] for line in f):
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_engine_process_death_fails_its_requests_and_health():
    """The engine process killed mid-stream: the stream ends with an OpenAI error body and [DONE], /health
    and new requests get 503 (engine_dead), and the server still exits 0 on SIGTERM."""
    import signal
    import threading

    with ServerProcess("--device", "cpu", "--num-blocks", "64") as proc:
        (engine_pid,) = _engine_pids(proc.pid)
        first_chunk, lines = threading.Event(), []

        def stream():
            body = dict(prompt=[0], max_tokens=250, temperature=0, ignore_eos=True, stream=True)
            with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first_chunk.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(60)
        os.kill(engine_pid, signal.SIGKILL)
        t.join(60)
        data = [line for line in lines if line]
        assert data[-1] == "data: [DONE]"
        error = json.loads(data[-2][6:])["error"]
        assert error["code"] == "engine_error" and "engine process exited" in error["message"]
        health = httpx.get(proc.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        r = _post(proc.url, "/v1/completions", dict(prompt="hi", max_tokens=2))
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert proc.terminate(timeout_s=60) == 0, proc.log()


def test_a_corrupt_checkpoint_is_one_line_from_the_engine_process(tmp_path):
    """The weights load in the engine process; what went wrong there is the CLI's one line, naming the file."""
    import shutil
    import subprocess
    import sys

    from fastgpt import default_model_dir

    broken = tmp_path / "broken"
    shutil.copytree(default_model_dir(), broken)
    (broken / "model.safetensors").write_bytes(os.urandom(100))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "fastgpt", "serve", "--port", "0", "--model", str(broken),
                        "--device", "cpu"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2  # the CLI's code for a user error
    errors = [line for line in r.stderr.splitlines() if line.startswith("fastgpt: error:")]
    assert len(errors) == 1 and str(broken / "model.safetensors") in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_killed_server_leaves_no_engine_process():
    """SIGKILL gives the server no chance to stop its engine: the engine process sees its command pipe
    close and leaves by itself."""
    with ServerProcess("--device", "cpu", "--num-blocks", "64") as proc:
        assert len(_engine_pids(proc.pid)) == 1
        helpers = process_tree(proc.pid)[1:]
        proc.proc.kill()
        proc.proc.wait(30)
        assert all(_gone(pid) for pid in helpers), f"{helpers} outlived their server"


# -------------------------------------------------------------------------------------- soak
@pytest.mark.slow
def test_soak_disconnects_and_bad_requests_leave_nothing_behind(server):
    """300 requests, 16 at a time: streamed and not, a fifth abandoned mid-stream, a fifth malformed.
    Afterwards every KV block is free, nothing runs or waits, and the RSS (the server's and its engine
    process's) has grown by < 64 MiB."""
    import random

    rng = random.Random(0)
    bad = [r for r in ERROR_ROWS if r[3] == 400]

    async def one(c, sem, i):
        async with sem:
            kind = rng.random()
            if kind < 0.2:
                _, path, body, status, _ = rng.choice(bad)
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = await c.post(server.url + path, content=content, headers={"content-type": "application/json"})
                assert r.status_code == status
                return "bad"
            body = dict(model=MODEL, prompt=rng.choice(PROMPTS), max_tokens=rng.randint(1, 24),
                        temperature=rng.choice([0, 0.8]), n=rng.choice([1, 1, 2]), ignore_eos=rng.random() < 0.3)
            if kind < 0.4:  # abandoned after the first chunk
                async with c.stream("POST", server.url + "/v1/completions", json={**body, "stream": True,
                                                                                 "max_tokens": 200}) as r:
                    async for _ in r.aiter_lines():
                        break
                return "abandoned"
            if kind < 0.7:
                async with c.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
                    lines = [line async for line in r.aiter_lines() if line]
                assert lines[-1] == "data: [DONE]"
                return "streamed"
            r = await c.post(server.url + "/v1/completions", json=body)
            assert r.status_code == 200 and len(r.json()["choices"]) == body["n"]
            return "whole"

    async def run(count):
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(one(c, sem, i) for i in range(count)))

    asyncio.run(run(40))  # warm-up: allocator pools and caches reach their working size
    _wait_idle(server.url)
    rss_before = rss_bytes(server.pid)
    deadline = time.monotonic() + 240
    kinds = asyncio.run(run(300))
    assert time.monotonic() < deadline
    assert {"bad", "abandoned", "streamed", "whole"} <= set(kinds)
    m = _wait_idle(server.url)
    assert m["fastgpt_kv_blocks_used"] == 0
    growth = rss_bytes(server.pid) - rss_before
    assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------------------- in process
def test_output_deltas_rebuild_every_output(offline, reference_path):
    """What crosses the engine process's pipe: each step's outputs as deltas (pickled, as the pipe does),
    rebuilt on the server's side, equal the engine's own cumulative outputs at every step; with n
    samples that appear after the first token, logprobs, a stop string and a length finish."""
    import pickle

    from fastgpt import SamplingParams
    from fastgpt.serve.engine_process import Cumulative, DeltaEncoder

    engine = offline.engine
    requests = {"a": ([1, 2, 3], SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=12, logprobs=2)),
                "b": ([4, 5], SamplingParams(temperature=0, max_tokens=9, stop=["\n", " the"])),
                "c": ([6] * 20, SamplingParams(temperature=0.7, seed=1, max_tokens=5, ignore_eos=True))}
    encoder, rebuilt, finished = DeltaEncoder(), {}, set()
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
        rebuilt[rid] = Cumulative(rid, ids)
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            _, rid, done, deltas = pickle.loads(pickle.dumps(encoder.encode(out)))
            assert rebuilt[rid].extend(done, deltas) == out
            if done:
                finished.add(rid)
    assert finished == set(requests) and steps > 5
    assert encoder._sent == {}  # nothing kept for finished requests


def test_chat_template_sources_and_sandbox(tmp_path):
    from fastgpt.serve.chat import load_chat_template
    from fastgpt.serve.errors import APIError

    msgs = [{"role": "user", "content": "hi"}]
    config = {"eos_token": {"content": "<|endoftext|>"},
              "chat_template": [{"name": "tool_use", "template": "tools"},
                                {"name": "default", "template": "{{ messages[0].content }}{{ eos_token }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(str(tmp_path)).render(msgs) == "hi<|endoftext|>"  # the list's "default" entry
    (tmp_path / "chat_template.jinja").write_text("J:{{ messages|length }}")
    assert load_chat_template(str(tmp_path)).render(msgs) == "J:1"  # the .jinja file comes first
    given = tmp_path / "given.jinja"
    given.write_text("{% if messages[-1].role != 'user' %}{{ raise_exception('last must be user') }}{% endif %}ok")
    template = load_chat_template(str(tmp_path), str(given))  # --chat-template wins over both
    assert template.render(msgs) == "ok"
    with pytest.raises(APIError, match="last must be user") as e:
        template.render([{"role": "assistant", "content": "x"}])
    assert e.value.status == 400 and e.value.param == "messages"
    # the sandbox: no way from a template to Python's internals
    escape = tmp_path / "escape.jinja"
    escape.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(APIError) as e:
        load_chat_template(str(tmp_path), str(escape)).render(msgs)
    assert e.value.status == 400
    with pytest.raises(ValueError, match="not a valid Jinja2"):
        (tmp_path / "broken.jinja").write_text("{% for %}")
        load_chat_template(str(tmp_path), str(tmp_path / "broken.jinja"))
    assert load_chat_template(str(tmp_path / "nothing-here")) is None


def test_a_taken_port_is_one_line_error():
    import socket
    import subprocess
    import sys

    from benchmarks.serve_process import REPO_ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fastgpt", "serve", "--port", str(port)], capture_output=True,
                           text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"fastgpt: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_bench_serve_metrics_follow_vllm_definitions():
    from benchmarks.bench_serve import RequestResult, median_runs, serving_metrics

    a = RequestResult(success=True, prompt_len=5, output_tokens=4, ttft=0.1, latency=0.7, itl=[0.2, 0.2, 0.2])
    b = RequestResult(success=True, prompt_len=3, output_tokens=1, ttft=0.3, latency=0.3, itl=[])
    failed = RequestResult(error="HTTP 503")
    m = serving_metrics([a, b, failed], duration=2.0)
    assert (m["completed"], m["failed"], m["total_input"], m["total_output"]) == (2, 1, 8, 5)
    assert m["request_throughput"] == pytest.approx(1.0) and m["output_throughput"] == pytest.approx(2.5)
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_ttft_ms"] == pytest.approx(200)
    # TPOT: (latency - ttft) / (tokens - 1), only over requests with more than one token
    assert m["mean_tpot_ms"] == pytest.approx(200) and m["p99_tpot_ms"] == pytest.approx(200)
    assert m["mean_itl_ms"] == pytest.approx(200)  # pooled gaps
    assert m["mean_e2el_ms"] == pytest.approx(500) and m["first_error"] == "HTTP 503"
    runs = [{"peer": "p", "rate": 1.0, "output_throughput": v} for v in (3.0, 1.0, 2.0)]
    assert median_runs(runs)[0]["output_throughput"] == 2.0
