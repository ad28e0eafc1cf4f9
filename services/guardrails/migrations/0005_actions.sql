-- guardrails actions: write proposals, approvals, executions (with attempts), escalations, and the outbox
-- that hands approval requests and escalations to n8n.
--
-- An action's life:  denied | pending_approval -> approved | rejected | expired
--                    approved -> executing (committed before the write) -> executed | failed
--                    failed -> approved (operator retry) -> executing ...
-- `attempts` counts executions started; a row stuck in `executing` past `lease_until` was abandoned by a
-- crashed worker and is recovered by reconciling with the target system first.

CREATE TABLE actions (
    id               uuid PRIMARY KEY,
    run_id           uuid NOT NULL REFERENCES runs (id),
    task             text NOT NULL,
    caller           text NOT NULL,
    connector        text NOT NULL,
    operation        text NOT NULL,
    target           text NOT NULL,
    payload          jsonb NOT NULL,
    reason           text NOT NULL DEFAULT '',
    idempotency_key  text NOT NULL,
    fingerprint      text NOT NULL,          -- sha256 of connector, operation, target and payload as proposed
    rule             text NOT NULL,          -- the allowlist rule that decided ('default:deny' when none matched)
    mode             text NOT NULL CHECK (mode IN ('allow', 'approve', 'deny')),
    policy_reason    text NOT NULL,          -- the sentence saying why (which rule, which condition failed)
    status           text NOT NULL CHECK (status IN ('denied', 'pending_approval', 'approved', 'executing',
                                                     'executed', 'failed', 'rejected', 'expired')),
    expires_at       timestamptz,
    decision         text CHECK (decision IN ('approve', 'reject')),
    approver         text,
    decision_channel text,
    decision_comment text,
    decided_at       timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    lease_until      timestamptz,
    executed_at      timestamptz,
    result           jsonb,
    last_error       text,
    error_retryable  boolean,
    outcome_unknown  boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- One action per key and proposer, ever: a retry or a concurrent copy gets the same action back.
    UNIQUE (caller, idempotency_key)
);
CREATE INDEX actions_created ON actions (created_at DESC);
CREATE INDEX actions_status ON actions (status, created_at DESC);
CREATE INDEX actions_pending_expiry ON actions (expires_at) WHERE status = 'pending_approval';
CREATE INDEX actions_executing_lease ON actions (lease_until) WHERE status = 'executing';
CREATE INDEX actions_approved ON actions (decided_at) WHERE status = 'approved';
CREATE INDEX actions_run ON actions (run_id);

-- Every execution attempt with what happened, so a failure stays visible after a successful retry.
CREATE TABLE action_attempts (
    action_id   uuid NOT NULL REFERENCES actions (id),
    attempt     integer NOT NULL,
    actor       text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text CHECK (outcome IN ('executed', 'reconciled', 'failed', 'outcome_unknown', 'abandoned')),
    error       text,
    result      jsonb,
    PRIMARY KEY (action_id, attempt)
);

-- Each time n8n asked humans to decide (execution id of the waiting workflow, channels used).
CREATE TABLE approval_requests (
    action_id    uuid NOT NULL REFERENCES actions (id),
    execution_id text NOT NULL,
    channels     text[] NOT NULL DEFAULT '{}',
    requested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (action_id, execution_id)
);

CREATE TABLE escalations (
    id          uuid PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES runs (id),
    task        text NOT NULL,
    caller      text NOT NULL,
    subject     text NOT NULL,
    reason      text NOT NULL,
    context     jsonb NOT NULL DEFAULT '{}'::jsonb,
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolution  text CHECK (resolution IN ('resolved', 'dismissed')),
    resolved_by text,
    comment     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    -- One escalation per run and subject: a resend of the same escalation returns the first.
    UNIQUE (run_id, subject)
);
CREATE INDEX escalations_open ON escalations (created_at DESC) WHERE status = 'open';
CREATE INDEX escalations_created ON escalations (created_at DESC);

-- Approval requests and escalations for n8n, written in the same transaction as the action / escalation
-- and delivered with retries by the background loop of whichever replica has the n8n webhook configured.
CREATE TABLE notify_outbox (
    id              bigserial PRIMARY KEY,
    dedupe_key      text NOT NULL UNIQUE,
    kind            text NOT NULL CHECK (kind IN ('approval_request', 'escalation')),
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);
CREATE INDEX notify_outbox_pending ON notify_outbox (kind, next_attempt_at) WHERE delivered_at IS NULL;
