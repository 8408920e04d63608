"""The dashboard the daemon serves when `[web]` is enabled: a live page, JSON endpoints,
evidence clips with their spectrograms, actions through the command path, and `/metrics`.

Only the standard library's threaded HTTP server and prometheus-client (the `[web]` extra) are
used; nothing here is imported unless the dashboard is enabled.
"""
