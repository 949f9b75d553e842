"""`cpm-lightning serve` (issue 23, item 3): the OpenAI-compatible API of inference/server.py run
by a real uvicorn server on a free loopback port, driven by the official `openai` client.

One tiny model directory per module. Tests that must act while a generation is in
progress hold the model's forward pass at a chosen call (`Gate`), so what they assert follows
from the order of events, never from timing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import ZH, cli_error, english_text, running
from openai import OpenAI

from cpm_lightning.checkpoint.modeldir import write_model_dir
from cpm_lightning.cli import loader
from cpm_lightning.cli.loader import load_model
from cpm_lightning.cli.main import main
from cpm_lightning.core.precision import Precision
from cpm_lightning.core.tokenizer import train_tokenizer
from cpm_lightning.inference.generate import continuation, sample
from cpm_lightning.inference.server import TURN_MARKERS, Message, _Job, _Text, chat_prompt, create_app
from cpm_lightning.model import ArchConfig, CPMAnt

PROMPT = "It is a truth universally"
NAME = "model"  # what `serve` calls the model directory, .../model

# The README's client ("Run it on your own computer"), run by test_readme_snippet against a
# server started as the README's `cpm-lightning serve demo-int4 --model-name demo` is.
README = Path(__file__).parents[2] / "README.md"
SNIPPET = re.search(r"^## Run it on your own computer$.*?^```python\n(.*?)^```", README.read_text(), re.M | re.S)[1]


def client_of(url: str, api_key: str = "none") -> OpenAI:
    return OpenAI(base_url=url, api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Random weights whose byte pieces are never the likeliest (their embedding rows, tied to
    the output, are zero), so that greedy text is words, not a run of lone bytes."""
    tokenizer = train_tokenizer([english_text(60), "\n\n".join(ZH * 30)], 400)
    torch.manual_seed(0)
    model = CPMAnt(ArchConfig(preset="tiny", vocab_size=tokenizer.vocab_size).resolved())
    model.init_weights()
    with torch.no_grad():
        model.embedding[[i for i in range(tokenizer.vocab_size) if tokenizer.sp.is_byte(i)]] = 0
    path = tmp_path_factory.mktemp("serve") / "model"
    write_model_dir(path, model.state_dict(), model.cfg.to_dict(), tokenizer)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def served(loaded):
    """(base URL, app) of the module's server."""
    app = create_app(*loaded, NAME)
    with running(app) as url:
        yield url, app


@pytest.fixture
def client(served) -> OpenAI:
    return client_of(served[0])


def greedy(loaded, prompt: str, max_tokens: int) -> tuple[str, int]:
    """(the greedy continuation of `prompt` by `sample`, its tokens): what the server must return."""
    model, tokenizer = loaded
    ids = tokenizer.encode(prompt)
    new = sample(model, ids, max_tokens, temperature=0, eos_id=tokenizer.eos_id)
    return continuation(tokenizer, ids, new), len(new)


