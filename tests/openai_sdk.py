#!/usr/bin/env python3
"""Drives `shardline serve` with the official OpenAI Python SDK, as users do.

Chat (plain and streamed, with usage), text completions, model listing, and
the errors the SDK maps to exceptions, against tiny-chat's reference answer.

    python3 tests/openai_sdk.py target/release/shardline
"""
import json
import os
import subprocess
import sys

import openai
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = json.load(open(os.path.join(ROOT, "tests/fixtures/tiny-chat/reference.json")))["greedy_chat"][0]
MESSAGES = [{"role": "user", "content": CASE["question"]}]
WANT = CASE["completion_text"]


def start(binary):
    proc = subprocess.Popen(
        [binary, "serve", "--model", os.path.join(ROOT, "models/tiny-chat"), "--host", "127.0.0.1", "--port", "0",
         "--kv-cache-memory", "64MiB", "--api-key", "sk-test"],
        stderr=subprocess.PIPE, text=True)
    address = None
    for line in proc.stderr:
        if line.startswith("shardline: listening on "):
            address = line.split()[-1]
        if line.strip() == "shardline: ready":
            return proc, address
    raise SystemExit("the server did not start")


def main():
    proc, address = start(sys.argv[1])
    client = OpenAI(base_url=f"{address}/v1", api_key="sk-test", max_retries=0)
    checks = []

    def check(name, ok):
        checks.append((name, ok))
        print(f"{'ok' if ok else 'FAILED'}: {name}")

    try:
        models = client.models.list()
        check("models.list names the served model", [m.id for m in models.data] == ["tiny-chat"])

        chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, temperature=0)
        check("chat answers word for word", chat.choices[0].message.content == WANT)
        check("chat usage counts the reference tokens", chat.usage.completion_tokens == len(CASE["completion_ids"])
              and chat.usage.prompt_tokens == len(CASE["prompt_ids"]))

        stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        check("streamed chat answers word for word", text == WANT and finish == "stop")
        check("streamed chat ends with usage", usage is not None and usage.completion_tokens == len(CASE["completion_ids"]))

        completion = client.completions.create(model="tiny-chat", prompt=CASE["prompt_ids"], max_tokens=96, temperature=0)
        check("completions continue token-id prompts", completion.choices[0].text == WANT)

        try:
            client.chat.completions.create(model="tiny-chat", messages=MESSAGES, temperature=-1)
            check("temperature -1 is a BadRequestError", False)
        except openai.BadRequestError as e:
            check("temperature -1 is a BadRequestError", e.status_code == 400 and e.body["param"] == "temperature")
        try:
            client.chat.completions.create(model="gpt-4", messages=MESSAGES)
            check("an unknown model is a NotFoundError", False)
        except openai.NotFoundError:
            check("an unknown model is a NotFoundError", True)
        try:
            OpenAI(base_url=f"{address}/v1", api_key="wrong", max_retries=0).models.list()
            check("a wrong key is an AuthenticationError", False)
        except openai.AuthenticationError:
            check("a wrong key is an AuthenticationError", True)
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    check("SIGTERM exits 0", code == 0)
    failed = sum(not ok for _, ok in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
