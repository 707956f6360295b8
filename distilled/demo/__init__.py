"""The offline end-to-end demo (`distill demo`) and its report."""
