-- Fewer statements per LLM call, same decisions and the same audit hashes (gateway overhead, issue #3).
--
-- audit_append v2: locks the chain head first and creates it only when missing (it exists after the first
-- entry), and computes the canonical text inline — the very expression of audit_canonical(), which verify still
-- uses — instead of calling that SQL function, which PostgreSQL cannot inline (to_char is only STABLE) and so
-- re-plans on every call.
CREATE OR REPLACE FUNCTION audit_append(p_kind text, p_actor text, p_run uuid, p_task text, p_subject text,
                                        p_data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_seq     bigint;
    v_prev    text;
    v_at      timestamptz;
    v_hash    text;
    v_subject text := coalesce(p_subject, '');
    v_data    jsonb := coalesce(p_data, '{}'::jsonb);
BEGIN
    SELECT seq, hash INTO v_seq, v_prev FROM guardrails.audit_head WHERE id = 1 FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO guardrails.audit_head (id, seq, hash) VALUES (1, 0, repeat('0', 64)) ON CONFLICT (id) DO NOTHING;
        SELECT seq, hash INTO v_seq, v_prev FROM guardrails.audit_head WHERE id = 1 FOR UPDATE;
    END IF;
    v_seq := v_seq + 1;
    v_at := clock_timestamp();
    -- Keep in step with audit_canonical() (0002): verify recomputes every hash with that function.
    v_hash := encode(sha256(convert_to(v_prev || jsonb_build_object(
        'seq', v_seq,
        'at', to_char(v_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'kind', p_kind, 'actor', p_actor, 'run_id', p_run, 'task', p_task,
        'subject', v_subject, 'data', v_data)::text, 'UTF8')), 'hex');
    INSERT INTO guardrails.audit_log (seq, at, kind, actor, run_id, task, subject, data, prev_hash, hash)
    VALUES (v_seq, v_at, p_kind, p_actor, p_run, p_task, v_subject, v_data, v_prev, v_hash);
    UPDATE guardrails.audit_head SET seq = v_seq, hash = v_hash WHERE id = 1;
    RETURN v_seq;
END
$$;

-- settle v2: same decisions as 0002. The reservation is closed by ONE conditional UPDATE (it locks the row; a
-- concurrent second settlement re-checks `state = 'open'` after the first commits and finds nothing), the caps
-- are still locked in (rank, key) order by one SELECT ... FOR UPDATE, and then all of them are charged by ONE
-- UPDATE instead of one per cap. Commit without waiting for the disk: losing this commit in a crash leaves the
-- reservation open and the sweeper charges it in full (over-counting, never under-counting).
CREATE OR REPLACE FUNCTION settle(p_reservation uuid, p_state text, p_cost bigint, p_used_tokens bigint,
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
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE guardrails.reservations
       SET state = p_state, cost_micros = p_cost, used_tokens = p_used_tokens, settled_at = now()
     WHERE id = p_reservation AND state = 'open'
    RETURNING * INTO v_res;
    IF NOT FOUND THEN
        SELECT * INTO v_res FROM guardrails.reservations WHERE id = p_reservation;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('ok', false, 'reason', 'unknown_reservation');
        END IF;
        RETURN jsonb_build_object('ok', false, 'reason', 'already_' || v_res.state, 'cost', v_res.cost_micros);
    END IF;
    FOR v_cap IN SELECT * FROM guardrails.caps WHERE key = ANY (v_res.cap_keys)
                 ORDER BY lock_rank, key FOR UPDATE LOOP
        v_new := v_cap.spent_micros + p_cost;
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
    -- Every row is locked by now (above, in order), so this one statement cannot deadlock.
    UPDATE guardrails.caps
       SET reserved_micros = reserved_micros - v_res.amount_micros,
           spent_micros = spent_micros + p_cost,
           reserved_tokens = reserved_tokens - CASE WHEN scope = 'run' THEN v_res.tokens ELSE 0 END,
           spent_tokens = spent_tokens + p_used_tokens,
           updated_at = now()
     WHERE key = ANY (v_res.cap_keys);
    PERFORM guardrails.audit_append(p_audit_kind, v_res.caller, v_res.run_id, v_res.task, v_res.model,
        coalesce(p_audit, '{}'::jsonb) || jsonb_build_object('reservation_id', v_res.id, 'state', p_state,
            'reserved_micros', v_res.amount_micros, 'cost_micros', p_cost, 'tokens', p_used_tokens));
    RETURN jsonb_build_object('ok', true, 'remaining', v_remaining, 'alerts', v_alerts,
                              'reserved', v_res.amount_micros);
END
$$;
