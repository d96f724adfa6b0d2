"""The ``associator`` command."""

import argparse
import json
import secrets
import sys
import time
from urllib.parse import urlsplit

import requests
from redis.exceptions import RedisError

from webhook.signature import sign_v1, sign_v3
from workers import connections
from workers.dead_letters import DeadLetterStore
from workers.local_service import LocalService, RunError, local_client_secret
from workers.logs import Redactor, configure_logging
from workers.replay import (
    EntryNotFound,
    PublishFailed,
    ReplayRefused,
    queue_publisher,
    replay,
)
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

    add_dead_letter_commands(commands)

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


# -- associator dead-letters ------------------------------------------------------

DETAIL_WIDTH = 60


def add_dead_letter_commands(commands) -> None:
    dead = commands.add_parser(
        "dead-letters", help="inspect, replay and purge dead letters (needs REDIS_URL)"
    )
    dead.set_defaults(handler=cmd_dead_letters)
    actions = dead.add_subparsers(dest="dead_letters_command", required=True)

    listing = actions.add_parser("list", help="a table of every entry")
    listing.add_argument(
        "--json", action="store_true", help="print the entries as a JSON array"
    )
    listing.set_defaults(action=dead_letters_list)

    show = actions.add_parser("show", help="print one whole entry as JSON")
    show.add_argument("id", help="id of the entry")
    show.set_defaults(action=dead_letters_show)

    again = actions.add_parser(
        "replay", help="queue an entry's events as new work, then remove the entry"
    )
    _entry_selection(again)
    again.set_defaults(action=dead_letters_replay)

    purge = actions.add_parser("purge", help="remove entries without replaying them")
    _entry_selection(purge)
    purge.set_defaults(action=dead_letters_purge)


def _entry_selection(parser) -> None:
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("id", nargs="?", help="id of the entry")
    chosen.add_argument("--all", action="store_true", help="every entry")


class _Output:
    """Prints through a redactor: no secret reaches the terminal."""

    def __init__(self, settings: Settings):
        password = urlsplit(settings.redis_url).password
        self.redact = Redactor([*settings.secrets, password or ""])

    def say(self, text: str) -> None:
        print(self.redact(text))

    def complain(self, text: str) -> None:
        print(self.redact(f"associator: {text}"), file=sys.stderr)


def cmd_dead_letters(args, settings: Settings) -> int:
    settings.require("REDIS_URL", role="`associator dead-letters`")
    output = _Output(settings)
    redis = connections.redis_client(settings, role="operator")
    store = DeadLetterStore(redis, Redactor(settings.secrets))
    try:
        return args.action(args, settings, store, output)
    except RedisError as exc:
        output.complain(f"Redis did not answer ({type(exc).__name__}: {exc})")
        return 1
    finally:
        redis.close()


def dead_letters_list(args, settings, store: DeadLetterStore, output) -> int:
    entries = store.list()
    if args.json:
        output.say(json.dumps([entry.to_json() for entry in entries], indent=2))
        return 0
    if not entries:
        output.say("no dead letters")
        return 0

    rows = [("id", "reason", "portal", "events", "attempts", "first", "last", "detail")]
    for entry in entries:
        rows.append(
            (
                entry.id,
                entry.reason,
                "-" if entry.portal_id is None else str(entry.portal_id),
                str(len(entry.events)),
                str(entry.attempts),
                _when(entry.first_at),
                _when(entry.last_at),
                _short(entry.details),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        output.say(line.rstrip())
    output.say(f"{len(entries)} dead letter(s)")
    return 0


def dead_letters_show(args, settings, store: DeadLetterStore, output) -> int:
    entry = store.get(args.id)
    if entry is None:
        output.complain(str(EntryNotFound(args.id)))
        return 1
    output.say(json.dumps(entry.to_json(), indent=2))
    return 0


def dead_letters_replay(args, settings, store: DeadLetterStore, output) -> int:
    replayed = refused = 0
    with queue_publisher(settings) as publish:
        for entry_id in store.ids() if args.all else [args.id]:
            try:
                result = replay(store, entry_id, publish)
            except EntryNotFound as exc:
                if args.all:
                    continue  # purged or replayed by someone else meanwhile
                output.complain(str(exc))
                return 1
            except ReplayRefused as exc:
                output.complain(f"{exc}; it stays")
                refused += 1
                continue
            except PublishFailed as exc:
                rest = "; the remaining entries stay" if args.all else ""
                output.complain(f"{exc}{rest}")
                return 1

            replayed += 1
            portals = ", ".join(str(p) for p in result.portals)
            output.say(
                f"replayed {result.entry_id}: {result.events} event(s) of "
                f"{'portals' if len(result.portals) > 1 else 'portal'} {portals} "
                f"queued as task {result.task_id}"
            )
            if not result.removed:
                output.say(
                    f"{result.entry_id} was stored again while it was being queued "
                    "(its work failed again) and stays"
                )
    if args.all:
        output.say(f"replayed {replayed} dead letter(s), refused {refused}")
    return 1 if refused else 0


def dead_letters_purge(args, settings, store: DeadLetterStore, output) -> int:
    ids = store.ids() if args.all else [args.id]
    removed = sum(store.remove(entry_id) for entry_id in ids)
    if not args.all and not removed:
        output.complain(str(EntryNotFound(args.id)))
        return 1
    output.say(f"purged {removed} dead letter(s)")
    return 0


def _when(epoch_seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_seconds))


def _short(details: str) -> str:
    """The last line of the details: the message, also of a traceback."""
    lines = [line.strip() for line in details.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if len(text) > DETAIL_WIDTH:
        text = text[: DETAIL_WIDTH - 1] + "…"
    return text


if __name__ == "__main__":
    sys.exit(main())
