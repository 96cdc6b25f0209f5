"""QMP: the sans-I/O wire core (json_parser, json_writer, schema, connection), the commands and the context
they run with, the human monitor's words (hmp), the monitor's socket loop, and the client the CLI uses."""