class Gate:
    """Installed as the model's forward: counts the calls, and holds call `hold_at` until
    `release()`, so that a generation is provably in progress meanwhile (`held` is set then)."""

    def __init__(self, model, monkeypatch, hold_at: int | None = None):
        self.forward, self.hold_at, self.calls = model.forward, hold_at, 0
        self.held, self.opened = threading.Event(), threading.Event()
        monkeypatch.setattr(model, "forward", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.hold_at:
            self.held.set()
            self.opened.wait(120)  # a bound for a broken test only
        return self.forward(*args, **kwargs)

    def release(self) -> None:
        self.opened.set()


def test_a_completion_is_what_generate_prints(served, client, loaded, model_dir, capsys):
    c = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    tokenizer = loaded[1]
    main(["generate", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0"])
    assert tokenizer.decode(tokenizer.encode(PROMPT)) + c.choices[0].text == capsys.readouterr().out.removesuffix("\n")
    assert (c.object, c.model, c.choices[0].finish_reason) == ("text_completion", NAME, "length")
    assert c.id.startswith("cmpl-")
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(tokenizer.encode(PROMPT)), 8)
    assert c.usage.total_tokens == c.usage.prompt_tokens + 8
    assert [m.id for m in client.models.list()] == [NAME] and client.models.retrieve(NAME).id == NAME
    assert client.completions.create(model=NAME, prompt=[PROMPT], max_tokens=8, temperature=0).choices[0].text \
        == c.choices[0].text  # a list of one prompt, as LangChain sends it
    assert c.choices[0].text == greedy(loaded, PROMPT, 8)[0]


def test_stream_reassembles_to_the_whole_response(client):
    whole = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # streamed, not one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    messages = [{"role": "user", "content": "Who is the man?"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    parts = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant" and parts[0].object == "chat.completion.chunk"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_a_stream_is_server_sent_events_ending_with_done(served):
    """The raw events: OpenAI's chunk objects, then `data: [DONE]`."""
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served[0]}/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: {") for e in events[:-1]) and events[-1] == "data: [DONE]"


def test_chat_follows_the_template_and_stops_at_a_turn_marker(client, loaded):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is the man?"},
                {"role": "assistant", "content": "A single man."}, {"role": "user", "content": [
                    {"type": "text", "text": "And his "}, {"type": "text", "text": "fortune?"}]}]
    template = chat_prompt([Message.model_validate(m) for m in messages])
    assert template == ("Answer briefly.\nUser: Who is the man?\nAssistant: A single man.\n"
                        "User: And his fortune?\nAssistant:")
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0)
    text, count = greedy(loaded, template, 30)
    reply = text.lstrip()
    cut = min([i for m in TURN_MARKERS if (i := reply.find(m)) >= 0], default=len(reply))
    assert chat.choices[0].message.content == reply[:cut]
    assert chat.choices[0].message.role == "assistant" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].finish_reason == ("length" if cut == len(reply) and count == 30 else "stop")


def test_unfinished_characters_are_held_back(loaded):
    """A character spelled in byte pieces is released whole; lone bytes that can never finish one
    are released as U+FFFD once more of them follow than a character has."""
    tokenizer = loaded[1]
    text = _Text(tokenizer, _Job("id", tokenizer.encode(PROMPT), 8, 0, 1, None, (), strip=False))
    assert [text.add(tokenizer.sp.piece_to_id(f"<0x{b:02X}>")) for b in "學".encode()] == ["", "", "學"]
    assert [text.add(tokenizer.sp.piece_to_id("<0xA7>")) for _ in range(5)] == ["", "", "", "\ufffd", "\ufffd"]
    assert text.rest() == "\ufffd" * 3


def test_stop_strings_end_the_text_before_them(client):
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    for stream in (False, True):
        response = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=20, temperature=0,
                                             stop=[stop, "never in it"], stream=stream)
        chunks = list(response) if stream else [response]
        assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sample(client):
    def draw(seed):
        return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    assert draw(7) == draw(7)


def test_requests_are_queued_and_models_answered_meanwhile(served, client, loaded, monkeypatch):
    """A's generation is held at its 3rd forward pass: /v1/models answers meanwhile, B waits for
    A, and each gets exactly what it gets alone."""
    prompts = {"A": PROMPT, "B": "My dear Mr. Bennet, said his lady"}
    alone = {k: client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0).choices[0].text
             for k, p in prompts.items()}
    log = served[1].state.log
    start = len(log)
    gate = Gate(loaded[0], monkeypatch, hold_at=3)
    a = client.completions.create(model=NAME, prompt=prompts["A"], max_tokens=10, temperature=0, stream=True)
    gate.held.wait(60)
    b: list[str] = []
    thread = threading.Thread(target=lambda: b.append(client_of(served[0]).completions.create(
        model=NAME, prompt=prompts["B"], max_tokens=10, temperature=0).choices[0].text))
    thread.start()
    assert [m.id for m in client.models.list()] == [NAME]  # while A's generation is held
    assert len(log) == start  # neither has finished
    gate.release()
    assert "".join(c.choices[0].text for c in a) == alone["A"]
    thread.join()
    assert b == [alone["B"]]
    tokenizer = loaded[1]
    assert [e.prompt_tokens for e in log[start:]] == [len(tokenizer.encode(prompts[k])) for k in "AB"]


