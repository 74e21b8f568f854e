"""python -m search.dashboard: optuna-dashboard on the study database in $NAS_STORAGE.

The same server as the `optuna-dashboard URL` command, started from Python so
that the URL, password included, is on no command line (a container's
/proc/1/cmdline is readable by anyone in it); the compose file and the
Kubernetes Deployment run this.
"""

from __future__ import annotations

import os
import sys

from search.cli import STORAGE_ENV, Parser
from search.study import StudyError, make_storage, safe_url


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m search.dashboard", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--artifact-dir", help="the workers' --artifact-dir, to show artifacts")
    args = ap.parse_args(argv)
    url = os.environ.get(STORAGE_ENV)
    if not url:
        print(f"error: set {STORAGE_ENV} to the study database's URL", file=sys.stderr)
        return 2
    try:
        storage = make_storage(url, heartbeat=None)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    store = FileSystemArtifactStore(args.artifact_dir) if args.artifact_dir else None
    print(f"optuna-dashboard on {safe_url(url)}: http://{args.host}:{args.port}/", flush=True)
    run_server(storage, host=args.host, port=args.port, artifact_store=store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
