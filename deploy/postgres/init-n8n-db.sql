-- Runs once, when the PostgreSQL volume is first created: n8n gets its own database next to `metis`.
CREATE DATABASE metis_n8n;
