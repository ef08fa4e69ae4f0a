"""Stages: importable ``run()`` functions; the CLI commands are thin wrappers over them."""
