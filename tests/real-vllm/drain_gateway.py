"""A metering gateway that bills by reading the runtime's stream to its end: when its client
leaves, it keeps its upstream connection open and drains the rest of the response (what a
metering layer in front of a runtime does). This is the billing gap itself: the runtime never
sees the cancel, keeps decoding, and every token is counted.

Usage: drain_gateway.py LISTEN_PORT UPSTREAM_PORT OUT_JSONL

HTTP/1.1 only, one request per client connection, the request forwarded as it came (headers
included: `traceparent` and `x-request-id` pass). Prints `READY` once listening. One JSON line
per request goes to OUT_JSONL: its `x-request-id`, the content chunks the client got, the
content chunks the gateway drained after the client left (ground truth of tokens generated
after the client left), and the wall-clock time (unix ns) the gateway saw the client leave.
"""

import asyncio
import json
import re
import sys
import time

# A chunk that carries generated text (the first may carry the role too).
CONTENT_CHUNK = re.compile(rb'"delta":\{[^}]*"content":"[^"]')


async def read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    request_id = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() == b"x-request-id":
            request_id = value.strip().decode()
    body = await reader.readexactly(length) if length else b""
    return head, body, request_id


async def handle(client_r, client_w, upstream_port, out):
    try:
        head, body, request_id = await read_request(client_r)
    except (asyncio.IncompleteReadError, ConnectionError):
        client_w.close()
        return
    up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
    # One request per connection upstream too: the runtime sees the gateway's connection end
    # only when the response has ended.
    head = re.sub(rb"(?im)^connection:[^\r\n]*\r\n", b"", head)
    head = head[:-2] + b"Connection: close\r\n\r\n"
    up_w.write(head + body)
    await up_w.drain()
    record = {"request_id": request_id, "chunks_to_client": 0, "chunks_after_client_left": 0,
              "client_left_ns": None}
    left = asyncio.Event()

    async def watch_client():
        # The request is read: the next read ends when the client closes its side.
        try:
            while await client_r.read(4096):
                pass
        except ConnectionError:
            pass
        record["client_left_ns"] = time.time_ns()
        left.set()

    watcher = asyncio.create_task(watch_client())
    pending = b""
    while True:
        data = await up_r.read(65536)
        if not data:
            break
        pending += data
        # Count whole SSE events only.
        end = pending.rfind(b"\n\n")
        if end < 0:
            events = b""
        else:
            events, pending = pending[: end + 2], pending[end + 2 :]
        chunks = len(CONTENT_CHUNK.findall(events))
        if left.is_set():
            record["chunks_after_client_left"] += chunks
            continue
        try:
            client_w.write(data)
            await client_w.drain()
            record["chunks_to_client"] += chunks
        except ConnectionError:
            left.set()
            record["client_left_ns"] = record["client_left_ns"] or time.time_ns()
            record["chunks_after_client_left"] += chunks
    # The response ended: whatever is left is whole events.
    tail = len(CONTENT_CHUNK.findall(pending))
    record["chunks_after_client_left" if left.is_set() else "chunks_to_client"] += tail
    watcher.cancel()
    up_w.close()
    client_w.close()
    out.write(json.dumps(record) + "\n")
    out.flush()


# asyncio holds a connection's handler task only through the connection: when the client
# leaves, the task would be collected mid-drain. Draining outlives the client, so the gateway
# holds its handlers itself.
HANDLERS = set()


async def handle_logged(client_r, client_w, upstream_port, out):
    HANDLERS.add(asyncio.current_task())
    try:
        await handle(client_r, client_w, upstream_port, out)
    except Exception as e:  # one request's failure is reported, the gateway goes on
        print(f"drain_gateway: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        HANDLERS.discard(asyncio.current_task())


async def main():
    port, upstream_port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    out = open(out_path, "a", encoding="utf-8")
    server = await asyncio.start_server(
        lambda r, w: handle_logged(r, w, upstream_port, out), "127.0.0.1", port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
