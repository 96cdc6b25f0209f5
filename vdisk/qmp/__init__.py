"""The QMP monitor: the wire core (json_parser, json_writer, schema, connection), the commands, and the human
monitor's words."""
