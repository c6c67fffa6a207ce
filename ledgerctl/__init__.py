"""The composition of the session ledger: the `ledger` command, the stack `ledger up` runs, the embedded server.

It sits on top of the three packages and is the only place they meet: `ledger` (events, the store, the SDK)
<- `projections` (read models) <- `consumers` (monitor, reclaimer, watchdog) <- `ledgerctl`.
"""
