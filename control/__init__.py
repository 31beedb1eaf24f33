"""The control layer: the application services, the one place a command becomes events."""
