-- The ticket index. PostgreSQL is the system of record; every worker keeps an in-memory copy
-- (vectors + BM25F) and catches up by reading rows whose rev is above the last one it applied.
CREATE TABLE tickets (
    key              text PRIMARY KEY,
    project          text,
    summary          text NOT NULL,
    description      text NOT NULL DEFAULT '',
    status           text,
    resolution       text,
    resolution_text  text,
    priority         text,
    components       text[] NOT NULL DEFAULT '{}',
    labels           text[] NOT NULL DEFAULT '{}',
    client           text,
    created          timestamptz,
    updated          timestamptz,
    -- hash of what the embedding depends on (embedder name + embedded text): unchanged → no re-embedding
    content_hash     text NOT NULL,
    -- hash of every stored field: an identical upsert changes nothing and bumps no rev
    row_hash         text NOT NULL,
    embedder         text NOT NULL,
    embedding        bytea NOT NULL,              -- float32 little-endian, unit length
    lex_summary      text NOT NULL DEFAULT '',    -- lexical tokens, space separated (no re-tokenising at start-up)
    lex_description  text NOT NULL DEFAULT '',
    rev              bigint NOT NULL,
    deleted          boolean NOT NULL DEFAULT false,
    indexed_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_rev_idx ON tickets (rev);

-- The change counter: writers lock this row, so revs become visible in order and a worker that has
-- applied rev N has seen every change up to N. A new epoch (the row recreated, e.g. after a restore or
-- a TRUNCATE) tells workers to reload everything instead of trusting their rev.
CREATE TABLE index_state (
    id    integer PRIMARY KEY CHECK (id = 1),
    rev   bigint NOT NULL,
    epoch uuid NOT NULL DEFAULT gen_random_uuid()
);

-- Idempotent duplicate checks (n8n passes the Jira webhook delivery id): a redelivery gets the same answer.
CREATE TABLE duplicate_checks (
    idempotency_key text PRIMARY KEY,
    ticket_key      text,
    response        jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Back-fill cursors: the page token to resume from, written in the same transaction as that page's tickets.
CREATE TABLE backfill_cursors (
    name             text PRIMARY KEY,
    jql              text NOT NULL,
    next_page_token  text,
    done             boolean NOT NULL DEFAULT false,
    tickets          bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
