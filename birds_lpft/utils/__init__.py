"""What every command shares: atomic writes and output checks (``outputs``), checked settings and ``field=value``
overrides (``settings``), command-line failures and interrupts (``cli``), step timing (``timing``), and imports
that touch no file (``sandbox``)."""
