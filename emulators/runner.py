"""Start every emulator in one process, write the ready file when all listen, stop cleanly on SIGTERM."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from emulators import anthropic_api, confluence, demo, jira, mail, salesforce, slack
from emulators.common import HttpServer

DEFAULT_PORTS = {"anthropic": 8200, "jira": 8201, "slack": 8202, "mail": 8203, "confluence": 8204,
                 "salesforce": 8205, "smtp": 8025}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m emulators`."""
    p = argparse.ArgumentParser(prog="python -m emulators", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    for name, port in DEFAULT_PORTS.items():
        p.add_argument(f"--{name}-port", type=int, default=port, help=f"0 = any free port (default {port})")
    p.add_argument("--ready-file", type=Path, help="JSON with every URL, written atomically once all listen")
    p.add_argument("--anthropic-key", action="append", default=None,
                   help="accepted API key (repeatable; default: EMULATOR_ANTHROPIC_KEY, comma-separated, or 'sk-ant-emulator')")
    p.add_argument("--jira-user", default=os.environ.get("EMULATOR_JIRA_USER", "metis@example.com"))
    p.add_argument("--jira-token", default=os.environ.get("EMULATOR_JIRA_TOKEN", "jira-emulator-token"))
    p.add_argument("--jira-webhook-secret", default=os.environ.get("EMULATOR_JIRA_WEBHOOK_SECRET"),
                   help="secret for webhooks registered without one")
    p.add_argument("--salesforce-client-id", default=os.environ.get("EMULATOR_SALESFORCE_CLIENT_ID", "metis-sf-client"))
    p.add_argument("--salesforce-client-secret", default=os.environ.get("EMULATOR_SALESFORCE_CLIENT_SECRET", "metis-sf-secret"))
    p.add_argument("--seed-demo", action="store_true", help="load demo Jira tickets, clients, pages and accounts")
    return p


@dataclass
class Running:
    """What `start` returns: the servers, the URLs and a stop function."""

    urls: dict[str, Any]
    stop: Callable[[], None]


def start(args: argparse.Namespace) -> Running:
    """Build every app, bind every port, start serving; return URLs and a stopper."""
    env_keys = [k for k in os.environ.get("EMULATOR_ANTHROPIC_KEY", "sk-ant-emulator").split(",") if k]
    keys = tuple(args.anthropic_key or env_keys)
    servers: list[HttpServer] = []
    anthropic_app, _ = anthropic_api.create_app(keys)
    servers.append(HttpServer("anthropic", anthropic_app, args.host, args.anthropic_port))
    extra_stops: list[Callable[[], None]] = []
    urls: dict[str, Any] = {}

    jira_app, jira_state = jira.create_app(user=args.jira_user, token=args.jira_token,
                                           default_secret=args.jira_webhook_secret)
    servers.append(HttpServer("jira", jira_app, args.host, args.jira_port))
    slack_app, _ = slack.create_app()
    servers.append(HttpServer("slack", slack_app, args.host, args.slack_port))
    confluence_app, confluence_state = confluence.create_app(user=args.jira_user, token=args.jira_token)
    servers.append(HttpServer("confluence", confluence_app, args.host, args.confluence_port))
    sf_app, sf_state = salesforce.create_app(client_id=args.salesforce_client_id,
                                             client_secret=args.salesforce_client_secret)
    servers.append(HttpServer("salesforce", sf_app, args.host, args.salesforce_port))
    inbox = mail.Inbox()
    servers.append(HttpServer("mail", mail.create_app(inbox), args.host, args.mail_port))
    smtp = mail.start_smtp(inbox, args.host, args.smtp_port)
    extra_stops.append(smtp.stop)
    urls["smtp"] = {"host": args.host, "port": smtp.port}
    by_name = {srv.name: srv for srv in servers}
    # Self links and instance URLs are known only once every port is bound.
    jira_state.base_url = by_name["jira"].url
    confluence_state.base_url = by_name["confluence"].url
    sf_state.base_url = by_name["salesforce"].url
    if args.seed_demo:
        demo.seed(jira_state, jira_app.config["jira_hub"], confluence_state, sf_state)

    for srv in servers:
        srv.start()
        urls[srv.name] = srv.url

    def stop() -> None:
        for fn in extra_stops:
            fn()
        stoppers = [threading.Thread(target=srv.stop) for srv in servers]  # in parallel: each waits one poll
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(5)

    return Running(urls=urls, stop=stop)


def write_ready(path: Path, urls: dict[str, Any]) -> None:
    """Write the ready file atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ready-")
    with os.fdopen(fd, "w") as fh:
        json.dump({**urls, "pid": os.getpid()}, fh)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run the emulators until SIGTERM / SIGINT."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s emulators %(levelname)s %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    running = start(args)
    if args.ready_file:
        write_ready(args.ready_file, running.urls)
    print(json.dumps(running.urls), flush=True)
    while not done.wait(0.1):  # a timed wait keeps signal handling prompt
        pass
    running.stop()
    if args.ready_file:
        try:
            args.ready_file.unlink()
        except OSError:
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
