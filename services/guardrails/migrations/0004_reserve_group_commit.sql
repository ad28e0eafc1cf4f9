-- reserve v3: same decisions as v2 (0003); the commit no longer waits for the WAL flush while the cap rows
-- are locked. Durability before spending is kept by the caller's flush step (see the comment below): a
-- crash before that flush returns means nothing was forwarded.
CREATE OR REPLACE FUNCTION reserve(p_reservation uuid, p_run uuid, p_caller text, p_model text, p_amount bigint,
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
    v_denied guardrails.caps%ROWTYPE;
    v_avail bigint;
BEGIN
    -- The caller makes the reservation durable right after this commit with a separate flush
    -- (gateway: repository.make_durable, a write committed under synchronous_commit=on) before it forwards.
    -- So this commit need not wait for the disk while it holds the hot cap-row locks: concurrent
    -- reservations are serialised only by the CPU work below, and their flushes are group-committed.
    PERFORM set_config('synchronous_commit', 'off', true);
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

    -- Period caps in (rank, key) order: lock, create on first use, follow the current policy's limit.
    FOR v_cap IN SELECT value FROM jsonb_array_elements(p_caps)
                 ORDER BY (value->>'rank')::int, value->>'key' LOOP
        SELECT * INTO v_row FROM guardrails.caps WHERE key = v_cap->>'key' FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO guardrails.caps (key, scope, lock_rank, task, period, limit_micros)
            VALUES (v_cap->>'key', v_cap->>'scope', (v_cap->>'rank')::smallint, v_cap->>'task', v_cap->>'period',
                    (v_cap->>'limit')::bigint)
            ON CONFLICT (key) DO NOTHING;
            -- Either ours, or a concurrent creator's (we waited for it to commit): lock it now.
            SELECT * INTO v_row FROM guardrails.caps WHERE key = v_cap->>'key' FOR UPDATE;
        END IF;
        IF v_row.limit_micros <> (v_cap->>'limit')::bigint THEN
            UPDATE guardrails.caps SET limit_micros = (v_cap->>'limit')::bigint, updated_at = now()
             WHERE key = v_row.key RETURNING * INTO v_row;
        END IF;
        v_keys := v_keys || v_row.key;
        v_avail := v_row.limit_micros - v_row.spent_micros - v_row.reserved_micros;
        v_remaining := v_remaining || jsonb_build_object(v_row.scope, v_avail);
        IF v_reason IS NULL AND v_avail < p_amount THEN
            v_reason := v_row.scope || '_cap_exhausted';
            v_denied := v_row;
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
        v_denied := v_row;
    END IF;
    IF v_reason IS NULL AND v_row.limit_tokens IS NOT NULL
       AND v_row.limit_tokens - v_row.spent_tokens - v_row.reserved_tokens < p_tokens THEN
        v_reason := 'run_token_cap_exhausted';
        v_denied := v_row;
    END IF;

    IF v_reason IS NOT NULL THEN
        PERFORM guardrails.audit_append('llm.denied', p_caller, p_run, v_run.task, p_model,
            coalesce(p_audit, '{}'::jsonb) || jsonb_build_object('reason', v_reason, 'cap', v_denied.key,
                'reserve_micros', p_amount, 'reserve_tokens', p_tokens, 'remaining', v_remaining));
        IF v_denied.scope <> 'run' THEN
            INSERT INTO guardrails.alert_outbox (dedupe_key, kind, severity, payload)
            VALUES ('exhausted:' || v_denied.key, 'cap_exhausted',
                    CASE WHEN v_denied.scope = 'task_daily' THEN 'warning' ELSE 'critical' END,
                    jsonb_build_object('cap', v_denied.key, 'scope', v_denied.scope, 'task', v_denied.task,
                                       'period', v_denied.period, 'spent_micros', v_denied.spent_micros,
                                       'reserved_micros', v_denied.reserved_micros,
                                       'limit_micros', v_denied.limit_micros, 'first_refused_task', v_run.task))
            ON CONFLICT (dedupe_key) DO NOTHING;
        END IF;
        RETURN jsonb_build_object('ok', false, 'reason', v_reason, 'cap', v_denied.key, 'remaining', v_remaining,
            'message', 'the worst case of this call (' || p_amount || ' micro-USD, ' || p_tokens ||
                       ' tokens) does not fit the ' || v_denied.key || ' cap');
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
