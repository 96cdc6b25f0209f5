"""The QMP monitor: the wire core (protocol), the commands, and the human monitor's words."""
