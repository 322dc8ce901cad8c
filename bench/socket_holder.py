#!/usr/bin/env python3
"""Holds qbproxy's listening sockets as systemd does for socket activation
(bench/restart.sh): binds PROXY and ADMIN, then runs the command with them
as descriptors 3 and 4 (LISTEN_FDS=2, LISTEN_FDNAMES=proxy:admin,
LISTEN_PID set in the child), and starts it again whenever it exits, as
Restart=always would, until SIGTERM. Connections that arrive between two
processes wait in the kernel's accept queue.

    socket_holder.py 127.0.0.1:19100 127.0.0.1:19190 -- qbproxy --config FILE
"""
import fcntl
import os
import signal
import socket
import sys


def listen(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(4096)
    return s


def main():
    proxy, admin, sep, *command = sys.argv[1:]
    assert sep == "--", __doc__
    sockets = [listen(proxy), listen(admin)]
    stopping = False
    child = 0

    def stop(*_):
        nonlocal stopping
        stopping = True
        if child:
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    starts = 0
    while not stopping:
        child = os.fork()
        if child == 0:
            # Out of the way first: a socket may already be descriptor 3 or 4.
            high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 10) for s in sockets]
            for target, fd in zip((3, 4), high):
                os.dup2(fd, target, inheritable=True)
                os.close(fd)
            os.environ.update(
                LISTEN_FDS="2", LISTEN_FDNAMES="proxy:admin", LISTEN_PID=str(os.getpid())
            )
            os.execvp(command[0], command)
        starts += 1
        print(f"started {child} (start {starts})", file=sys.stderr, flush=True)
        while True:
            try:
                os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        child = 0


if __name__ == "__main__":
    main()
