"""`ftctl serve`: the live status page (app.py) and its static files (static/)."""
