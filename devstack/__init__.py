"""Local stack orchestration for `make up` / `make down` and the test harness (never imported by services)."""
