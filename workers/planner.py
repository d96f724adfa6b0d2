"""Plan the associations a batch of events calls for, and write the missing ones.

Events are planned together so that a batch costs a handful of API calls however
many events it holds: records are read in one batch call per type, candidates are
found with one ``IN`` search per rule or one association read per hop, existing
associations are read in one call per pair of types, and the missing ones are
written in one call per pair of types and kind of write.

The service only adds. A labeled write sends the pair's existing types plus the
new one, because HubSpot replaces a pair's labels with the ones sent. An existing
Primary is never moved: Primary is only added to a record that has none.

Before writing, each association is claimed in Redis (``SET NX``) so that two
plans racing for the same pair write it once, and each Primary is claimed on its
record so that two plans choosing different targets never move each other's; a
failed write releases its claims. A claim names its owner, the task: a task whose
worker died before writing runs again under the same id and takes its claims back,
where another plan would count the pair as being written.

An association change re-plans what a via rule builds on it. A change on the
rule's first hop (a deal gains a contact) re-plans that record; a change on its
second hop (a contact gains a company) re-plans the records associated with the
through-record (the contact's deals), read in one batch call per plan.
"""

import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field

from workers.events import ASSOCIATION_CHANGE, Event, object_label
from workers.hubspot import (
    INPUTS_PER_ASSOCIATION_WRITE,
    AssociationInput,
    AssociationType,
    HubSpotError,
    PermanentError,
    TransientError,
)
from workers.labels import LabelResolver
from workers.rules import (
    MATCH,
    PRIMARY,
    REFERENCE,
    UNLABELED,
    VIA,
    Rule,
    RuleSet,
    url_host,
)

CLAIM_PREFIX = "associator:write:"
PRIMARY_CLAIM_PREFIX = "associator:primary:"
LABELING_SUFFIX = ":labeling"
# What a pair's claim holds once its write succeeded (before: the owner's id).
WRITTEN = "written"
CLAIM_POLL_SECONDS = 0.05


class PairBusy(TransientError):
    """Another plan is writing labels to this pair: a labeled write replaces a
    pair's labels, so this one waits and reads the pair again."""


EMAIL_LIKE = ("email_domain", "url_host")


@dataclass(frozen=True)
class Pair:
    from_type: str
    from_id: int
    to_type: str
    to_id: int

    def __str__(self) -> str:
        return (
            f"{object_label(self.from_type)}:{self.from_id}"
            f"\u2192{object_label(self.to_type)}:{self.to_id}"
        )

    def claim_key(self, portal_id: int, suffix: str = "") -> str:
        # The same whichever side planned it: both ends in a fixed order.
        ends = sorted(
            [f"{self.from_type}:{self.from_id}", f"{self.to_type}:{self.to_id}"]
        )
        return f"{CLAIM_PREFIX}{portal_id}:{ends[0]}:{ends[1]}{suffix}"


@dataclass
class Subject:
    """A record to plan for, and the event it came from."""

    event: Event
    object_type: str
    object_id: int
    rules: list[tuple[Rule, bool]]  # (rule, reverse)


@dataclass
class Wanted:
    pair: Pair
    types: set[AssociationType]
    rules: set[str]
    events: set[str]


@dataclass
class PlanResult:
    outcomes: dict[str, dict] = field(default_factory=dict)
    recheck: list[Event] = field(default_factory=list)
    retry: list[tuple[Event, HubSpotError]] = field(default_factory=list)
    dead: list[tuple[Event, str, str]] = field(default_factory=list)
    api_calls: int = 0
    created: int = 0


