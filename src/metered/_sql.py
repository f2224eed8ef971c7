"""The ledger's SQL, written once and rendered per dialect and driver.

The unit operations (consume, reserve, commit, release) share one *decision* query: a chain
of CTEs over the subject's account row that computes, in SQL, whether the operation may go
ahead and how its units split between period allowance, credits and overage. The writes
that follow read the decision from a relation named ``g``:

* on PostgreSQL the decision and the writes are one statement (``WITH ... , w1 AS (write),
  w2 AS (account update) SELECT decision``) run in autocommit mode: one round trip. The
  account row is locked with ``FOR UPDATE`` so concurrent operations on a subject serialise
  on it and always see its newest values; the idempotency key's unique index is the arbiter
  between two requests with the same key.
* on SQLite, which has no data-modifying CTEs, the decision and the operation's write are one
  autocommit statement (``WITH decision INSERT/UPDATE ... RETURNING``), and the ledger
  connection's triggers on ``metered_operations`` apply the account update within it
  (``SQLITE_ACCOUNT_TRIGGERS``). A refusal reads the decision again, as a ``SELECT``, to
  explain itself.

So the arithmetic and the writes exist once, and the two engines differ only in how the
pieces are put together. Statements are rendered at start-up, never per call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

Dialect = Literal["sqlite", "postgresql"]
ParamStyle = Literal["named", "pyformat", "dollar"]

FAR_FUTURE = 2**62
"""Stands for "never" in BIGINT microsecond columns."""

# What Python reads from every decision row, in this order.
DECISION_COLUMNS = (
    "ok",
    "fresh",
    "usable",
    "entitled",
    "available",
    "take_overage",
    "r_state",
    "r_expires_at",
)
APPLIED_COLUMNS = ("remaining", "take_overage")
"""What SQLite's ``unit_apply`` returns when it applied: the result's figures."""
SQLITE_ACCOUNT_TRIGGERS = {
    "metered_consume_applied": """
        AFTER INSERT ON main.metered_operations
        WHEN NEW.kind = 'consume' AND NEW.state = 'committed'
        BEGIN
            UPDATE metered_accounts
            SET used = used + NEW.from_allowance, credit = credit - NEW.from_credit,
                overage = overage + NEW.overage, updated_at = NEW.created_at
            WHERE subject = NEW.subject AND feature = NEW.feature;
        END""",
    "metered_reserve_applied": """
        AFTER INSERT ON main.metered_operations
        WHEN NEW.kind = 'reserve' AND NEW.state = 'held'
        BEGIN
            UPDATE metered_accounts
            SET held = held + NEW.units, recheck_at = MIN(recheck_at, NEW.expires_at),
                updated_at = NEW.created_at
            WHERE subject = NEW.subject AND feature = NEW.feature;
        END""",
    "metered_reservation_settled": """
        AFTER UPDATE OF state ON main.metered_operations
        WHEN OLD.state = 'held' AND NEW.state IN ('committed', 'released')
        BEGIN
            UPDATE metered_accounts
            SET used = used + NEW.from_allowance, credit = credit - NEW.from_credit,
                overage = overage + NEW.overage, held = held - OLD.units,
                updated_at = NEW.settled_at
            WHERE subject = NEW.subject AND feature = NEW.feature;
        END""",
}
"""SQLite's account update for ``unit_apply``: the deltas of ``_DELTAS``, from the row written.

