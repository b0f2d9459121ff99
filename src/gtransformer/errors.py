"""The one exception type for mistakes a user can make and fix.

The CLI (cli.py) turns a UserError into a single line on stderr and exit code
2; any other front end (a future HTTP server) must give the same one line to
its user (as a 4xx with a JSON body). Raise it with a message that
names the problem *and* the fix, e.g.
``UserError("--raw data/raw does not exist; run `gtransformer download` first")``.
"""


class UserError(Exception):
    """A problem the user caused (bad path, bad config, bad prompt) and can fix."""
