-- guardrails core: runs, the budget ledger (caps + reservations), the hash-chained audit log,
-- kill switch, policy versions, heartbeats, the alert outbox and the watcher ping state.
-- Money is integer micro-dollars everywhere; tokens are integers.

CREATE TABLE runs (
    id            uuid PRIMARY KEY,
    task          text NOT NULL,
    trigger       text NOT NULL CHECK (trigger IN ('event', 'schedule', 'manual')),
    workflow      text NOT NULL DEFAULT '',
    external_id   text,
    caller        text NOT NULL,
    status        text NOT NULL DEFAULT 'open'
                  CHECK (status IN ('open', 'succeeded', 'failed', 'cancelled', 'denied')),
    outcome       jsonb NOT NULL DEFAULT '{}'::jsonb,
    budget_micros bigint NOT NULL CHECK (budget_micros >= 0),
    budget_tokens bigint NOT NULL CHECK (budget_tokens >= 0),
    opened_at     timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    UNIQUE (task, external_id)
);
CREATE INDEX runs_opened_at ON runs (opened_at DESC);
CREATE INDEX runs_open ON runs (task) WHERE status = 'open';

-- One row per cap and period. Every reservation locks its rows in (lock_rank, key) order, so two
-- reservations can never deadlock and spent + reserved can be checked and raised atomically.
CREATE TABLE caps (
    key             text PRIMARY KEY,   -- monthly:2026-11 | daily:2026-11-26 | task:triage:2026-11-26 | run:<uuid>
    scope           text NOT NULL CHECK (scope IN ('monthly', 'daily', 'task_daily', 'run')),
    lock_rank       smallint NOT NULL,
    task            text,
    period          text NOT NULL,      -- 2026-11, 2026-11-26 or the run id
    limit_micros    bigint NOT NULL CHECK (limit_micros >= 0),
    spent_micros    bigint NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    reserved_micros bigint NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    limit_tokens    bigint CHECK (limit_tokens >= 0),
    spent_tokens    bigint NOT NULL DEFAULT 0 CHECK (spent_tokens >= 0),
    reserved_tokens bigint NOT NULL DEFAULT 0 CHECK (reserved_tokens >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reservations (
    id            uuid PRIMARY KEY,
    run_id        uuid NOT NULL,
    task          text NOT NULL,
    caller        text NOT NULL,
    model         text NOT NULL,
    cap_keys      text[] NOT NULL,       -- already in lock order
    amount_micros bigint NOT NULL CHECK (amount_micros >= 0),
    tokens        bigint NOT NULL CHECK (tokens >= 0),
    state         text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'settled', 'released', 'expired')),
    cost_micros   bigint CHECK (cost_micros >= 0),
    used_tokens   bigint CHECK (used_tokens >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    settled_at    timestamptz
);
CREATE INDEX reservations_open_expiry ON reservations (expires_at) WHERE state = 'open';
CREATE INDEX reservations_run ON reservations (run_id);

-- ---------------------------------------------------------------- audit log (append-only, hash-chained)
CREATE TABLE audit_log (
    seq       bigint PRIMARY KEY,
    at        timestamptz NOT NULL,
    kind      text NOT NULL,
    actor     text NOT NULL,
    run_id    uuid,
    task      text,
    subject   text NOT NULL DEFAULT '',
    data      jsonb NOT NULL DEFAULT '{}'::jsonb,
    prev_hash text NOT NULL,
    hash      text NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_run ON audit_log (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX audit_log_kind ON audit_log (kind, at);

-- The head of the chain: its row lock serialises appends so the chain has no forks.
CREATE TABLE audit_head (
    id   smallint PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL,
    hash text NOT NULL
);

-- What is hashed: the entry's fields as canonical jsonb text (PostgreSQL renders jsonb deterministically).
-- verify recomputes this from the *current* column values, so any edit shows up as a broken link.
CREATE FUNCTION audit_canonical(p_seq bigint, p_at timestamptz, p_kind text, p_actor text, p_run uuid,
                                p_task text, p_subject text, p_data jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'seq', p_seq,
        'at', to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'kind', p_kind, 'actor', p_actor, 'run_id', p_run, 'task', p_task,
        'subject', p_subject, 'data', p_data)::text
$$;

CREATE FUNCTION audit_append(p_kind text, p_actor text, p_run uuid, p_task text, p_subject text,
                             p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_seq  bigint;
    v_prev text;
    v_at   timestamptz;
    v_hash text;
BEGIN
    INSERT INTO guardrails.audit_head (id, seq, hash) VALUES (1, 0, repeat('0', 64)) ON CONFLICT (id) DO NOTHING;
    SELECT seq, hash INTO v_seq, v_prev FROM guardrails.audit_head WHERE id = 1 FOR UPDATE;
    v_seq := v_seq + 1;
    v_at := clock_timestamp();
    v_hash := encode(sha256(convert_to(v_prev || guardrails.audit_canonical(
        v_seq, v_at, p_kind, p_actor, p_run, p_task, coalesce(p_subject, ''), coalesce(p_data, '{}'::jsonb)),
        'UTF8')), 'hex');
    INSERT INTO guardrails.audit_log (seq, at, kind, actor, run_id, task, subject, data, prev_hash, hash)
    VALUES (v_seq, v_at, p_kind, p_actor, p_run, p_task, coalesce(p_subject, ''), coalesce(p_data, '{}'::jsonb),
            v_prev, v_hash);
    UPDATE guardrails.audit_head SET seq = v_seq, hash = v_hash WHERE id = 1;
    RETURN v_seq;
END
$$;

CREATE FUNCTION audit_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_forbid_change();

-- ---------------------------------------------------------------- kill switch, policy versions
CREATE TABLE kill_switch (
    id         smallint PRIMARY KEY CHECK (id = 1),
    engaged    boolean NOT NULL,
    actor      text NOT NULL,
    reason     text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE policy_versions (
    version   bigserial PRIMARY KEY,
    digest    text NOT NULL,
    document  jsonb NOT NULL,
    actor     text NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------- heartbeats, alerts, watcher
CREATE TABLE heartbeats (
    name          text PRIMARY KEY,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_at       timestamptz NOT NULL,
    last_beat_at  timestamptz,            -- NULL until the first real check-in
    beats         bigint NOT NULL DEFAULT 0,
    overdue_since timestamptz
);

CREATE TABLE alert_outbox (
    id              bigserial PRIMARY KEY,
    dedupe_key      text NOT NULL UNIQUE,   -- one alert per threshold per period, per overdue episode
    kind            text NOT NULL,
    severity        text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);
CREATE INDEX alert_outbox_pending ON alert_outbox (next_attempt_at) WHERE delivered_at IS NULL;

CREATE TABLE watcher_state (
    id           smallint PRIMARY KEY CHECK (id = 1),
    last_ping_at timestamptz NOT NULL,
    last_status  text NOT NULL DEFAULT ''
);

-- ---------------------------------------------------------------- the ledger
-- Reserve the worst case of one LLM call against every cap it falls under, in ONE statement.
-- p_caps: [{key, scope, rank, task, period, limit}] for the monthly, daily and task-daily caps (the run
-- cap row exists since the run was opened). Rows are upserted/locked in (rank, key) order; the call is
-- admitted only if spent + reserved + amount <= limit for every cap (and tokens for the run cap).
CREATE FUNCTION reserve(p_reservation uuid, p_run uuid, p_caller text, p_model text, p_amount bigint,
                        p_tokens bigint, p_caps jsonb, p_timeout_seconds integer, p_audit jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_run   guardrails.runs%ROWTYPE;
    v_kill  guardrails.kill_switch%ROWTYPE;
    v_cap   jsonb;
    v_row   guardrails.caps%ROWTYPE;
    v_keys  text[] := '{}';
    v_remaining jsonb := '{}'::jsonb;
    v_reason text;
    v_denied_key text;
    v_avail bigint;
BEGIN
    SELECT * INTO v_kill FROM guardrails.kill_switch WHERE id = 1;
    IF FOUND AND v_kill.engaged THEN
        RETURN jsonb_build_object('ok', false, 'reason', 'kill_switch_engaged',
                                  'message', 'the kill switch is engaged by ' || v_kill.actor || ': ' || v_kill.reason);
    END IF;
    SELECT * INTO v_run FROM guardrails.runs WHERE id = p_run;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('ok', false, 'reason', 'unknown_run', 'message', 'no run ' || p_run);
    END IF;
    IF v_run.status <> 'open' THEN
        RETURN jsonb_build_object('ok', false, 'reason', 'run_closed',
                                  'message', 'run ' || p_run || ' is ' || v_run.status);
    END IF;

    -- Period caps: create on first use, follow the current policy's limit, lock in order.
    FOR v_cap IN SELECT value FROM jsonb_array_elements(p_caps)
                 ORDER BY (value->>'rank')::int, value->>'key' LOOP
        INSERT INTO guardrails.caps AS c (key, scope, lock_rank, task, period, limit_micros)
        VALUES (v_cap->>'key', v_cap->>'scope', (v_cap->>'rank')::smallint, v_cap->>'task', v_cap->>'period',
                (v_cap->>'limit')::bigint)
        ON CONFLICT (key) DO UPDATE SET limit_micros = EXCLUDED.limit_micros
        RETURNING * INTO v_row;
        v_keys := v_keys || v_row.key;
        v_avail := v_row.limit_micros - v_row.spent_micros - v_row.reserved_micros;
        v_remaining := v_remaining || jsonb_build_object(v_row.scope, v_avail);
        IF v_reason IS NULL AND v_avail < p_amount THEN
            v_reason := v_row.scope || '_cap_exhausted';
            v_denied_key := v_row.key;
        END IF;
    END LOOP;
    -- The run cap ranks last (rank 3): its row is locked after the period caps.
    SELECT * INTO v_row FROM guardrails.caps WHERE key = 'run:' || p_run FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % has no cap row', p_run;
    END IF;
    v_keys := v_keys || v_row.key;
    v_avail := v_row.limit_micros - v_row.spent_micros - v_row.reserved_micros;
    v_remaining := v_remaining || jsonb_build_object('run', v_avail,
        'run_tokens', v_row.limit_tokens - v_row.spent_tokens - v_row.reserved_tokens);
    IF v_reason IS NULL AND v_avail < p_amount THEN
        v_reason := 'run_cap_exhausted';
        v_denied_key := v_row.key;
    END IF;
    IF v_reason IS NULL AND v_row.limit_tokens IS NOT NULL
       AND v_row.limit_tokens - v_row.spent_tokens - v_row.reserved_tokens < p_tokens THEN
        v_reason := 'run_token_cap_exhausted';
        v_denied_key := v_row.key;
    END IF;

    IF v_reason IS NOT NULL THEN
        PERFORM guardrails.audit_append('llm.denied', p_caller, p_run, v_run.task, p_model,
            coalesce(p_audit, '{}'::jsonb) || jsonb_build_object('reason', v_reason, 'cap', v_denied_key,
                'reserve_micros', p_amount, 'reserve_tokens', p_tokens, 'remaining', v_remaining));
        RETURN jsonb_build_object('ok', false, 'reason', v_reason, 'cap', v_denied_key, 'remaining', v_remaining,
            'message', 'the worst case of this call (' || p_amount || ' micro-USD, ' || p_tokens ||
                       ' tokens) does not fit the ' || v_denied_key || ' cap');
    END IF;

    UPDATE guardrails.caps
       SET reserved_micros = reserved_micros + p_amount,
           reserved_tokens = reserved_tokens + CASE WHEN scope = 'run' THEN p_tokens ELSE 0 END,
           updated_at = now()
     WHERE key = ANY (v_keys);
    INSERT INTO guardrails.reservations (id, run_id, task, caller, model, cap_keys, amount_micros, tokens, expires_at)
    VALUES (p_reservation, p_run, v_run.task, p_caller, p_model, v_keys, p_amount, p_tokens,
            now() + make_interval(secs => p_timeout_seconds));
    RETURN jsonb_build_object('ok', true, 'reservation_id', p_reservation, 'task', v_run.task,
                              'remaining', v_remaining);
END
$$;

-- Close a reservation: charge p_cost (settled / expired) or nothing (released), give back the rest,
-- enqueue spend alerts for thresholds crossed, append the audit entry. Idempotent: a reservation
-- already closed is left as it is (first settlement wins; an expiry charged the full amount).
CREATE FUNCTION settle(p_reservation uuid, p_state text, p_cost bigint, p_used_tokens bigint,
                       p_thresholds integer[], p_audit_kind text, p_audit jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_res  guardrails.reservations%ROWTYPE;
    v_cap  guardrails.caps%ROWTYPE;
    v_new  bigint;
    v_t    integer;
    v_remaining jsonb := '{}'::jsonb;
    v_alerts integer := 0;
BEGIN
    IF p_state NOT IN ('settled', 'released', 'expired') THEN
        RAISE EXCEPTION 'bad settle state %', p_state;
    END IF;
    -- Losing this commit in a crash only leaves the reservation open, which the sweeper then charges in
    -- full: over-counting, never under-counting. So it need not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT * INTO v_res FROM guardrails.reservations WHERE id = p_reservation FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('ok', false, 'reason', 'unknown_reservation');
    END IF;
    IF v_res.state <> 'open' THEN
        RETURN jsonb_build_object('ok', false, 'reason', 'already_' || v_res.state, 'cost', v_res.cost_micros);
    END IF;
    FOR v_cap IN SELECT * FROM guardrails.caps WHERE key = ANY (v_res.cap_keys)
                 ORDER BY lock_rank, key FOR UPDATE LOOP
        v_new := v_cap.spent_micros + p_cost;
        UPDATE guardrails.caps
           SET reserved_micros = reserved_micros - v_res.amount_micros,
               spent_micros = v_new,
               reserved_tokens = reserved_tokens - CASE WHEN scope = 'run' THEN v_res.tokens ELSE 0 END,
               spent_tokens = spent_tokens + p_used_tokens,
               updated_at = now()
         WHERE key = v_cap.key;
        v_remaining := v_remaining || jsonb_build_object(v_cap.scope,
            v_cap.limit_micros - v_new - (v_cap.reserved_micros - v_res.amount_micros));
        IF v_cap.scope <> 'run' AND v_cap.limit_micros > 0 THEN
            FOREACH v_t IN ARRAY coalesce(p_thresholds, '{}') LOOP
                IF v_cap.spent_micros * 100 < v_t::bigint * v_cap.limit_micros
                   AND v_new * 100 >= v_t::bigint * v_cap.limit_micros THEN
                    INSERT INTO guardrails.alert_outbox (dedupe_key, kind, severity, payload)
                    VALUES ('spend:' || v_cap.key || ':' || v_t, 'spend_threshold',
                            CASE WHEN v_t >= 100 THEN 'critical' WHEN v_t >= 80 THEN 'warning' ELSE 'info' END,
                            jsonb_build_object('cap', v_cap.key, 'scope', v_cap.scope, 'task', v_cap.task,
                                               'period', v_cap.period, 'threshold_percent', v_t,
                                               'spent_micros', v_new, 'limit_micros', v_cap.limit_micros))
                    ON CONFLICT (dedupe_key) DO NOTHING;
                    v_alerts := v_alerts + 1;
                END IF;
            END LOOP;
        END IF;
    END LOOP;
    UPDATE guardrails.reservations
       SET state = p_state, cost_micros = p_cost, used_tokens = p_used_tokens, settled_at = now()
     WHERE id = p_reservation;
    PERFORM guardrails.audit_append(p_audit_kind, v_res.caller, v_res.run_id, v_res.task, v_res.model,
        coalesce(p_audit, '{}'::jsonb) || jsonb_build_object('reservation_id', v_res.id, 'state', p_state,
            'reserved_micros', v_res.amount_micros, 'cost_micros', p_cost, 'tokens', p_used_tokens));
    RETURN jsonb_build_object('ok', true, 'remaining', v_remaining, 'alerts', v_alerts,
                              'reserved', v_res.amount_micros);
END
$$;
