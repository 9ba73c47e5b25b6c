"""Plays clients against a real vLLM with the official `openai` client, as user code does.

Usage: client.py BASE_URL PLAN_JSON OUT_JSONL

PLAN_JSON is a list of requests, run one after another:
  {"request_id": str | null, "traceparent": str | null, "headers": {..}, "words": int,
   "seed": int, "max_tokens": int, "stream": bool, "abandon_after": int | null,
   "half_close": bool, "model": str}
The prompt is `words` words drawn from the model's vocabulary, the same for the same seed.
A stream with `abandon_after` is left after that many content chunks the way user code
leaves it: break out of the iteration and close the stream (the connection is closed). With
`"half_close": true` the client is a tap instead of the `openai` client: a raw socket that, after
`abandon_after` content chunks, shuts its sending side (the server sees the client's FIN, as
from a client that left) and keeps reading, counting the content chunks the server still wrote
after the FIN (`chunks_after_close`): the ground truth of tokens generated after the client left.

One JSON line per request goes to OUT_JSONL: the request id sent, the response's own `id`,
the content chunks received, whether the stream was abandoned, the wall-clock time (unix ns)
just before it was closed, and the usage the server reported (non-streaming requests).
"""

import json
import re
import socket
import sys
import time
from urllib.parse import urlparse

from openai import OpenAI


CONTENT_CHUNK = re.compile(rb'"delta":\{"content":"[^"]')


def half_close_stream(base_url, args, headers, abandon_after, record):
    url = urlparse(base_url)
    body = dict(args, stream=True)
    body.pop("extra_headers")
    body.update(body.pop("extra_body"))
    payload = json.dumps(body).encode()
    head = [f"POST {url.path}/chat/completions HTTP/1.1", f"Host: {url.netloc}",
            "Content-Type: application/json", f"Content-Length: {len(payload)}",
            "Authorization: Bearer sk-test-not-a-secret"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    before, after = b"", b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        if record["abandoned"]:
            after += data
            continue
        before += data
        if record["response_id"] is None:
            found = re.search(rb'"id":"([^"]+)"', before)
            record["response_id"] = found and found[1].decode()
        if len(CONTENT_CHUNK.findall(before)) >= abandon_after:
            record["close_ns"] = time.time_ns()
            sock.shutdown(socket.SHUT_WR)
            record["abandoned"] = True
    sock.close()
    # Chunks read before the FIN was sent were written before the client left.
    record["chunks"] = len(CONTENT_CHUNK.findall(before))
    record["chunks_after_close"] = len(CONTENT_CHUNK.findall(after))


def main() -> int:
    base_url, plan_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    client = OpenAI(base_url=base_url, api_key="sk-test-not-a-secret", max_retries=0, timeout=120)
    with open(out_path, "w", encoding="utf-8") as out:
        for step in plan:
            headers = dict(step.get("headers") or {})
            if step.get("request_id"):
                headers["x-request-id"] = step["request_id"]
            if step.get("traceparent"):
                headers["traceparent"] = step["traceparent"]
            seed = step.get("seed", 0)
            words = " ".join(
                f"w{(i * 7 + seed * 131) % 4000 + 1}" for i in range(step.get("words", 20))
            )
            args = dict(
                model=step.get("model", "m"),
                messages=[{"role": "user", "content": f"tell me a story {words}"}],
                max_tokens=step["max_tokens"],
                extra_headers=headers,
                extra_body={"ignore_eos": True},
            )
            record = {
                "request_id": step.get("request_id"),
                "abandoned": False,
                "chunks": 0,
                "close_ns": None,
                "response_id": None,
                "usage": None,
                "chunks_after_close": None,
            }
            if step.get("half_close"):
                half_close_stream(base_url, args, headers, step["abandon_after"], record)
            elif step.get("stream", True):
                stream = client.chat.completions.create(stream=True, **args)
                for chunk in stream:
                    record["response_id"] = record["response_id"] or chunk.id
                    if chunk.choices and chunk.choices[0].delta.content:
                        record["chunks"] += 1
                    if step.get("abandon_after") and record["chunks"] >= step["abandon_after"]:
                        record["abandoned"] = True
                        break
                record["close_ns"] = time.time_ns()
                stream.close()
            else:
                response = client.chat.completions.create(**args)
                record["response_id"] = response.id
                record["usage"] = response.usage.model_dump() if response.usage else None
                record["chunks"] = response.usage.completion_tokens if response.usage else 0
                record["close_ns"] = time.time_ns()
            out.write(json.dumps(record) + "\n")
            out.flush()
            # Let the server see the close before the next request starts.
            time.sleep(step.get("pause_s", 0.2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
