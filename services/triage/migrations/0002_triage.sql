-- Triage results (one per run and ticket: a retried call returns the stored answer instead of paying twice),
-- intake records (every webhook / poll delivery, including rejections) and ticket claims (never twice).
CREATE TABLE IF NOT EXISTS results (
    id          bigserial PRIMARY KEY,
    run_id      text        NOT NULL,
    ticket_key  text        NOT NULL,
    mode        text        NOT NULL CHECK (mode IN ('llm', 'offline')),
    needs_human boolean     NOT NULL,
    confidence  double precision NOT NULL,
    cost_usd    numeric(12, 6) NOT NULL DEFAULT 0,
    response    jsonb       NOT NULL,
    -- What guardrails answered for the proposals / escalation; NULL until submitted (a retry resubmits
    -- the stored proposals with the same idempotency keys instead of paying for the LLM again).
    submission  jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, ticket_key)
);
CREATE INDEX IF NOT EXISTS results_ticket_idx ON results (ticket_key, created_at DESC);

CREATE TABLE IF NOT EXISTS intake (
    id          bigserial PRIMARY KEY,
    source      text        NOT NULL CHECK (source IN ('webhook', 'poll')),
    delivery_id text,
    event       text,
    issue_key   text,
    issue_id    text,
    outcome     text        NOT NULL CHECK (outcome IN ('accepted', 'duplicate', 'rejected')),
    reason      text,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS intake_received_idx ON intake (received_at DESC);

-- One row per ticket ever accepted for triage; a claim that was never completed can be taken again
-- after its lease (the worker that held it died), a completed one never.
CREATE TABLE IF NOT EXISTS claims (
    issue_key    text PRIMARY KEY,
    issue_id     text,
    source       text        NOT NULL,
    delivery_id  text,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 1,
    completed_at timestamptz,
    run_id       text
);