class Planner:
    def __init__(
        self,
        *,
        client,
        portal_id: int,
        rules: RuleSet,
        labels: LabelResolver,
        redis,
        claim_seconds: int,
        claim_owner: str | None = None,
        claim_wait_seconds: float = 0.0,
        dry_run: bool = False,
    ):
        self.client = client
        self.portal_id = portal_id
        self.rules = rules
        self.labels = labels
        self.redis = redis
        self.claim_seconds = claim_seconds
        # The task id in a worker; without one each planner owns its own claims.
        self.claim_owner = claim_owner or secrets.token_hex(8)
        # How long to wait for another plan's write of a pair to end before
        # leaving the pair to a later read.
        self.claim_wait_seconds = claim_wait_seconds
        self.dry_run = dry_run

    # -- the whole plan ---------------------------------------------------------

    def run(self, events: list[Event], *, recheck: bool = False) -> PlanResult:
        result = PlanResult()
        calls_before = self.client.api_calls
        self._primary_asks: dict[tuple[str, int, str], dict[Pair, bool]] = {}
        self._has_primary: set[tuple[str, int, str]] = set()
        self._claims: dict[Pair, list[str]] = {}
        self._written: dict[Pair, tuple] = {}
        self._dry: set[Pair] = set()
        skip: dict[str, str] = {}
        found: dict[str, list[Pair]] = defaultdict(list)
        rules_of: dict[str, set[str]] = defaultdict(set)
        no_candidate_match: set[str] = set()

        subjects = self._subjects(events, skip)
        records = self._read_records(subjects)
        subjects = self._plannable(subjects, records, skip)

        by_rule: dict[tuple[str, bool], list[Subject]] = defaultdict(list)
        for subject in subjects:
            if subject.event.dedup_key in skip:
                continue
            for rule, reverse in subject.rules:
                if _passes(rule, reverse, records.get(_ref(subject))):
                    by_rule[(rule.name, reverse)].append(subject)

        rules_by_name = {r.name: r for r in self.rules.rules}
        # (event, rule, subject) -> pairs: one event may plan several records
        # (a contact's change re-plans each of its deals).
        candidates: dict[tuple[str, str, tuple[str, int]], list[Pair]] = {}
        free_mail: set[str] = set()
        # Via rules go last, so that a record planned with its through-records (a
        # deal created with its contacts) also gets what this plan gives them.
        ordered = sorted(
            by_rule, key=lambda name_reverse: rules_by_name[name_reverse[0]].kind == VIA
        )
        for name, reverse in ordered:
            group = by_rule[(name, reverse)]
            rule = rules_by_name[name]
            pairs_of = self._candidates(
                rule, reverse, group, records, free_mail, candidates
            )
            for subject in group:
                key = subject.event.dedup_key
                pairs = pairs_of.get(_ref(subject), [])
                rule_key = name + ("/reverse" if reverse else "")
                candidates[(key, rule_key, _ref(subject))] = pairs
                rules_of[key].add(name)
                found[key].extend(pairs)
                # Search lags writes: a match whose search found nothing looks
                # again later. One with nothing to search for (no value, a
                # free-mail domain) would find nothing then either.
                if rule.kind == MATCH and not pairs and _ref(subject) in pairs_of:
                    no_candidate_match.add(key)

        wanted = self._wanted(candidates, rules_by_name)
        existing = self._existing(wanted)
        writes, present = self._decide(wanted, existing)
        done, failed = self._write(writes, result)

        self._outcomes(
            events,
            skip=skip,
            found=found,
            rules_of=rules_of,
            free_mail=free_mail,
            no_candidate_match=no_candidate_match,
            wanted=wanted,
            done=done,
            present=present,
            failed=failed,
            recheck=recheck,
            result=result,
        )
        result.api_calls = self.client.api_calls - calls_before
        return result

    # -- what to plan ------------------------------------------------------------

    def _subjects(self, events, skip) -> list[Subject]:
        subjects = []
        onward: list[tuple[Event, Rule, int]] = []
        for event in events:
            if event.kind == ASSOCIATION_CHANGE:
                direct, through = self._replan_subjects(event)
                if not direct and not through:
                    skip[event.dedup_key] = "no_rule"
                subjects.extend(direct)
                onward.extend(through)
                continue
            rules = [(r, False) for r in self.rules.forward(event.object_type_id)]
            rules += [(r, True) for r in self.rules.reverse(event.object_type_id)]
            if not rules:
                skip[event.dedup_key] = "no_rule"
                continue
            subjects.append(
                Subject(event, event.object_type_id, event.object_id, rules)
            )

        subjects.extend(self._through_subjects(onward))
        # A change that feeds a rule but whose through-record has none of the
        # rule's records (a contact without deals) has nothing to plan.
        planned = {s.event.dedup_key for s in subjects}
        for event, _, _ in onward:
            if event.dedup_key not in planned:
                skip[event.dedup_key] = "no_candidate"
        return subjects

    def _replan_subjects(self, event: Event):
        """What an association change re-plans, in two lists.

        The first holds the subjects planned at once: the changed record of each
        via rule whose first hop the pair is. The second holds (event, rule,
        through-record id) for each via rule whose second hop it is; the
        through-record's records are read for the whole plan at once.
        """
        change = event.association
        if change is None or change.removed:
            return [], []
        ends = {"from": change.from_object_id, "to": change.to_object_id}
        if None in ends.values():
            return [], []

        direct = [
            Subject(event, rule.from_type, ends[side], [(rule, False)])
            for rule, side in self.rules.replan_triggers(
                change.from_object_type_id, change.to_object_type_id
            )
        ]
        through = [
            (event, rule, ends[side])
            for rule, side in self.rules.replan_through_triggers(
                change.from_object_type_id, change.to_object_type_id
            )
        ]
        return direct, through

    def _through_subjects(self, onward) -> list[Subject]:
        """The records associated with each through-record, as subjects of its
        via rule; one batch read per pair of types for the whole plan."""
        ids: dict[tuple[str, str], set[int]] = defaultdict(set)
        for _, rule, through_id in onward:
            ids[(rule.through_type, rule.from_type)].add(through_id)
        links = {
            (through_type, from_type): self.client.read_associations(
                through_type, from_type, sorted(through_ids)
            )
            for (through_type, from_type), through_ids in ids.items()
        }

        subjects = []
        for event, rule, through_id in onward:
            for link in links[(rule.through_type, rule.from_type)].get(through_id, []):
                subjects.append(
                    Subject(event, rule.from_type, link.to_id, [(rule, False)])
                )
        return subjects

    def _read_records(self, subjects) -> dict[tuple[str, int], dict | None]:
        """The properties the subjects' rules need; None for a missing record."""
        needed: dict[str, set[str]] = defaultdict(set)
        ids: dict[str, set[int]] = defaultdict(set)
        for subject in subjects:
            props = set()
            for rule, reverse in subject.rules:
                props |= set(rule.when) if not reverse else set()
                if reverse:
                    props.add(rule.to_property)
                elif rule.kind in (MATCH, REFERENCE):
                    props.add(rule.property)
            if props:
                needed[subject.object_type] |= props
                ids[subject.object_type].add(subject.object_id)

        records = {}
        for object_type, type_ids in ids.items():
            read = self.client.read_records(
                object_type, sorted(type_ids), sorted(needed[object_type])
            )
            for record_id, properties in read.records.items():
                records[(object_type, record_id)] = properties
            for record_id in read.missing:
                records[(object_type, record_id)] = None
        return records

    def _plannable(self, subjects, records, skip) -> list[Subject]:
        """The subjects whose record exists and passes a rule's filters.

        An event is skipped only when none of its subjects is left: a contact's
        change still re-plans its other deals when one of them is gone.
        """
        kept = []
        reasons: dict[str, str] = {}
        for subject in subjects:
            key = subject.event.dedup_key
            record = records.get(_ref(subject), {})
            if record is None:
                reasons.setdefault(key, "record_missing")
            elif not any(_passes(r, rev, record) for r, rev in subject.rules):
                reasons.setdefault(key, "filtered_out")
            else:
                kept.append(subject)

        planned = {s.event.dedup_key for s in kept}
        for key, reason in reasons.items():
            if key not in planned:
                skip[key] = reason
        return kept

    # -- candidates --------------------------------------------------------------

    def _candidates(self, rule, reverse, group, records, free_mail, planned):
        """{(type, id) of subject: [pairs in the rule's direction]}."""
        if rule.kind == VIA:
            return self._via(rule, group, planned)
        if rule.kind == REFERENCE:
            return self._reference(rule, group, records)
        if reverse:
            return self._match_reverse(rule, group, records, free_mail)
        return self._match(rule, group, records, free_mail)

    def _match(self, rule: Rule, group, records, free_mail):
        values = {}
        for subject in group:
            value = rule.normalise(
                (records.get(_ref(subject)) or {}).get(rule.property)
            )
            if value is None:
                continue
            if rule.transform in EMAIL_LIKE and value in self.rules.free_mail_domains:
                free_mail.add(subject.event.dedup_key)
                continue
            values[_ref(subject)] = value
        if not values:
            return {}

        found = self.client.search(
            rule.to_type,
            rule.to_property,
            _searched_values(rule, values.values()),
            [rule.to_property],
        )
        by_value = defaultdict(list)
        for record in found:
            value = _normalise_other(rule, record["properties"].get(rule.to_property))
            if value is not None:
                by_value[value].append(record["id"])
        return {
            ref: [
                Pair(rule.from_type, ref[1], rule.to_type, to_id)
                for to_id in sorted(set(by_value.get(value, [])))
            ]
            for ref, value in values.items()
        }

    def _match_reverse(self, rule: Rule, group, records, free_mail):
        values = {}
        for subject in group:
            record = records.get(_ref(subject)) or {}
            value = _normalise_other(rule, record.get(rule.to_property))
            if value is None:
                continue
            if rule.transform in EMAIL_LIKE and value in self.rules.free_mail_domains:
                free_mail.add(subject.event.dedup_key)
                continue
            values[_ref(subject)] = value
        if not values:
            return {}

        search_property = rule.reverse_property or rule.property
        properties = sorted({rule.property, search_property, *rule.when})
        found = self.client.search(
            rule.from_type,
            search_property,
            _searched_values(rule, values.values()),
            properties,
        )
        by_value = defaultdict(list)
        for record in found:
            props = record["properties"]
            # The rule's filters are on its from-records: here, the ones found.
            if not _passes(rule, False, props):
                continue
            value = rule.normalise(props.get(rule.property))
            if value is None and search_property != rule.property:
                value = _normalise_other(rule, props.get(search_property))
            if value is not None:
                by_value[value].append(record["id"])
        return {
            ref: [
                Pair(rule.from_type, from_id, rule.to_type, ref[1])
                for from_id in sorted(set(by_value.get(value, [])))
            ]
            for ref, value in values.items()
        }

    def _via(self, rule: Rule, group, planned):
        subject_ids = sorted({s.object_id for s in group})
        first = self.client.read_associations(
            rule.from_type, rule.through_type, subject_ids
        )
        through_ids = sorted({a.to_id for links in first.values() for a in links})
        second = (
            self.client.read_associations(rule.through_type, rule.to_type, through_ids)
            if through_ids
            else {}
        )
        # What this plan gives the through-records, in either direction: HubSpot
        # may not have it yet.
        planned_links = defaultdict(set)
        for pair in (p for pairs in planned.values() for p in pairs):
            if (pair.from_type, pair.to_type) == (rule.through_type, rule.to_type):
                planned_links[pair.from_id].add(pair.to_id)
            elif (pair.to_type, pair.from_type) == (rule.through_type, rule.to_type):
                planned_links[pair.to_id].add(pair.from_id)

        result = {}
        for subject_id in subject_ids:
            targets = set()
            for link in first.get(subject_id, []):
                targets |= {a.to_id for a in second.get(link.to_id, [])}
                targets |= planned_links[link.to_id]
            result[(rule.from_type, subject_id)] = [
                Pair(rule.from_type, subject_id, rule.to_type, to_id)
                for to_id in sorted(targets)
            ]
        return result

    def _reference(self, rule: Rule, group, records):
        values = {}
        for subject in group:
            raw = (records.get(_ref(subject)) or {}).get(rule.property)
            value = rule.normalise(raw)
            if value is not None:
                values[_ref(subject)] = value
        if not values:
            return {}

        by_value = defaultdict(list)
        if rule.to_property is None:
            ids = sorted({int(v) for v in values.values() if v.isdigit()})
            if ids:
                read = self.client.read_records(rule.to_type, ids, [])
                for record_id in read.records:
                    by_value[str(record_id)].append(record_id)
        else:
            found = self.client.search(
                rule.to_type,
                rule.to_property,
                sorted(set(values.values())),
                [rule.to_property],
            )
            for record in found:
                value = rule.normalise(record["properties"].get(rule.to_property))
                if value is not None:
                    by_value[value].append(record["id"])
        return {
            ref: [
                Pair(rule.from_type, ref[1], rule.to_type, to_id)
                for to_id in sorted(set(by_value.get(value, [])))
            ]
            for ref, value in values.items()
        }

    # -- what is missing ---------------------------------------------------------

    def _wanted(self, candidates, rules_by_name) -> dict[Pair, Wanted]:
        wanted: dict[Pair, Wanted] = {}
        # (from end) -> {pair: strict}; strict asks (from a reverse match) need the
        # from-record to have no association of the target type at all.
        primary_asks: dict[tuple[str, int, str], dict[Pair, bool]] = defaultdict(dict)
        for (event_key, rule_key, _), pairs in candidates.items():
            rule = rules_by_name[rule_key.removesuffix("/reverse")]
            label = (
                None
                if rule.association in (UNLABELED, PRIMARY)
                else self._type(rule, rule.association)
            )
            for pair in pairs:
                entry = wanted.setdefault(pair, Wanted(pair, set(), set(), set()))
                entry.types.add(self._type(rule, UNLABELED))
                if label is not None:
                    entry.types.add(label)
                entry.rules.add(rule.name)
                entry.events.add(event_key)
            if not _wants_primary(rule):
                continue
            reverse = rule_key.endswith("/reverse")
            if reverse or len(pairs) == 1:
                for pair in pairs:
                    ends = (pair.from_type, pair.from_id, pair.to_type)
                    primary_asks[ends][pair] = reverse or primary_asks[ends].get(
                        pair, False
                    )

        # Primary goes only where one target is asked for in the whole plan; the
        # check against existing associations happens once they are read.
        self._primary_asks = {
            ends: asks
            for ends, asks in primary_asks.items()
            if len({p.to_id for p in asks}) == 1
        }
        return wanted

    def _type(self, rule: Rule, name: str) -> AssociationType:
        return self.labels.resolve(
            self.client, self.portal_id, rule.from_type, rule.to_type, name
        )

    def _existing(self, wanted) -> dict[Pair, set[AssociationType]]:
        from_ids: dict[tuple[str, str], set[int]] = defaultdict(set)
        for pair in wanted:
            from_ids[(pair.from_type, pair.to_type)].add(pair.from_id)

        existing: dict[Pair, set[tuple[str, int]]] = {}
        for (from_type, to_type), ids in from_ids.items():
            links = self.client.read_associations(from_type, to_type, sorted(ids))
            for from_id, associations in links.items():
                for association in associations:
                    ends = (from_type, from_id, to_type)
                    pair = Pair(from_type, from_id, to_type, association.to_id)
                    existing[pair] = {_plain(t) for t in association.types}
                    if any(t.label == PRIMARY for t in association.types):
                        self._has_primary.add(ends)
        return existing

    def _decide(self, wanted, existing):
        writes: dict[Pair, tuple[set, set]] = {}
        present: set[Pair] = set()
        for pair, entry in wanted.items():
            types = set(entry.types)
            ends = (pair.from_type, pair.from_id, pair.to_type)
            asks = self._primary_asks.get(ends, {})
            if pair in asks and ends not in self._has_primary:
                strict = asks[pair]
                others = any(
                    p.to_id != pair.to_id for p in existing if _ends(p) == ends
                )
                if not (strict and others):
                    rule = next(
                        r
                        for r in self.rules.rules
                        if r.name in entry.rules and _wants_primary(r)
                    )
                    types.add(self._type(rule, PRIMARY))
            have = existing.get(pair, set())
            missing = {t for t in types if _plain(t) not in have}
            if not missing:
                present.add(pair)
                continue
            writes[pair] = (have, missing)
        return writes, present

    # -- writing -----------------------------------------------------------------

    def _write(self, writes, result) -> tuple[set[Pair], dict[Pair, HubSpotError]]:
        done: set[Pair] = set()
        failed: dict[Pair, HubSpotError] = {}
        if not writes:
            return done, failed

        # Another plan has written the written ones: they count as present. It is
        # still writing the taken ones, and its write may yet fail, so they are
        # read again later, as are the busy ones, which wait for another plan's
        # labels.
        claimed, written, taken, busy = self._claim(writes)
        for pair in taken:
            failed[pair] = PairBusy(
                f"another plan is writing {pair}; it is read again later"
            )
        for pair, seconds in busy.items():
            # The other plan keeps its claim after writing: waiting less would
            # only spend attempts on a pair that is still busy.
            failed[pair] = PairBusy(
                f"another plan is writing labels to {pair}; it is read again later",
                retry_after=seconds,
            )
        if self.dry_run:
            self._release(claimed)
            self._dry = set(claimed) | written | taken
            return done, failed

        batches: dict[tuple[str, str, str], list[tuple[Pair, AssociationInput]]] = (
            defaultdict(list)
        )
        for pair, (have, missing) in claimed.items():
            if _labeled(have, missing):
                types = tuple(sorted(have | {_plain(t) for t in missing}))
                kind = "create"
            else:
                types = ()
                kind = "default"
            batches[(pair.from_type, pair.to_type, kind)].append(
                (pair, AssociationInput(pair.from_id, pair.to_id, types))
            )

        # One call per chunk, so that a call failing fails only its own pairs: the
        # client raises for a failed call and forgets what the earlier ones wrote.
        calls = [
            (key, items[start : start + INPUTS_PER_ASSOCIATION_WRITE])
            for key, items in batches.items()
            for start in range(0, len(items), INPUTS_PER_ASSOCIATION_WRITE)
        ]
        for (from_type, to_type, kind), items in calls:
            inputs = [item for _, item in items]
            by_input = {(i.from_id, i.to_id): p for p, i in items}
            try:
                if kind == "create":
                    outcome = self.client.create_associations(
                        from_type, to_type, inputs
                    )
                else:
                    outcome = self.client.associate_default(
                        from_type, to_type, [(i.from_id, i.to_id) for i in inputs]
                    )
            except HubSpotError as exc:
                for pair, _ in items:
                    failed[pair] = exc
                continue
            for item in outcome.done:
                done.add(by_input[(item.from_id, item.to_id)])
            for item, error in outcome.failed:
                failed[by_input[(item.from_id, item.to_id)]] = error

        if failed:
            self._release(failed)
        if done:
            # Other plans may count these as present from now on.
            pipe = self.redis.pipeline()
            for pair in done:
                pipe.set(
                    self._claim_key(pair, claimed[pair][1]),
                    WRITTEN,
                    xx=True,
                    keepttl=True,
                )
            pipe.execute()
        result.created += len(done)
        self._written = {p: claimed[p] for p in done}
        return done | written, failed

    def _claim(self, writes) -> tuple[dict, set[Pair], set[Pair], dict[Pair, float]]:
        """(the writes this plan makes, the pairs another plan has written, the
        pairs another plan is writing, the pairs whose labels another plan is
        writing, with the seconds its claim still holds)."""
        pairs = list(writes)
        holders = self._holders([self._claim_key(p, writes[p][1]) for p in pairs])
        claimed = {
            p: writes[p]
            for p, holder in zip(pairs, holders, strict=True)
            if holder == self.claim_owner
        }
        # Written by another plan since this one read: present. Still being
        # written: busy, since that write may yet fail.
        written = {
            p for p, holder in zip(pairs, holders, strict=True) if holder == WRITTEN
        }
        taken = set(writes) - set(claimed) - written
        self._await_writes(writes, taken, claimed, written)
        self._claims = {p: [self._claim_key(p, claimed[p][1])] for p in claimed}

        # A record has one Primary: the plan that claims it on the record first
        # writes it, and a plan that finds it claimed writes the rest without it.
        asking = [p for p, (_, missing) in claimed.items() if _has_primary(missing)]
        won = self._set_nx([self._primary_claim_key(p) for p in asking])
        for pair, ok in zip(asking, won, strict=True):
            if ok:
                self._claims[pair].append(self._primary_claim_key(pair))
                continue
            have, missing = claimed[pair]
            missing = {t for t in missing if t.label != PRIMARY}
            if missing:
                claimed[pair] = (have, missing)
            else:
                self._release([pair])
                del claimed[pair]
                taken.add(pair)

        # A labeled write sends the labels this plan read; while another plan's
        # labeled write to the pair may land in between, it must not be sent.
        # The claim is kept after the write, so a plan whose read came before
        # it waits until it expires, then reads again.
        labeling = [
            p for p, (have, missing) in claimed.items() if _labeled(have, missing)
        ]
        won = self._set_nx([self._labeling_claim_key(p) for p in labeling])
        busy = []
        for pair, ok in zip(labeling, won, strict=True):
            if ok:
                self._claims[pair].append(self._labeling_claim_key(pair))
            else:
                busy.append(pair)
                del claimed[pair]
        holds = {}
        if busy:
            pipe = self.redis.pipeline()
            for pair in busy:
                pipe.pttl(self._labeling_claim_key(pair))
            answers = pipe.execute()
            holds = {p: max(ms, 0) / 1000 for p, ms in zip(busy, answers, strict=True)}
        return claimed, written, taken, holds

    def _await_writes(self, writes, taken, claimed, written) -> None:
        """Wait briefly for other plans' writes of the ``taken`` pairs to end:
        a pair they wrote joins ``written``; one whose write failed (its claim
        released) is claimed here and joins ``claimed``. The rest stay taken."""
        deadline = time.monotonic() + self.claim_wait_seconds
        while taken and time.monotonic() < deadline:
            time.sleep(CLAIM_POLL_SECONDS)
            pending = sorted(taken, key=str)
            holders = self._holders([self._claim_key(p, writes[p][1]) for p in pending])
            for pair, holder in zip(pending, holders, strict=True):
                if holder == WRITTEN:
                    written.add(pair)
                elif holder == self.claim_owner:
                    claimed[pair] = writes[pair]
                else:
                    continue
                taken.discard(pair)

    def _set_nx(self, keys: list[str]) -> list[bool]:
        """Claim ``keys``: True for each one this plan's owner holds now, newly or
        from an earlier delivery of its task."""
        return [holder == self.claim_owner for holder in self._holders(keys)]

    def _holders(self, keys: list[str]) -> list[str]:
        """Claim ``keys``; answer who holds each one now: this plan's owner (newly
        or from an earlier delivery of its task), another, or ``WRITTEN``."""
        if not keys:
            return []
        pipe = self.redis.pipeline()
        for key in keys:
            pipe.set(key, self.claim_owner, nx=True, ex=self.claim_seconds)
            pipe.get(key)
        answers = pipe.execute()
        taken_back = [
            key
            for key, new, holder in zip(keys, answers[::2], answers[1::2], strict=True)
            if not new and _text(holder) == self.claim_owner
        ]
        if taken_back:
            pipe = self.redis.pipeline()
            for key in taken_back:
                pipe.expire(key, self.claim_seconds)
            pipe.execute()
        return [_text(holder) for holder in answers[1::2]]

    def _release(self, pairs) -> None:
        keys = [key for pair in pairs for key in self._claims.pop(pair, [])]
        if keys:
            self.redis.delete(*keys)

    def _claim_key(self, pair: Pair, missing) -> str:
        labels = sorted(t.type_id for t in missing if t.label)
        return pair.claim_key(
            self.portal_id, ":" + ",".join(map(str, labels)) if labels else ""
        )

    def _labeling_claim_key(self, pair: Pair) -> str:
        return pair.claim_key(self.portal_id, LABELING_SUFFIX)

    def _primary_claim_key(self, pair: Pair) -> str:
        return (
            f"{PRIMARY_CLAIM_PREFIX}{self.portal_id}:"
            f"{pair.from_type}:{pair.from_id}:{pair.to_type}"
        )

    # -- outcomes ----------------------------------------------------------------

    def _outcomes(
        self,
        events,
        *,
        skip,
        found,
        rules_of,
        free_mail,
        no_candidate_match,
        wanted,
        done,
        present,
        failed,
        recheck,
        result,
    ):
        written = self._written
        dry = self._dry
        # A pair written once counts as created for the first event of the plan
        # that wanted it, and as present for the others.
        credited: set[Pair] = set()
        for event in events:
            key = event.dedup_key
            if key in result.outcomes:
                continue
            if key in skip:
                result.outcomes[key] = {"outcome": "skipped", "reason": skip[key]}
                continue
            pairs = sorted(set(found.get(key, [])), key=str)
            errors = [failed[p] for p in pairs if p in failed]
            if errors:
                permanent = [e for e in errors if isinstance(e, PermanentError)]
                if permanent:
                    error = permanent[0]
                    result.dead.append((event, "hubspot_refused", error.describe()))
                else:
                    result.retry.append((event, errors[0]))
                continue
            if not pairs:
                if key in no_candidate_match and not recheck:
                    result.recheck.append(event)
                    continue
                reason = "free_mail_domain" if key in free_mail else "no_candidate"
                result.outcomes[key] = {"outcome": "skipped", "reason": reason}
                continue
            if dry & set(pairs):
                result.outcomes[key] = {
                    "outcome": "skipped",
                    "reason": "dry_run",
                    "rules": sorted(rules_of[key]),
                    "planned": [str(p) for p in pairs if p in dry],
                }
                continue
            created = [p for p in pairs if p in written and p not in credited]
            credited.update(created)
            result.outcomes[key] = {
                "outcome": "applied",
                "rules": sorted(rules_of[key]),
                "created": len(created),
                "present": len(pairs) - len(created),
                "written": [_written_text(p, written[p]) for p in created],
            }


