"""Test and demo harness: the guest builder and the demo run.  Not part of the serving path."""
