"""Read models: pure folds over the ledger and their SQLite materialization."""
