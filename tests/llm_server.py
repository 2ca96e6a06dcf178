"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the LLM client's tests:
a real HTTP server in a thread, with deterministic answers and injectable faults.

- Explainer requests (the prompt lists ``token<TAB>activation`` lines): answers
  ``the token 'X'`` for the token with the largest total activation.
- Simulator requests (``index<TAB>token`` lines after an explanation naming ``'X'``): one
  ``i: 10`` or ``i: 0`` line per token (10 where the token is X); with ``logprobs`` it
  returns OpenAI-style ``logprobs.content`` whose top_logprobs put ``confidence`` on the
  written answer and the rest on the other one, so the expected value differs from the
  written number and a test can tell which was used.
- ``faults``: a list consumed one per request: an HTTP status (429, 500, 401...), or
  ``"garbage"`` (200 with a body that is not JSON), or ``"nonsense"`` (a valid completion
  whose text answers nothing).
"""

from __future__ import annotations

import ast
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeChatServer:
    def __init__(self, confidence: float = 0.9, logprobs: bool = True):
        self.confidence, self.logprobs = confidence, logprobs
        self.faults: list = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    fault = server.faults.pop(0) if server.faults else None
                if isinstance(fault, int):
                    self.send_response(fault)
                    if fault == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "injected"}')
                    return
                payload = b"<html>this is not json" if fault == "garbage" else json.dumps(server.answer(body, fault)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- answers ------------------------------------------------------------------------
    def answer(self, body: dict, fault) -> dict:
        prompt = body["messages"][-1]["content"]
        if fault == "nonsense":
            return self._reply("I would rather not say.")
        if prompt.startswith("Neuron activations:"):
            totals: dict[str, float] = {}
            for token, value in re.findall(r"^('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\t(\d+)$", prompt, re.M):
                totals[ast.literal_eval(token)] = totals.get(ast.literal_eval(token), 0) + int(value)
            return self._reply(f"the token {max(totals, key=totals.get)!r}")
        named = ast.literal_eval(re.search(r"the token ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", prompt).group(1))
        tokens = [ast.literal_eval(t) for t in re.findall(r"^\d+\t(.*)$", prompt, re.M)]
        answers = [10 if t == named else 0 for t in tokens]
        text = "".join(f"{i}: {a}\n" for i, a in enumerate(answers))
        if not (self.logprobs and body.get("logprobs")):
            return self._reply(text)
        content = []
        for i, a in enumerate(answers):
            other = 0 if a == 10 else 10
            top = [{"token": f" {a}", "logprob": math.log(self.confidence)},
                   {"token": f" {other}", "logprob": math.log(1 - self.confidence)}]
            content += [{"token": str(i), "logprob": 0.0, "top_logprobs": []},
                        {"token": ":", "logprob": 0.0, "top_logprobs": []},
                        {"token": f" {a}", "logprob": top[0]["logprob"], "top_logprobs": top},
                        {"token": "\n", "logprob": 0.0, "top_logprobs": []}]
        return self._reply(text, {"content": content})

    @staticmethod
    def _reply(text: str, logprobs: dict | None = None) -> dict:
        return {"id": "x", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}
