"""The command line: click commands, option parsing, logging setup and error-to-exit-code mapping."""