def test_a_client_that_disconnects_frees_its_slot(served, client, loaded, monkeypatch):
    log = served[1].state.log
    start = len(log)
    gate = Gate(loaded[0], monkeypatch, hold_at=4)
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=100, temperature=0, stream=True)
    gate.held.wait(60)
    stream.close()  # mid-generation: its 4th forward pass is held
    deadline = time.monotonic() + 60  # a bound for a broken server only
    while len(log) == start and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(e.finish_reason, e.completion_tokens) for e in log[start:]] == [("disconnected", 3)]
    gate.release()
    after_abort = gate.calls
    nxt = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    next_calls = gate.calls - after_abort
    assert nxt.choices[0].text == greedy(loaded, PROMPT, 5)[0]
    again = gate.calls
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    assert next_calls == gate.calls - again  # the aborted generation ran no forward pass after the held one
    assert log[-2].finish_reason == "length"


def bad_cases(tokenizer) -> dict[str, tuple[str, dict, str, str | None]]:
    """case -> (endpoint, the request's fields, the message, the param)."""
    long_prompt = "a truth universally acknowledged " * 80
    prompt_tokens = len(tokenizer.encode(PROMPT))
    user = [{"role": "user", "content": "Hi"}]
    chat_tokens = len(tokenizer.encode("User: Hi\nAssistant:"))
    completion_fields = ("model, max_tokens, temperature, top_p, stop, seed, stream, stream_options, n, user, task, "
                         "context, prompt")
    return {
        "unknown field": ("completions", {"frequency_penalty": 0.5},
                          f"frequency_penalty: unknown field; expected one of: {completion_fields}",
                          "frequency_penalty"),
        "wrong type": ("completions", {"max_tokens": "ten"}, "max_tokens: Input should be a valid integer",
                       "max_tokens"),
        "max_tokens beyond the length": ("completions", {"max_tokens": 1000}, f"max_tokens 1000: the prompt is "
                                         f"{prompt_tokens} tokens and the model's maximum length is 256, so at most "
                                         f"{256 - prompt_tokens} new tokens fit", "max_tokens"),
        "prompt too long": ("completions", {"prompt": long_prompt}, f"the prompt is "
                            f"{len(tokenizer.encode(long_prompt))} tokens; the model's maximum length is 256",
                            "prompt"),
        "empty prompt": ("completions", {"prompt": ""}, "the prompt is empty; expected some text", "prompt"),
        "two prompts": ("completions", {"prompt": ["a", "b"]},
                        "prompt: a list of 2 texts; this server completes one per request", "prompt"),
        "temperature above 2": ("completions", {"temperature": 2.5},
                                "temperature: Input should be less than or equal to 2", "temperature"),
        "negative temperature": ("chat", {"temperature": -1},
                                 "temperature: Input should be greater than or equal to 0", "temperature"),
        "top_p 0": ("completions", {"top_p": 0}, "top_p: Input should be greater than 0", "top_p"),
        "top_p above 1": ("chat", {"top_p": 1.5}, "top_p: Input should be less than or equal to 1", "top_p"),
        "n 2": ("chat", {"n": 2}, "n must be 1 (one choice per request), got 2", "n"),
        "unknown model": ("chat", {"model": "gpt-4"}, "model 'gpt-4' does not exist; this server serves 'model'",
                          "model"),
        "five stops": ("completions", {"stop": list("abcde")},
                       "stop: expected up to 4 non-empty strings, got ['a', 'b', 'c', 'd', 'e']", "stop"),
        "a stop of the wrong type": ("completions", {"stop": [1]}, "stop[0]: Input should be a valid string",
                                     "stop[0]"),
        "unknown role": ("chat", {"messages": [{"role": "tool", "content": "x"}]},
                         "messages[0].role: Input should be 'system', 'developer', 'user' or 'assistant'",
                         "messages[0].role"),
        "no messages": ("chat", {"messages": []},
                        "messages: List should have at least 1 item after validation, not 0", "messages"),
        "chat max_tokens beyond": ("chat", {"messages": user, "max_completion_tokens": 300},
                                   f"max_tokens 300: the prompt is {chat_tokens} tokens and the model's maximum "
                                   f"length is 256, so at most {256 - chat_tokens} new tokens fit", "max_tokens"),
        "missing field": ("chat", {"messages": None}, "messages: Field required", "messages"),
        "unknown task": ("completions", {"task": "poetry"},
                         "task: unknown task 'poetry'; expected one of: qa, summarize, translate", "task"),
        "context without a task": ("completions", {"context": "A passage."},
                                   "context: the passage of a task's input; give the task too (task: qa)", "context"),
        "a task of a chat": ("chat", {"task": "qa", "messages": [{"role": "system", "content": "Be brief."}, *user]},
                             "messages: with task qa, one user message (the task's input); got the roles system, user",
                             "messages"),
    }


