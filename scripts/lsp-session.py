#!/usr/bin/env python3
"""A scripted editor session against the real star-ls server over stdio (LSP), for the demo.

Opens a file, asks for an inline completion, then types a few characters one at a time and asks again
after each, printing what the server proposed and how many prompt tokens it had to run (the rest came
from its prefix cache). Then the developer writes something else than the last proposal and moves on:
the server records that correction as a failure case (in STAR_LS_DATA_DIR). Then it asks the server to
repair the model (star.repairNow) and completes the same place again, in a fresh copy of the file.
Usage: lsp-session.py STAR_LS_BINARY MODEL FILE
"""
import json
import os
import subprocess
import sys
import time


class Lsp:
    def __init__(self, binary, model):
        env = {"STAR_LS_MODEL": model, "STAR_LS_LOG": "warn", "PATH": "/usr/bin:/bin"}
        # Where the server keeps its data and caches (the LM head's factor): as for any other run, never
        # the working directory, which is where star-ls falls back to without HOME.
        for var in ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "STAR_LS_CACHE_DIR", "STAR_LS_DATA_DIR"):
            if var in os.environ:
                env[var] = os.environ[var]
        self.p = subprocess.Popen([binary, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.next_id = 0

    def send(self, msg):
        body = json.dumps(msg).encode()
        self.p.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.p.stdin.flush()

    def recv(self):
        length = None
        while True:
            line = self.p.stdout.readline().decode().strip()
            if not line:
                break
            name, value = line.split(":", 1)
            if name.lower() == "content-length":
                length = int(value)
        return json.loads(self.p.stdout.read(length))

    def request(self, method, params):
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        while True:
            msg = self.recv()
            if "method" in msg and "id" in msg:  # a server request (progress token): accept it
                self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
            elif msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']['message']}")
                return msg["result"]

    def notify(self, method, params):
        self.send({"jsonrpc": "2.0", "method": method, "params": params})


def main(binary, model, path):
    text = open(path).read()
    lines = text.split("\n")
    line = next(i for i, l in enumerate(lines) if l.strip() == "return")  # the `return ` line
    col = len(lines[line])
    uri = "file://" + path

    lsp = Lsp(binary, model)
    lsp.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
    lsp.notify("initialized", {})
    lsp.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}})

    def complete():
        t0 = time.time()
        result = lsp.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": col},
            "context": {"triggerKind": 2}})
        ms = (time.time() - t0) * 1000
        last = lsp.request("workspace/executeCommand", {"command": "star.status"})["completions"]["last"]
        items = result["items"] if result else []
        shown = items[0]["insertText"] if items else "(nothing)"
        typed = lines[line][:col].strip()
        print(f"  {typed!r:>22} -> {shown!r:<28} {ms:6.0f} ms, ran {last['prefilled']:3} of {last['promptTokens']} prompt tokens")
        return shown

    version = 1

    def insert(at_line, at_col, text):
        nonlocal version
        version += 1
        lsp.notify("textDocument/didChange", {
            "textDocument": {"uri": uri, "version": version},
            "contentChanges": [{"range": {"start": {"line": at_line, "character": at_col},
                                          "end": {"line": at_line, "character": at_col}}, "text": text}]})

    complete()  # cold: loads the model and fills the cache
    for ch in "math.":
        insert(line, col, ch)
        lines[line] += ch
        col += 1
        shown = complete()

    # The developer prefers math.hypot: they type it over the proposal, then go to the next line.
    wanted = "hypot(a, b)"
    print(f"\n  the developer writes {'math.' + wanted!r} instead of {'math.' + shown!r}, then moves on")
    for i, ch in enumerate(wanted):
        insert(line, col + i, ch)
    insert(line, col + len(wanted), "\n")
    status = lsp.request("workspace/executeCommand", {"command": "star.status"})
    print(f"  star.status: failuresPending={status['failuresPending']}, guardCases={status['guardCases']}")

    print("\n  star.repairNow (STAR: locate layers and neurons, solve the patch, check the guard cases) ...")
    report = lsp.request("workspace/executeCommand", {"command": "star.repairNow"})
    print(f"  {report['patchId']}: fixed {report['fixed']} of {report['failures']}, layers {report['layers']}, "
          f"{report['neuronsPerLayer']} neurons each, guard {report['guardBefore']} -> {report['guardAfter']}, "
          f"{report['seconds']:.1f} s")
    fresh = uri.replace(".py", "-again.py")
    lsp.notify("textDocument/didOpen", {"textDocument": {"uri": fresh, "languageId": "python", "version": 1, "text": text}})
    result = lsp.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": fresh}, "position": {"line": line, "character": len(text.split("\n")[line])},
        "context": {"triggerKind": 2}})
    again = result["items"][0]["insertText"] if result and result["items"] else "(nothing)"
    print(f"  the same place in a fresh copy now completes: 'return' -> {again!r}")
    lsp.request("shutdown", None)
    lsp.notify("exit", None)
    lsp.p.wait()


if __name__ == "__main__":
    main(*sys.argv[1:])
