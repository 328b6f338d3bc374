"""A toy model server on loopback, to try the http target offline.

    python3 examples/suites/toy_model_server.py &     # listens on 127.0.0.1:8765
    evalrunner run examples/suites/http-chat.yaml     # the OpenAI-compatible contract
    evalrunner run examples/suites/http-json.yaml     # the plain JSON contract

It "answers" arithmetic: for "2+3" it says "5". Two contracts, as the http target speaks them:

- POST /v1/chat/completions, OpenAI's chat format: the case's input is the last user
  message; the answer is choices[0].message.content, and `usage` reports tokens.
- POST /answer, the JSON format: {"input": ...} in, {"output": ...} out.
"""

from __future__ import annotations

import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 8765


def answer(question: str) -> str:
    match = re.fullmatch(r"\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*", question)
    if not match:
        return "I only do arithmetic."
    a, op, b = int(match[1]), match[2], int(match[3])
    return str({"+": a + b, "-": a - b, "*": a * b}[op])


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/v1/chat/completions":
            question = body["messages"][-1]["content"]
            text = answer(question)
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": len(question.split()), "completion_tokens": 1,
                               "total_tokens": len(question.split()) + 1}}
        elif self.path == "/answer":
            reply = {"output": answer(str(body["input"]))}
        else:
            self.send_error(404)
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
