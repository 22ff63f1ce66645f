"""`gptkit` through a zygote (zygote.py): python -S zygote_client.py SOCKET ARGS...

Hands ARGS, the working folder, the environment and this process's standard input, output and error
to the zygote, waits for the command's process to end and ends the same way: its exit code, or the
signal that killed it. Only the standard library, so that it starts in milliseconds under `-S`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

HEADER = struct.Struct("!I")  # as in zygote.py, which the client does not import (it imports torch)
STATUS = struct.Struct("!i")


def main(path: str, argv: list[str]) -> int:
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(path)
        except OSError as e:
            log = os.path.splitext(path)[0] + ".log"
            print(f"gptkit (zygote client): no zygote at {path} ({e}); its log: {log}", file=sys.stderr)
            return 70
        socket.send_fds(conn, [HEADER.pack(len(request)) + request], [0, 1, 2])
        reply = b""
        while len(reply) < STATUS.size and (chunk := conn.recv(STATUS.size - len(reply))):
            reply += chunk
    if len(reply) < STATUS.size:
        print("gptkit (zygote client): the zygote's handler ended without an exit code", file=sys.stderr)
        return 70
    code = STATUS.unpack(reply)[0]
    if code < 0:  # killed by a signal: be killed by it too, so a shell sees what it would have
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose action cannot be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
