"""An "MCP server" that starts and then never answers: it reads stdin and says nothing.
With an argument, it first writes its process id to that file."""

import os
import sys

if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
for _ in sys.stdin:
    pass
