"""The `trace-ft` commands, one module each (run, adapt, history, transfer), siblings over
`trace_ft.config` and `trace_ft.evaluate`; `trace_ft.cli` parses and dispatches."""