def test_a_task_request_is_what_generate_task_prints(client, model_dir, capsys):
    """`task` and `context` lay the prompt out as `generate --task qa --context` does (greedy,
    the same text), on /v1/completions, streamed, and on a chat of one user message."""
    question, passage = "Who acknowledged it?", "It is a truth universally acknowledged by everyone."
    main(["generate", str(model_dir), "--task", "qa", "--context", passage, "--prompt", question,
          "--max-new-tokens", "8", "--temperature", "0"])
    expected = capsys.readouterr().out.removesuffix("\n")
    c = client.completions.create(model=NAME, prompt=question, max_tokens=8, temperature=0,
                                  extra_body={"task": "qa", "context": passage})
    assert c.choices[0].text == expected and c.usage.completion_tokens > 0
    streamed = client.completions.create(model=NAME, prompt=question, max_tokens=8, temperature=0, stream=True,
                                         extra_body={"task": "qa", "context": passage})
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}], max_tokens=8,
                                          temperature=0, extra_body={"task": "qa", "context": passage})
    assert chat.choices[0].message.content == expected
    # Without the task, the same prompt is continued as text: another input, another output.
    plain = client.completions.create(model=NAME, prompt=question, max_tokens=8, temperature=0)
    assert c.usage.prompt_tokens > plain.usage.prompt_tokens  # the passage was read too


def test_bad_requests_are_400s_and_the_server_keeps_serving(client, loaded):
    for case, (endpoint, fields, message, param) in bad_cases(loaded[1]).items():
        body = {"model": NAME, **({"prompt": PROMPT} if endpoint == "completions" else
                                  {"messages": [{"role": "user", "content": "Hi"}]}), **fields}
        body = {k: v for k, v in body.items() if v is not None}
        with pytest.raises(openai.BadRequestError) as e:
            client.post(f"/{endpoint}" if endpoint == "completions" else "/chat/completions", body=body,
                        cast_to=httpx.Response)
        assert e.value.status_code == 400, case
        assert e.value.body == {"message": message, "type": "invalid_request_error", "param": param,
                                "code": e.value.body["code"]}, case
    # And through the client's own methods:
    with pytest.raises(openai.BadRequestError, match="temperature: Input should be less than or equal to 2"):
        client.completions.create(model=NAME, prompt=PROMPT, temperature=3)
    with pytest.raises(openai.BadRequestError, match="max_tokens: Input should be a valid integer"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens="ten")
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).usage.completion_tokens <= 2


