#!/usr/bin/env python3
"""Delays the packets a lab host sends, where the kernel has no tc netem.

Usage (inside the host's namespace): delay.py QUEUE DELAY_MS [JITTER_MS]

The lab (lab.mjs, degrade) adds `iptables -t mangle -A POSTROUTING -o eth0 -j NFQUEUE
--queue-num QUEUE --queue-bypass`; every packet the host sends then waits in the kernel's queue
until this program gives its verdict, DELAY_MS (+ up to ±JITTER_MS, uniformly) after it was
queued. Packets keep their order (a jittered packet never overtakes an earlier one: the delay of
each is at least the one before's remaining delay), so TCP sees delay and jitter, not reordering.
Verdicts are given in batches ("accept every packet up to id N"), so a queue notification lost
when this program falls behind (netlink's ENOBUFS) never leaves a packet stuck. If this program
dies, --queue-bypass lets packets through undelayed; with the queue full, the kernel accepts
(FAIL_OPEN) rather than drops.

Speaks nfnetlink_queue directly over an AF_NETLINK socket (Python's standard library only: no
libnetfilter-queue binding is needed).
"""
import os
import random
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_ACCEPT = 1
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5

queue = int(sys.argv[1])
delay = float(sys.argv[2]) / 1000
jitter = float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.0

sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
sock.bind((0, 0))
try:
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
except OSError:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
seq = 0


def attr(kind, payload):
    a = struct.pack("=HH", 4 + len(payload), kind) + payload
    return a + b"\0" * (-len(a) % 4)


def send(msg_type, attrs, flags=NLM_F_REQUEST):
    global seq
    seq += 1
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + b"".join(attrs)
    sock.send(struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body)


def config(*attrs):
    """A configuration message, acknowledged: an error from the kernel ends the program."""
    send(NFQNL_MSG_CONFIG, attrs, NLM_F_REQUEST | NLM_F_ACK)
    while True:
        data = sock.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, kind, _, msg_seq, _ = struct.unpack_from("=IHHII", data, off)
            if kind == NLMSG_ERROR and msg_seq == seq:
                err = struct.unpack_from("=i", data, off + 16)[0]
                if err != 0:
                    sys.exit(f"delay.py: nfnetlink_queue config refused: {os.strerror(-err)}")
                return
            off += (length + 3) & ~3


config(attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
config(attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
config(attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 1 << 16)))
config(attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)), attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)))
print(f"delay.py: queue {queue}, {delay * 1000:g} ms ± {jitter * 1000:g} ms", flush=True)

pending = []  # (due, packet id), in order: dues never decrease
head = 0
last_due = 0.0
while True:
    now = time.monotonic()
    if head < len(pending) and pending[head][0] <= now:
        top = None
        while head < len(pending) and pending[head][0] <= now:
            top = pending[head][1]
            head += 1
        send(NFQNL_MSG_VERDICT_BATCH, [attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, top))])
        if head > 4096:
            del pending[:head]
            head = 0
    timeout = max(0.0, pending[head][0] - time.monotonic()) if head < len(pending) else None
    if not select.select([sock], [], [], timeout)[0]:
        continue
    try:
        data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
    except BlockingIOError:
        continue
    now = time.monotonic()
    off = 0
    while off + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + 20  # after nlmsghdr and nfgenmsg
            end = off + length
            while a + 4 <= end:
                alen, akind = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if (akind & 0x7FFF) == NFQA_PACKET_HDR:
                    pid = struct.unpack_from("!I", data, a + 4)[0]
                    due = max(now + delay + random.uniform(-jitter, jitter), last_due)
                    last_due = due
                    pending.append((due, pid))
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
