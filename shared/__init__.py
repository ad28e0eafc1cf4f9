"""Code shared by every Metis service: settings, database, errors, auth, metrics, logging, API wiring."""