def _searched_values(rule: Rule, values) -> list[str]:
    """The values one ``IN`` search asks for.

    A host is compared without a leading ``www.``, but HubSpot stores what a user
    typed (``www.acme.com``): each host is searched in both forms, side by side so
    that a chunk of the client's search holds both, and what comes back is
    normalised again.
    """
    unique = sorted(set(values))
    if rule.transform not in EMAIL_LIKE:
        return unique
    return [form for value in unique for form in (value, f"www.{value}")]


def _labeled(have, missing) -> bool:
    """Whether the write must send types (and so replaces the pair's labels)."""
    return bool(have) or any(t.label for t in missing) or len(missing) > 1


def _wants_primary(rule: Rule) -> bool:
    # Primary is never written blindly: a record has one, and writing another
    # would move it. A rule asking for Primary gets it under the same guard.
    return rule.primary_when_single or rule.association == PRIMARY


def _has_primary(types) -> bool:
    return any(t.label == PRIMARY for t in types)


def _ref(subject: Subject) -> tuple[str, int]:
    return (subject.object_type, subject.object_id)


def _passes(rule: Rule, reverse: bool, record: dict | None) -> bool:
    if reverse or not rule.when:
        return True
    if record is None:
        return False
    for prop, allowed in rule.when.items():
        value = record.get(prop)
        if value is None or str(value).strip().lower() not in {
            a.lower() for a in allowed
        }:
            return False
    return True


def _normalise_other(rule: Rule, value) -> str | None:
    """The other side's value, made comparable with the new record's."""
    if value is None:
        return None
    if rule.transform in EMAIL_LIKE:
        return url_host(str(value))
    return rule.normalise(value)


def _plain(t: AssociationType) -> tuple[str, int]:
    """Types compare by category and id; a label is only a name."""
    return (t.category, t.type_id)


def _ends(pair: Pair) -> tuple[str, int, str]:
    return (pair.from_type, pair.from_id, pair.to_type)


def _written_text(pair: Pair, claim) -> str:
    _, missing = claim
    ids = ",".join(str(t.type_id) for t in sorted(missing, key=lambda t: t.type_id))
    return f"{pair} type={ids}"


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
