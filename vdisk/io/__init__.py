"""Host file I/O under the formats: the compiled core and its pure-Python twin, image locks, fault injection
and the power-loss I/O log."""
