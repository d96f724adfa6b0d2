"""The ``associator`` command."""

import argparse
import json
import secrets
import sys
import time

import requests

from webhook.signature import sign_v1, sign_v3
from workers.local_service import LocalService, RunError, local_client_secret
from workers.logs import configure_logging
from workers.rules import FREE_MAIL_DOMAINS, RulesError, load_rules
from workers.settings import ConfigError, Settings, markdown_table

TEST_PORTAL_ID = 62515
TEST_APP_ID = 54321
SEND_TIMEOUT_SECONDS = 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="associator",
        description="Keeps HubSpot CRM associations complete.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="start Redis (embedded unless REDIS_URL), web and worker locally"
    )
    run.add_argument("--host", default="127.0.0.1", help="address the web binds")
    run.set_defaults(handler=cmd_run)

    send = commands.add_parser(
        "send-test-event", help="sign (v1 and v3) and post a delivery of one event"
    )
    send.add_argument("type", help="subscription type, e.g. contact.creation")
    send.add_argument("object_id", type=int, help="id of the record")
    send.add_argument("--url", help="receiver URL (default: the local one on PORT)")
    send.add_argument("--portal-id", type=int, default=TEST_PORTAL_ID)
    send.add_argument(
        "--object-type-id",
        default="0-1",
        help="objectTypeId for object.* types (default 0-1, contact)",
    )
    send.set_defaults(handler=cmd_send_test_event)

    rules = commands.add_parser("rules", help="work with rules files")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_commands.add_parser(
        "check", help="validate a rules file and print what each rule will do"
    )
    check.add_argument("file", nargs="?", help="rules file (default: built-in rules)")
    check.set_defaults(handler=cmd_rules_check)

    table = commands.add_parser(
        "settings", help="print every setting as the README's Markdown table"
    )
    table.set_defaults(handler=cmd_settings)

    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return args.handler(args, settings)
    except (ConfigError, RunError) as exc:
        print(f"associator: {exc}", file=sys.stderr)
        return 2


def cmd_rules_check(args, settings: Settings) -> int:
    try:
        rule_set = load_rules(args.file)
    except RulesError as exc:
        print(f"associator: {exc}", file=sys.stderr)
        return 1
    source = args.file or "built-in defaults"
    print(f"{source}: {len(rule_set.rules)} rule(s)")
    for rule in rule_set.rules:
        print(f"- {rule.name} ({rule.kind}): {rule.describe()}")
    extra = sorted(rule_set.free_mail_domains - FREE_MAIL_DOMAINS)
    if extra:
        print(f"free-mail domains added: {', '.join(extra)}")
    return 0


def cmd_settings(args, settings: Settings) -> int:
    print(markdown_table(), end="")
    return 0


def cmd_run(args, settings: Settings) -> int:
    configure_logging(settings, process="run")
    return LocalService(settings, host=args.host).run()


def cmd_send_test_event(args, settings: Settings) -> int:
    secret = settings.hubspot_client_secret or local_client_secret(
        settings.data_dir, create=False
    )
    if not secret:
        raise ConfigError(
            "no client secret to sign with: set HUBSPOT_CLIENT_SECRET, or start "
            "`associator run` once so it creates a local one"
        )
    url = args.url or f"http://127.0.0.1:{settings.port}/webhooks/hubspot"

    event = {
        "eventId": secrets.randbelow(2**31),
        "subscriptionId": 1,
        "portalId": args.portal_id,
        "appId": TEST_APP_ID,
        "occurredAt": int(time.time() * 1000),
        "subscriptionType": args.type,
        "attemptNumber": 0,
        "objectId": args.object_id,
        "changeSource": "CRM_UI",
        "changeFlag": "CREATED",
    }
    if args.type.startswith("object."):
        event["objectTypeId"] = args.object_type_id
    body = json.dumps([event]).encode()
    timestamp = str(int(time.time() * 1000))
    headers = {
        "Content-Type": "application/json",
        "X-HubSpot-Signature": sign_v1(secret, body),
        "X-HubSpot-Signature-Version": "v1",
        "X-HubSpot-Signature-v3": sign_v3(secret, "POST", url, body, timestamp),
        "X-HubSpot-Request-Timestamp": timestamp,
    }

    try:
        response = requests.post(
            url, data=body, headers=headers, timeout=SEND_TIMEOUT_SECONDS
        )
    except requests.RequestException as exc:
        print(
            f"associator: could not reach {url}: {type(exc).__name__}", file=sys.stderr
        )
        return 1
    print(f"POST {url} -> {response.status_code} {response.text.strip()}".rstrip())
    print(json.dumps(event))
    return 0 if response.ok else 1


if __name__ == "__main__":
    sys.exit(main())