Each ledger connection creates them as ``TEMP`` triggers, so they fire for its own writes
only: a connection that updates accounts itself (an older metered, a script) is never
counted twice, and no migration is needed. They fire for the unit operations' writes alone:
a consume (committed on insert), a reservation (held on insert), and a reservation leaving
``held`` for ``committed`` or ``released``; history rows (``applied``) and expiry (``held``
to ``expired``, whose account normalisation recomputes) leave the account alone."""
PRIOR_COLUMNS = (
    "p_id",
    "p_kind",
    "p_state",
    "p_feature",
    "p_units",
    "p_charged",
    "p_remaining",
    "p_expires_at",
    "p_overage",
)
"""How :mod:`metered._core` names the columns of ``prior_by_key`` (the key's operation)."""

_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Stmt:
    """A statement rendered for one driver. ``names`` orders the parameters for ``$n`` drivers."""

    sql: str
    names: tuple[str, ...]
    style: ParamStyle
    returns_rows: bool = True
    """Whether it yields rows (known at render time, so drivers never inspect cursors)."""
    standalone_write: bool = False
    """A write that is a whole transaction by itself (SQLite: autocommit; the executor takes
    the write turn around it, and a batch runs it without a savepoint of its own)."""

    def bind(self, params: dict[str, Any]) -> Any:
        if self.style == "dollar":
            return [params[name] for name in self.names]
        return params


def render(sql: str, style: ParamStyle) -> Stmt:
    """Turn ``:name`` placeholders into the driver's style."""
    sql = " ".join(sql.split())
    names: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if style == "named":
            return match.group(0)
        if style == "pyformat":
            return f"%({name})s"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    rendered = _PARAM.sub(replace, sql)
    if style == "named":
        names = list(dict.fromkeys(_PARAM.findall(sql)))
    head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
    returns_rows = head in ("SELECT", "WITH", "VALUES") or " RETURNING " in f" {sql.upper()} "
    if head == "WITH" and " SELECT " not in sql.upper().rsplit(")", 1)[-1] + " ":
        returns_rows = " RETURNING " in f" {sql.upper()} "  # WITH ... INSERT/UPDATE
    return Stmt(rendered, tuple(names), style, returns_rows)


_ACCOUNT = """
a AS (SELECT entitled, overage_allowed, allowance, used, credit, held, access_until, recheck_at,
             meter
      FROM metered_accounts WHERE subject = :subject AND feature = :feature{lock})"""

_RESERVATION = """
r AS (SELECT units AS held_units, state AS r_state, expires_at AS r_expires_at, key AS r_key
      FROM metered_operations
      WHERE subject = :subject AND id = :id AND feature = :feature AND kind = 'reserve'
        AND EXISTS (SELECT 1 FROM a){lock})"""

_SOURCE_NEW = """
src AS (SELECT a.*, 0 AS held_units, NULL AS r_state, NULL AS r_expires_at, NULL AS r_key
        FROM a)"""

_SOURCE_HELD = """
src AS (SELECT a.*, COALESCE(r.held_units, 0) AS held_units, r.r_state, r.r_expires_at, r.r_key
        FROM a LEFT JOIN r ON 1 = 1)"""

# How the units of one operation split: period allowance first, then credits, then overage.
# ``available`` counts the in-flight holds of other operations against the balance.
_CHAIN = """
d AS (SELECT src.*, {greatest}(allowance - used, 0) AS free,
             (entitled AND (access_until IS NULL OR access_until > :now)) AS usable,
             (recheck_at > :now) AS fresh
      FROM src),
e AS (SELECT d.*, free + credit - (held - held_units) AS available,
             {least}(:units, free) AS take_allowance
      FROM d),
f AS (SELECT e.*, {least}(:units - take_allowance, {greatest}(credit, 0)) AS take_credit FROM e),
g AS (SELECT f.*, :units - take_allowance - take_credit AS take_overage, ({ok}) AS ok FROM f)"""

_OK = {
    "consume": "usable AND fresh AND (available >= :units OR overage_allowed)",
    "reserve": "usable AND fresh AND (available >= :units OR overage_allowed)",
    "commit": "r_state = 'held' AND r_expires_at > :now AND fresh"
    " AND (available >= :units OR overage_allowed)",
    "release": "r_state = 'held' AND r_expires_at > :now",
}

# No conflict target (here and in ``operation_record``): any uniqueness conflict means "not
# applied". Usually the key (a replay or a reuse, which the caller reads back); rarely the
# id, when another process drew the same one for this subject in the same millisecond:
# nothing is found under the key, and the caller tries again with a new id. It also names
# neither form of the key index (full on PostgreSQL, partial on SQLite since migration 0004).
_INSERT_OPERATION = """
INSERT INTO metered_operations (subject, id, key, feature, kind, state, units, charged,
    from_allowance, from_credit, overage, remaining_after, created_at, expires_at, meter)
SELECT :subject, :id, :key, :feature, {values}, {{greatest}}(available - :units, 0), :now,
       {expires}, {meter}
FROM g WHERE ok
ON CONFLICT DO NOTHING"""

_SETTLE_OPERATION = """
UPDATE metered_operations SET {assignments}, settled_at = :now
FROM g WHERE metered_operations.subject = :subject AND metered_operations.id = :id AND g.ok"""

_WRITES = {
    "consume": _INSERT_OPERATION.format(
        values="'consume', 'committed', :units, :units, take_allowance, take_credit, take_overage",
        expires="NULL",
        meter="meter",
    ),
    "reserve": _INSERT_OPERATION.format(
        values="'reserve', 'held', :units, NULL, 0, 0, 0", expires=":expires_at", meter="NULL"
    ),
    "commit": _SETTLE_OPERATION.format(
        assignments="state = 'committed', charged = :units, from_allowance = g.take_allowance,"
        " from_credit = g.take_credit, overage = g.take_overage,"
        " remaining_after = {greatest}(g.available - :units, 0), meter = g.meter"
    ),
    "release": _SETTLE_OPERATION.format(
        assignments="state = 'released', released_key = key, key = NULL"
    ),
}

# What SQLite's write returns for APPLIED_COLUMNS, from the row it wrote (RETURNING cannot
# read the decision CTE).
_APPLIED = {
    "consume": "remaining_after, overage",
    "reserve": "remaining_after, 0",
    "commit": "remaining_after, overage",
    "release": "0, 0",
}

# Account deltas per operation on PostgreSQL: (used, credit spent, overage, held, recheck_at).
# SQLITE_ACCOUNT_TRIGGERS apply the same deltas from the operation row.
_DELTAS = {
    "consume": ("take_allowance", "take_credit", "take_overage", "0", "recheck_at"),
    "reserve": ("0", "0", "0", ":units", "{least}(recheck_at, :expires_at)"),
    "commit": ("take_allowance", "take_credit", "take_overage", "-held_units", "recheck_at"),
    "release": ("0", "0", "0", "-held_units", "recheck_at"),
}

_UPDATE_ACCOUNT = """
UPDATE metered_accounts
SET used = used + x.du, credit = credit - x.dc, overage = overage + x.dov,
    held = held + x.dh, recheck_at = {recheck}, updated_at = :now FROM x
WHERE subject = :subject AND feature = :feature"""

_DELTA_CTE = "x AS (SELECT {du} AS du, {dc} AS dc, {dov} AS dov, {dh} AS dh FROM g WHERE ok{gate})"


_DECISION_SELECT = ", ".join(f"g.{name}" for name in DECISION_COLUMNS)

_SUBJECT_COLUMNS = (
    "plan, status, interval_months, period_anchor, period_start, period_end,"
    " past_due_since, cancel_at_period_end"
)
ACCOUNT_COLUMNS = (
    "plan",
    "status",
    "entitled",
    "overage_allowed",
    "allowance",
    "used",
    "credit",
    "held",
    "overage",
    "period_start",
    "period_end",
    "access_until",
    "recheck_at",
    "meter",
)
CHECK_COLUMNS = (*ACCOUNT_COLUMNS[:8], "period_end", "access_until", "recheck_at")
"""What ``check`` reads from a fresh account row (a subset of ``ACCOUNT_COLUMNS``)."""
OPERATION_COLUMNS = (
    "id",
    "subject",
    "feature",
    "kind",
    "state",
    "units",
    "charged",
    "from_allowance",
    "from_credit",
    "overage",
    "key",
    "created_at",
    "expires_at",
    "settled_at",
    "released_key",
)
_OPERATION_SELECT = ", ".join(OPERATION_COLUMNS)


class Statements:
    """Every statement the ledger runs, rendered once for a dialect and a parameter style."""

    def __init__(self, dialect: Dialect, style: ParamStyle) -> None:
        self.dialect = dialect
        self.single_statement = dialect == "postgresql"
        pg = dialect == "postgresql"
        self._fmt = {
            "greatest": "GREATEST" if pg else "MAX",
            "least": "LEAST" if pg else "MIN",
            "lock": " FOR UPDATE" if pg else "",
        }
        self._style = style
        r = self._render

        self.begin = r("BEGIN" if pg else "BEGIN IMMEDIATE")
        self.commit_tx = r("COMMIT")
        self.rollback_tx = r("ROLLBACK")

        # Unit operations. PostgreSQL: ``unit_op`` decides and writes in one statement.
        # SQLite: ``unit_apply`` decides and writes the operation, its triggers update the
        # account, and it returns APPLIED_COLUMNS only if it applied; ``unit_op`` is the
        # decision alone, read to explain a refusal.
        self.unit_op: dict[str, Stmt] = {}
        self.unit_apply: dict[str, Stmt] = {}
        self.result_columns = (*DECISION_COLUMNS, "applied")
        for kind in _OK:
            decision = self._decision_ctes(kind)
            write = self._sub(_WRITES[kind])
            if pg:
                du, dc, dov, dh, recheck = _DELTAS[kind]
                deltas = _DELTA_CTE.format(
                    du=du, dc=dc, dov=dov, dh=dh, gate=" AND EXISTS (SELECT 1 FROM w1)"
                )
                update = self._sub(_UPDATE_ACCOUNT.format(recheck=recheck))
                self.unit_op[kind] = r(
                    f"WITH {decision}, w1 AS ({write} RETURNING 1), {deltas},"
                    f" w2 AS ({update} RETURNING 1)"
                    f" SELECT {_DECISION_SELECT}, EXISTS (SELECT 1 FROM w1) AS applied FROM g"
                )
            else:
                self.unit_op[kind] = r(
                    f"WITH {decision} SELECT {_DECISION_SELECT}, 0 AS applied FROM g"
                )
                apply = r(f"WITH {decision} {write} RETURNING {_APPLIED[kind]}")
                self.unit_apply[kind] = replace(apply, standalone_write=True)

        # Normalisation, plan assignment, grants, reads: plain statements run by Python logic.
        self.subject_get = r(
            f"SELECT {_SUBJECT_COLUMNS} FROM metered_subjects WHERE subject = :subject{{lock}}"
        )
        self.subject_upsert = r(
            """INSERT INTO metered_subjects (subject, plan, status, interval_months,
                   period_anchor, period_start, period_end, past_due_since,
                   cancel_at_period_end, created_at, updated_at)
               VALUES (:subject, :plan, :status, :interval_months, :period_anchor,
                   :period_start, :period_end, :past_due_since, :cancel_at_period_end,
                   :now, :now)
               ON CONFLICT (subject) DO UPDATE SET plan = excluded.plan,
                   status = excluded.status, interval_months = excluded.interval_months,
                   period_anchor = excluded.period_anchor,
                   period_start = excluded.period_start, period_end = excluded.period_end,
                   past_due_since = excluded.past_due_since,
                   cancel_at_period_end = excluded.cancel_at_period_end,
                   updated_at = excluded.updated_at"""
        )
        self.subject_insert_default = r(
            """INSERT INTO metered_subjects (subject, plan, status, interval_months,
                   period_anchor, period_start, period_end, past_due_since,
                   cancel_at_period_end, created_at, updated_at)
               VALUES (:subject, :plan, :status, :interval_months, :period_anchor,
                   :period_start, :period_end, NULL, :cancel_at_period_end, :now, :now)
               ON CONFLICT (subject) DO NOTHING"""
        )
        self.subject_set_period = r(
            "UPDATE metered_subjects SET period_start = :period_start, period_end = :period_end,"
            " updated_at = :now WHERE subject = :subject"
        )
        self.accounts_invalidate = r(
            "UPDATE metered_accounts SET recheck_at = 0 WHERE subject = :subject"
        )
        account_cols = ", ".join(ACCOUNT_COLUMNS)
        self.account_get = r(
            f"SELECT {account_cols} FROM metered_accounts"
            " WHERE subject = :subject AND feature = :feature{lock}"
        )
        self.check_read = r(
            f"SELECT {', '.join(CHECK_COLUMNS)} FROM metered_accounts"
            " WHERE subject = :subject AND feature = :feature"
        )
        self.account_upsert = r(
            f"INSERT INTO metered_accounts (subject, feature, {account_cols}, updated_at)"
            f" VALUES (:subject, :feature, {', '.join(':' + c for c in ACCOUNT_COLUMNS)}, :now)"
            " ON CONFLICT (subject, feature) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in (*ACCOUNT_COLUMNS, "updated_at"))
        )
        self.check_get = r(
            f"SELECT s.plan, s.status, s.interval_months, s.period_anchor, s.period_start,"
            f" s.period_end, s.past_due_since, s.cancel_at_period_end,"
            f" {', '.join('a.' + c for c in ACCOUNT_COLUMNS)}"
            " FROM metered_subjects s LEFT JOIN metered_accounts a"
            " ON a.subject = s.subject AND a.feature = :feature WHERE s.subject = :subject"
        )
        self.credits_live = r(
            "SELECT id, units, remaining, expires_at FROM metered_credits"
            " WHERE subject = :subject AND feature = :feature AND remaining > 0"
        )
        self.credit_set_remaining = r(
            "UPDATE metered_credits SET remaining = :remaining"
            " WHERE subject = :subject AND id = :id"
        )
        self.credit_insert = r(
            "INSERT INTO metered_credits (subject, id, feature, units, remaining, expires_at,"
            " created_at) VALUES (:subject, :id, :feature, :units, :units, :expires_at, :now)"
        )
        self.held_live = r(
            "SELECT id, units, expires_at FROM metered_operations"
            " WHERE subject = :subject AND feature = :feature AND state = 'held'"
        )
        self.operation_expire = r(
            "UPDATE metered_operations SET state = 'expired', released_key = key, key = NULL,"
            " settled_at = :now WHERE subject = :subject AND id = :id AND state = 'held'"
        )
        self.operation_record = r(
            """INSERT INTO metered_operations (subject, id, key, feature, kind, state, units,
                   charged, from_allowance, from_credit, overage, remaining_after, created_at,
                   expires_at, settled_at)
               VALUES (:subject, :id, :key, :feature, :kind, :state, :units, :charged, 0, 0, 0,
                   NULL, :now, :expires_at, :now)
               ON CONFLICT DO NOTHING RETURNING id"""
        )
        self.prior_by_key = r(
            "SELECT id, kind, state, feature, units, charged, remaining_after, expires_at,"
            " overage FROM metered_operations WHERE subject = :subject AND key = :key"
        )
        self.operation_by_key = r(
            f"SELECT {_OPERATION_SELECT} FROM metered_operations"
            " WHERE subject = :subject AND key = :key"
        )
        self.credit_get = r(
            "SELECT remaining FROM metered_credits WHERE subject = :subject AND id = :id"
        )
        self.operation_by_id = r(
            f"SELECT {_OPERATION_SELECT}, remaining_after FROM metered_operations"
            " WHERE subject = :subject AND id = :id"
        )
        self.account_add_credit = r(
            "UPDATE metered_accounts SET credit = credit + :units,"
            f" recheck_at = {self._fmt['least']}(recheck_at, :expires_at), updated_at = :now"
            " WHERE subject = :subject AND feature = :feature"
        )
        self.history = {
            (feature, before): r(
                f"SELECT {_OPERATION_SELECT} FROM metered_operations WHERE subject = :subject"
                + (" AND feature = :feature" if feature else "")
                + (" AND id < :before" if before else "")
                + " ORDER BY id DESC LIMIT :limit"
            )
            for feature in (False, True)
            for before in (False, True)
        }
        self.accounts_of_subject = r(
            "SELECT feature FROM metered_accounts WHERE subject = :subject"
        )

    def _render(self, sql: str) -> Stmt:
        return render(self._sub(sql), self._style)

    def _decision_ctes(self, kind: str) -> str:
        parts = [_ACCOUNT]
        if kind in ("commit", "release"):
            parts += [_RESERVATION, _SOURCE_HELD]
        else:
            parts.append(_SOURCE_NEW)
        parts.append(_CHAIN.replace("{ok}", _OK[kind]))
        return self._sub(",".join(parts))

    def _sub(self, sql: str) -> str:
        for name, value in self._fmt.items():
            sql = sql.replace("{" + name + "}", value)
        return sql
