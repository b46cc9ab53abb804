"""Shared by every test directory: pytest puts this folder on ``sys.path`` for its conftest,
so the helpers next to it import as top-level modules (``from _tolerance import assert_close``)."""
