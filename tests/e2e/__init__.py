"""End-to-end tests: real MTAs (Postfix, swaks) around `python -m relay run`."""
