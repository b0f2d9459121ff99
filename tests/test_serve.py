"""`gtransformer serve` as clients meet it: a real server in a subprocess on a loopback port, over HTTP."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import KEY, NEEDS_CPP_COMPILER, start_server, stop_server

from gtransformer.inference.generate import DecodeOptions, generate_text
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.training.checkpoint import load_for_inference

AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, make_run) -> Path:
    return make_run(tmp_path_factory.mktemp("serve") / "run", context_length=128)


@pytest.fixture(scope="module")
def server(run_folder):
    process, url = start_server(run_folder, "--max-batch", "4", "--max-queue", "2", "--max-tokens-cap", "100",
                                "--api-key-env", "GT_TEST_KEY", "--model-name", "tiny-pt")
    yield url
    err = stop_server(process)
    assert KEY not in err  # the key never reaches the logs


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy_reference(run: Path, prompt: str, max_tokens: int) -> str:
    model, tokenizer, _ = load_for_inference(run)
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=0, repetition_penalty=1.0)
    return generate_text(model, tokenizer, [prompt], sampling)[0]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_health_models_page_and_auth(server, client):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny-pt"]
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<textarea" in page.text and "http" not in page.text.split("<script>")[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(server + "/v1/models", headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"


def test_greedy_completion_equals_generate_alone_and_under_load(server, client, run_folder):
    prompt = "O coração"
    expected = greedy_reference(run_folder, prompt, 30)
    done = client.completions.create(model="tiny-pt", prompt=prompt, max_tokens=30, temperature=0)
    assert done.choices[0].text == expected
    assert done.usage.completion_tokens > 0 and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.choices[0].finish_reason in ("stop", "length")

    others = []
    background = [threading.Thread(target=lambda p=p: others.append(client.completions.create(
        model="tiny-pt", prompt=p, max_tokens=40, temperature=0.9, seed=1))) for p in ("Ação", "Não há razão")]
    for thread in background:
        thread.start()
    time.sleep(0.2)  # the others are mid-generation when this one joins
    loaded = client.completions.create(model="tiny-pt", prompt=prompt, max_tokens=30, temperature=0)
    for thread in background:
        thread.join(60)
    assert loaded.choices[0].text == expected and len(others) == 2


def test_streamed_text_equals_the_whole_response(client):
    whole = client.completions.create(model="tiny-pt", prompt="Ação e", max_tokens=25, temperature=0)
    pieces, reasons = [], []
    for chunk in client.completions.create(model="tiny-pt", prompt="Ação e", max_tokens=25, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].text
    assert reasons[-1] == whole.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_completion_options(client):
    many = client.completions.create(model="tiny-pt", prompt=["Era", "O amor"], n=2, max_tokens=5, seed=7,
                                     temperature=1.0, stop=["\n"], logprobs=3, echo=True)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text.startswith("Era") and many.choices[2].text.startswith("O amor")
    logprobs = many.choices[1].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) > 0
    assert all(len(top) <= 3 and all(lp <= 0 for lp in top.values()) for top in logprobs.top_logprobs)
    again = client.completions.create(model="tiny-pt", prompt=["Era", "O amor"], n=2, max_tokens=5, seed=7,
                                      temperature=1.0, stop=["\n"], logprobs=3, echo=True)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # same seed, same texts
    full = client.completions.create(model="tiny-pt", prompt="O coração", max_tokens=30, temperature=0).choices[0]
    stop = full.text[6:8]
    stopped = client.completions.create(model="tiny-pt", prompt="O coração", max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].text == full.text[: full.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_completions_streamed_and_not(client):
    messages = [{"role": "system", "content": "Responda em português."}, {"role": "user", "content": "Olá!"}]
    reply = client.chat.completions.create(model="tiny-pt", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.model_extra["chat_template"] == "gtransformer-dialogo-v1"
    streamed = client.chat.completions.create(model="tiny-pt", messages=messages, max_tokens=12, temperature=0,
                                              stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text.strip() == reply.choices[0].message.content


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"prompt": "Era", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "Era", "max_tokens": 101}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "Era " * 200, "max_tokens": 10}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "Era", "presence_penalty": 0.5}).encode(), 400, "presence_penalty"),
    (json.dumps({"prompt": "Era", "n": 0}).encode(), 400, "n"),
    (json.dumps({"prompt": "x" * (2 << 20)}).encode(), 413, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    response = httpx.post(server + "/v1/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param and error["message"]
    if param == "prompt":
        assert "128" in error["message"]  # says the limit


def test_unknown_paths_are_json_errors(server):
    response = httpx.get(server + "/v1/nothing", headers=AUTH)
    assert response.status_code == 404 and error_of(response)["message"]


def test_concurrent_streams_interleave_and_a_disconnect_frees_the_slot(server):
    body = {"prompt": "O coração", "max_tokens": 60, "temperature": 0.8, "stream": True, "seed": 3}
    arrivals: dict[int, list[float]] = {0: [], 1: []}

    def stream(index: int) -> None:
        with httpx.stream("POST", server + "/v1/completions", json=body, headers=AUTH, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrivals[index].append(time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    first, second = arrivals[0], arrivals[1]
    assert len(first) > 5 and len(second) > 5
    assert first[0] < second[-1] and second[0] < first[-1]  # their tokens were produced in the same period

    with httpx.stream("POST", server + "/v1/completions", json={**body, "max_tokens": 100}, headers=AUTH,
                      timeout=60) as response:
        for count, line in enumerate(response.iter_lines()):
            if count > 4:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(server + "/metrics").text
        if "gtransformer_active_requests 0" in text:
            break
        time.sleep(0.1)
    assert "gtransformer_active_requests 0" in text
    assert "gtransformer_generated_tokens_total" in text and "gtransformer_time_to_first_token_seconds_count" in text


def test_a_full_queue_is_answered_429_with_retry_after(server):
    body = {"prompt": "O coração", "max_tokens": 90, "temperature": 0.8}
    statuses, retry_after = [], []

    def post() -> None:
        response = httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=120)
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after.append(response.headers.get("retry-after"))

    threads = [threading.Thread(target=post) for _ in range(10)]  # 4 decoding + 2 waiting, the rest refused
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert statuses.count(200) >= 6 and 429 in statuses, statuses
    assert retry_after and all(value == "1" for value in retry_after)


def test_sigterm_lets_an_inflight_stream_finish(run_folder):
    process, url = start_server(run_folder, env_key=None)
    lines = []

    def stream() -> None:
        body = {"prompt": "O coração", "max_tokens": 80, "temperature": 0.8, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines.extend(response.iter_lines())

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.5)
    err = stop_server(process)
    thread.join(60)
    assert "data: [DONE]" in lines, lines[-3:]
    assert "stopped" in err


@NEEDS_CPP_COMPILER
def test_compiled_serving_equals_compiled_generate(run_folder):
    process, url = start_server(run_folder, "--compile", "--max-batch", "1", env_key=None)
    try:
        body = {"prompt": "O coração", "max_tokens": 20, "temperature": 0}
        served = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        err = stop_server(process)
    model, tokenizer, _ = load_for_inference(run_folder)
    sampling = SamplingConfig(max_new_tokens=20, temperature=0, repetition_penalty=1.0)
    assert served == generate_text(model, tokenizer, ["O coração"], sampling, DecodeOptions(compile=True))[0]
    assert "compiling the decoding step for batch sizes 1" in err
