"""The catalog: what the store holds, in SQL (SQLite by default)."""
