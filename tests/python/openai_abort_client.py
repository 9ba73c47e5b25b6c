"""Streams chat completions with the official `openai` client and gives up mid-stream on some,
as user code does: break out of the iteration and close the stream.

Usage: openai_abort_client.py BASE_URL N_REQUESTS OUT_JSONL

Every third request is abandoned after a few chunks. One JSON line per request goes to
OUT_JSONL: request id, whether it was abandoned, chunks received, and the wall-clock time
(unix ns) just before the stream was closed.
"""

import json
import sys
import time

from openai import OpenAI


def main() -> int:
    base_url, n, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    client = OpenAI(base_url=base_url, api_key="sk-test-not-a-secret", max_retries=0, timeout=30)
    with open(out_path, "w", encoding="utf-8") as out:
        for i in range(n):
            request_id = f"openai-py-{i}"
            abandon_after = 3 + (i % 5) if i % 3 == 0 else None
            stream = client.chat.completions.create(
                model="sim-llama-3-8b",
                messages=[
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Tell me a long story number {i}."},
                ],
                max_tokens=60,
                stream=True,
                extra_headers={"x-request-id": request_id, "x-tenant-id": "python"},
            )
            chunks = 0
            closed_ns = None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                if abandon_after is not None and chunks >= abandon_after:
                    break
            closed_ns = time.time_ns()
            # What user code does to stop: close the response (httpx drops the connection).
            stream.close()
            out.write(
                json.dumps(
                    {
                        "request_id": request_id,
                        "abandoned": abandon_after is not None,
                        "chunks": chunks,
                        "close_ns": closed_ns,
                    }
                )
                + "\n"
            )
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