def test_malformed_bodies_are_400s(served):
    url = served[0]
    cases = {b'{"model": "model", "prompt": ': "the body is not valid JSON: Expecting value at character 29",
             b'["model"]': "the body must be a JSON object of the request's fields"}
    for raw, message in cases.items():
        response = httpx.post(f"{url}/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                             "code": None}}
    missing = httpx.get(f"{url}/engines")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "GET /v1/engines: Not Found"
    assert httpx.get(f"{url}/models").status_code == 200


def test_a_model_that_fails_is_a_500_and_the_server_keeps_serving(served, client, loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setattr(model, "forward", lambda ids, **kwargs: torch.full((*ids.shape, tokenizer.vocab_size),
                                                                           float("nan")))
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4)
    assert e.value.body["message"] == "the model's output is not finite (NaN or infinite logits): its weights are " \
        "damaged" and e.value.body["type"] == "server_error"
    assert served[1].state.log[-1].finish_reason == "error"
    monkeypatch.undo()
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text \
        == greedy(loaded, PROMPT, 4)[0]


def test_an_api_key_is_required_when_given(loaded):
    with running(create_app(*loaded, NAME, api_key="sesame")) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            client_of(url, "wrong").models.list()
        assert e.value.status_code == 401
        assert e.value.body == {"message": "missing or wrong API key: expected the header `Authorization: Bearer KEY` "
                                "with the key `serve` was given", "type": "invalid_request_error", "param": None,
                                "code": "invalid_api_key"}
        assert httpx.post(f"{url}/completions", content=b"not json").status_code == 401  # before the body
        assert client_of(url, "sesame").completions.create(model=NAME, prompt=PROMPT, max_tokens=2).choices


def test_int8_weights_are_served(model_dir, capsys):
    model, tokenizer = load_model(str(model_dir), precision=Precision(quantize="int8"))
    with running(create_app(model, tokenizer, NAME)) as url:
        text = client_of(url).completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    main(["generate", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0",
          "--quantize", "int8"])
    assert tokenizer.decode(tokenizer.encode(PROMPT)) + text == capsys.readouterr().out.removesuffix("\n")


def test_readme_snippet(loaded):
    """The three lines of the README's client, against a server named as the README names it."""
    with running(create_app(*loaded, "demo")) as url:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(SNIPPET.replace("http://127.0.0.1:8000/v1", url), {})
    assert out.getvalue() == greedy(loaded, "It is a truth", 16)[0] + "\n"


def test_serve_refuses_what_it_cannot_listen_on(model_dir, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(loader, "load_model", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_error(capsys, "serve", str(model_dir), "--port", str(port)) == \
            f"cannot listen on 127.0.0.1:{port}: Address already in use; stop what uses it or pick another --port"
    assert cli_error(capsys, "serve", str(model_dir), "--port", "70000") == "--port 70000: expected 0 to 65535"
    assert cli_error(capsys, "serve", str(model_dir), "--api-key", "") == \
        "--api-key is empty; give a key, or leave the option out to serve without one"
    assert cli_error(capsys, "serve", str(model_dir), "--host", "no-such-host.invalid").startswith(
        "--host 'no-such-host.invalid': not an address of this computer (")


@pytest.mark.slow
def test_serve_verb_end_to_end(model_dir, tmp_path):
    """`cpm-lightning serve` as a user runs it: a process with int8 weights and the API key from
    the environment, then Ctrl-C."""
    env = {**os.environ, "CPM_LIGHTNING_API_KEY": "sesame", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", "from cpm_lightning.cli.main import main; main()", "serve",
                             str(model_dir), "--port", "0", "--quantize", "int8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 'model' at http://127.0.0.1:") and line.endswith("/v1 (API key required)\n"), \
            line + proc.stderr.read()
        url = line.split()[3]
        chat = client_of(url, "sesame").chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                                       "content": "Hi"}], max_tokens=4)
        assert chat.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            client_of(url).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
