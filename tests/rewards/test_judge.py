"""Generative judge: verdict parsing, an OpenAI-compatible server on 127.0.0.1, and the rollout engine."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from r1kit.rewards import RewardSuite, RewardSuiteConfig
from r1kit.rewards.models import EngineGenerator, GenerativeJudge, OpenAIGenerator, parse_verdict
from r1kit.rollout.engine import RolloutEngine, SamplingParams
from r1kit.rollout.torch_engine import TorchRolloutEngine
from tests.rewards.tiny_models import constant_token_lm, word_tokenizer

MAX_REQUESTS = 50


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Both are 38.\nVerdict: CORRECT", 1.0),
        ("Verdict: **Incorrect**", 0.0),
        ("It is correct... no wait. Verdict: INCORRECT", 0.0),
        ("The response is correct", 1.0),
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


class _JudgeServer(ThreadingHTTPServer):
    """Chat-completions server: CORRECT when the response section contains the reference, else INCORRECT."""

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.headers_seen: list[dict] = []
        self.fail_first = fail_first

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        server = self.server
        if len(server.requests) >= MAX_REQUESTS or self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append(body)
        server.headers_seen.append(dict(self.headers))
        if len(server.requests) <= server.fail_first:
            self.send_error(503)
            return
        prompt = body["messages"][0]["content"]
        reference = prompt.split("Reference answer:\n")[1].split("\n")[0]
        response = prompt.split("Response:\n")[1].split("\n\nReply with")[0]
        verdict = "CORRECT" if reference in response else "INCORRECT"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"Verdict: {verdict}"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def judge_server():
    servers = []

    def start(fail_first: int = 0) -> _JudgeServer:
        server = _JudgeServer(fail_first)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_judge_over_an_openai_compatible_endpoint(judge_server, monkeypatch):
    server = judge_server()
    monkeypatch.setenv("R1KIT_TEST_JUDGE_KEY", "secret")
    generator = OpenAIGenerator(server.url, model="judge", api_key_env="R1KIT_TEST_JUDGE_KEY", timeout_s=5)
    judge = GenerativeJudge(generator)
    completions = ["So she makes 18 dollars.", "She makes 20 dollars.", "I think it is 18."]
    scores = judge(completions, prompts=["How much?"] * 3, answer=["She sells 9 eggs.\n#### 18"] * 3)
    assert scores == [1.0, 0.0, 1.0]
    assert len(server.requests) == 3 and {r["model"] for r in server.requests} == {"judge"}
    assert all(h["Authorization"] == "Bearer secret" for h in server.headers_seen)
    assert "Reference answer:\n18\n" in server.requests[0]["messages"][0]["content"]


def test_http_retries_transient_errors_then_fails_clearly(judge_server):
    server = judge_server(fail_first=1)
    generator = OpenAIGenerator(server.url, model="judge", retries=1, timeout_s=5)
    judge = GenerativeJudge(generator)
    assert judge(["18"], prompts=["q"], answer=["18"]) == [1.0]
    assert len(server.requests) == 2
    broken = OpenAIGenerator(server.url + "/missing", model="judge", retries=2, timeout_s=5)
    with pytest.raises(RuntimeError, match="HTTP 404"):
        broken.generate(["q"])


@pytest.mark.parametrize(("first_word", "expected"), [("CORRECT", 1.0), ("INCORRECT", 0.0)])
def test_judge_over_the_rollout_engine(first_word, expected):
    tokenizer = word_tokenizer(first=[first_word])  # id 0 is the word the zero-norm model always emits
    engine = TorchRolloutEngine(constant_token_lm(tokenizer), tokenizer)
    assert isinstance(engine, RolloutEngine)
    generator = EngineGenerator(engine, tokenizer, SamplingParams(temperature=0.0, max_new_tokens=3))
    assert generator.generate(["the question"]) == [" ".join([first_word] * 3)]
    judge = GenerativeJudge(generator)
    with RewardSuite([judge], config=RewardSuiteConfig(num_workers=0)) as suite:
        result = suite.score(["what is 19 * 2"] * 2, ["38", "39"], {"answer": ["38", "38"]})
    assert result.scores["judge"].tolist() == [expected, expected]


def test_bad_judge_configs_raise():
    with pytest.raises(ValueError, match="must be an http"):
        OpenAIGenerator("ftp://x", model="m")
    with pytest.raises(ValueError, match=r"\{reference\}"):
        GenerativeJudge(OpenAIGenerator("http://127.0.0.1:1/v1", model="m"), template="{question} {response}")
    with pytest.raises(TypeError, match="generate"):
        GenerativeJudge(object())
