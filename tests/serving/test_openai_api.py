"""The OpenAI-compatible HTTP API (serving/openai_api.py) through the real ``openai`` client and raw HTTP,
against a real server on the tiny Llama checkpoint. The oracles: the gRPC path of the same server (the same
batcher: the same tokens, usage and report), transformers' ``apply_chat_template`` for chat prompts, and
OpenAI's documented wire format (SSE events ending in ``data: [DONE]``, its error JSON)."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time

import openai
import pytest
from serving_helpers import idle, slow_engine, wait_until

from sparseinfer.serving.config import Limits, ServeConfig
from sparseinfer.serving.server import start_server
from sparseinfer_client import NO_RETRY, Client

GREEDY = {"temperature": 0.0}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_llama_checkpoint, tmp_path_factory):
    # The tiny checkpoint with a chat template, as transformers would read it (tokenizer_config.json).
    path = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_llama_checkpoint, path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def http_server(make_server):
    return make_server(http_port=0)


def _openai(handle, api_key="unused"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key=api_key, max_retries=0)


def _model(handle) -> str:
    return _openai(handle).models.list().data[0].id


def _raw(handle, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", handle.http_port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def _sse_events(payload: bytes) -> list[str]:
    return [line[len("data: ") :] for line in payload.decode().split("\n\n") if line.startswith("data: ")]


def test_models_lists_the_served_model(http_server):
    models = _openai(http_server).models.list().data
    assert len(models) == 1
    with Client(http_server.address, retry=NO_RETRY) as c:
        assert models[0].id == c.model_info().model_id


def test_completion_equals_the_grpc_result(http_server):
    oa = _openai(http_server)
    got = oa.completions.create(
        model=_model(http_server), prompt="Hello there", max_tokens=10, temperature=0.8, seed=7, logprobs=0
    )
    with Client(http_server.address, retry=NO_RETRY) as c:
        want = c.generate(
            "Hello there",
            max_new_tokens=10,
            temperature=0.8,
            seed=7,
            return_logprobs=True,
            return_tokens=True,
        )
    choice = got.choices[0]
    assert choice.text == want.text
    assert choice.finish_reason == {"length": "length", "eos": "stop"}[want.finish_reason]
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert got.usage.completion_tokens == want.usage.generated_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert choice.logprobs.tokens == [t.text for t in want.tokens]
    assert choice.logprobs.token_logprobs == pytest.approx([t.logprob for t in want.tokens])
    report = got.model_extra["sparsity"]
    assert report["mode"] == "dense" and report["computed_share"] == want.sparsity.computed_share == 1.0
    assert report["tokens"] == want.sparsity.tokens and len(report["layers"]) == 2


def test_streamed_completion_concatenates_to_the_unary_one(http_server):
    oa, model = _openai(http_server), _model(http_server)
    whole = oa.completions.create(
        model=model, prompt="Once", max_tokens=8, extra_body={"ignore_eos": True}, **GREEDY
    )
    chunks = list(
        oa.completions.create(
            model=model,
            prompt="Once",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
    )
    *tokens, end, usage = chunks
    assert "".join(c.choices[0].text for c in [*tokens, end]) == whole.choices[0].text
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in tokens)
    assert end.choices[0].finish_reason == "length" and end.model_extra["sparsity"]["tokens"] > 0
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_stream_is_server_sent_events_ending_in_done(http_server):
    body = {"model": _model(http_server), "prompt": "Hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
    status, payload = _raw(http_server, "POST", "/v1/completions", body)
    assert status == 200
    events = _sse_events(payload)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert [p["choices"][0]["finish_reason"] for p in parsed] == [None, None, "length"]
    assert all(p["object"] == "text_completion" and p["id"] == parsed[0]["id"] for p in parsed)


def test_stop_sequences_cut_the_text_like_grpc(http_server):
    oa, model = _openai(http_server), _model(http_server)
    free = oa.completions.create(
        model=model, prompt="Hello", max_tokens=20, extra_body={"ignore_eos": True}, **GREEDY
    )
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text  # the greedy text has something to stop at
    cut = oa.completions.create(model=model, prompt="Hello", max_tokens=20, stop=[stop], **GREEDY)
    with Client(http_server.address, retry=NO_RETRY) as c:
        want = c.generate("Hello", max_new_tokens=20, stop=[stop], temperature=0.0)
    assert cut.choices[0].text == want.text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.fixture
def chat_server(chat_checkpoint):
    limits = Limits(max_batch_size=4, max_queue=16, max_new_tokens=64)
    handle = start_server(ServeConfig(model=chat_checkpoint, port=0, http_port=0, limits=limits))
    yield handle
    handle.stop(grace=0.5)


def test_chat_prompt_is_transformers_chat_template(chat_server, chat_checkpoint):
    import transformers

    handle = chat_server
    oa, model = _openai(handle), _model(handle)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    got = oa.chat.completions.create(model=model, messages=messages, max_tokens=6, **GREEDY)
    ids = transformers.AutoTokenizer.from_pretrained(chat_checkpoint).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with Client(handle.address, retry=NO_RETRY) as c:
        want = c.generate(list(ids), max_new_tokens=6, temperature=0.0)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.model_extra["sparsity"]["mode"] == "dense"
    # Streamed: the role first, then content deltas that add up to the same reply.
    chunks = list(
        oa.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True, **GREEDY)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and "sparsity" in chunks[-1].model_extra


def test_chat_without_a_template_is_refused(http_server):
    with pytest.raises(openai.BadRequestError) as e:
        _openai(http_server).chat.completions.create(
            model=_model(http_server), messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 400 and "chat template" in e.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["a", 3]}, "stop"),
        ({"stop": [""]}, "stop[0]"),
        ({"logprobs": 3}, "logprobs"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"sparsity_mode": "sparse"}, "sparsity_mode"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_invalid_fields_answer_400_naming_the_field(http_server, body, param):
    status, payload = _raw(
        http_server, "POST", "/v1/completions", {"model": _model(http_server), "prompt": "Hi", **body}
    )
    error = json.loads(payload)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(f"{param}: ")


def test_malformed_bodies_and_unknown_routes(http_server):
    status, payload = _raw(http_server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and json.loads(payload)["error"]["param"] == "body"
    status, payload = _raw(http_server, "POST", "/v1/completions", {"model": "other", "prompt": "Hi"})
    assert status == 404 and json.loads(payload)["error"]["code"] == "model_not_found"
    status, payload = _raw(http_server, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(payload)
    assert _raw(http_server, "GET", "/health") == (200, b'{"status": "serving"}')


def test_auth_uses_the_grpc_bearer_token(make_server):
    handle = make_server(http_port=0, auth_token="s3cret")
    with pytest.raises(openai.AuthenticationError):
        _openai(handle, api_key="wrong").models.list()
    assert _openai(handle, api_key="s3cret").models.list().data
    assert _raw(handle, "GET", "/health")[0] == 200  # probes carry no credentials
    assert _raw(handle, "GET", "/metrics")[0] == 401


def test_overload_answers_429(make_server):
    handle = make_server(http_port=0, limits=Limits(max_batch_size=1, max_queue=1, max_new_tokens=200))
    model = _model(handle)
    body = {"model": model, "prompt": "Hi", "max_tokens": 50, "ignore_eos": True}
    statuses = []
    with slow_engine(handle, 0.02):
        threads = [
            threading.Thread(target=lambda: statuses.append(_raw(handle, "POST", "/v1/completions", body)))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = sorted(s for s, _ in statuses)
    assert 200 in codes and 429 in codes, codes
    refused = next(p for s, p in statuses if s == 429)
    assert json.loads(refused)["error"]["type"] == "rate_limit_error"


def test_request_timeout_answers_504(http_server):
    body = {"model": _model(http_server), "prompt": "Hi", "max_tokens": 100, "ignore_eos": True}
    with slow_engine(http_server, 0.02):
        status, payload = _raw(http_server, "POST", "/v1/completions", body, {"X-Request-Timeout": "0.2"})
    assert status == 504 and json.loads(payload)["error"]["type"] == "timeout_error"
    status, _ = _raw(http_server, "POST", "/v1/completions", body, {"X-Request-Timeout": "soon"})
    assert status == 400


def test_client_disconnect_mid_stream_frees_the_slot(make_server):
    handle = make_server(http_port=0, limits=Limits(max_batch_size=1, max_queue=4, max_new_tokens=200))
    body = {"model": _model(handle), "prompt": "Hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with slow_engine(handle, 0.01):
        conn = http.client.HTTPConnection("127.0.0.1", handle.http_port, timeout=30)
        conn.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200
        response.fp.readline()  # the first event has arrived: the request holds the only slot
        conn.sock.close()
        conn.close()
        assert wait_until(lambda: idle(handle), timeout=10), "the slot was not freed"
    # The one slot serves the next request at once.
    done = _openai(handle).completions.create(model=body["model"], prompt="Hi", max_tokens=3)
    assert done.usage.completion_tokens >= 1


def test_http_and_grpc_in_one_batch_give_the_tokens_they_give_alone(http_server):
    oa, model = _openai(http_server), _model(http_server)
    options = {"temperature": 0.9, "seed": 11}

    def by_http():
        r = oa.completions.create(
            model=model, prompt="The sea", max_tokens=12, extra_body={"ignore_eos": True}, **options
        )
        return r.choices[0].text

    def by_grpc():
        with Client(http_server.address, retry=NO_RETRY) as c:
            return c.generate("The sea", max_new_tokens=12, ignore_eos=True, **options).text

    alone = (by_http(), by_grpc())
    assert alone[0] == alone[1]
    results: dict[str, list[str]] = {"http": [], "grpc": []}
    with slow_engine(http_server, 0.005) as steps:
        threads = [threading.Thread(target=lambda: results["http"].append(by_http())) for _ in range(3)]
        threads += [threading.Thread(target=lambda: results["grpc"].append(by_grpc())) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {"http": [alone[0]] * 3, "grpc": [alone[1]] * 3}
    assert max(len(s) for s in steps) > 1  # they really shared decode steps


def test_draining_finishes_streams_and_refuses_new_requests(make_server):
    handle = make_server(http_port=0)
    model = _model(handle)
    body = {"model": model, "prompt": "Hi", "max_tokens": 40, "stream": True, "ignore_eos": True}
    result = {}
    with slow_engine(handle, 0.02):
        stream = threading.Thread(
            target=lambda: result.update(s=_raw(handle, "POST", "/v1/completions", body))
        )
        stream.start()
        assert wait_until(lambda: handle.batcher.in_flight == 1)
        stopper = threading.Thread(target=lambda: handle.stop(grace=10.0))
        stopper.start()
        assert wait_until(lambda: not handle.batcher._accepting)
        status, payload = _raw(handle, "POST", "/v1/completions", {**body, "stream": False})
        assert status == 503 and json.loads(payload)["error"]["type"] == "service_unavailable"
        assert _raw(handle, "GET", "/health")[0] == 503
        stream.join()
        stopper.join()
    status, payload = result["s"]
    events = _sse_events(payload)
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_requests_are_counted_in_the_metrics(http_server):
    oa, model = _openai(http_server), _model(http_server)
    oa.completions.create(model=model, prompt="Hi", max_tokens=2)
    _raw(http_server, "POST", "/v1/completions", {"model": model, "prompt": "Hi", "n": 3})
    status, text = _raw(http_server, "GET", "/metrics")
    text = text.decode()
    assert status == 200
    assert 'sparseinfer_requests_total{code="OK",method="HTTP /v1/completions"}' in text
    assert 'sparseinfer_requests_total{code="INVALID_ARGUMENT",method="HTTP /v1/completions"}' in text
    time.sleep(0)  # the counters above were read after both requests answered
