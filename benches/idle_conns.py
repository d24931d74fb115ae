#!/usr/bin/env python3
"""Holds N keep-alive connections to 127.0.0.1:PORT, each after one complete GET of PATH,
idle. Prints "open K" once they are up; on SIGUSR1 prints "held K" (connections the
server has not closed) and exits.

usage: idle_conns.py PORT N PATH [AUTHORIZATION]   (PATH "-": connect, send nothing)"""
import asyncio
import resource
import signal
import sys


async def one(port, path, auth, conns):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        if path == "-":  # connect only, send nothing
            conns.append((r, w))
            return
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if auth:
            head += f"Authorization: {auth}\r\n"
        w.write((head + "\r\n").encode())
        await w.drain()
        status = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in status.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await r.readexactly(length)
        conns.append((r, w))
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass


async def main():
    port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    auth = sys.argv[4] if len(sys.argv) > 4 else ""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = []
    for i in range(0, n, 500):
        # A server that neither answers nor refuses (out of worker slots) gets 10 s.
        await asyncio.gather(
            *(asyncio.wait_for(one(port, path, auth, conns), 10) for _ in range(min(500, n - i))),
            return_exceptions=True,
        )
    print(f"open {len(conns)}", flush=True)
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, done.set)
    await done.wait()
    held = 0
    for r, _ in conns:
        # A closed connection reads EOF at once; an open idle one has nothing to read.
        try:
            data = await asyncio.wait_for(r.read(1), 0.001)
            held += 0 if data == b"" else 1
        except asyncio.TimeoutError:
            held += 1
        except OSError:
            pass
    print(f"held {held}", flush=True)


asyncio.run(main())
