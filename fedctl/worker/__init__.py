"""The worker (`fedctl join`): DEALER connection, training client, framework adapters."""
