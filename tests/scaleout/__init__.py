"""Scale-out tests: several gateway and counter worker processes over one PostgreSQL store and
one Redis, with faults (a killed worker or gateway, a restarted Redis, terminated database
connections, a lost NOTIFY, a stale lease owner)."""
