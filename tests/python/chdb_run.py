"""Run SQL statements through chdb (ClickHouse in-process) and print the results as JSON.

Why: our ClickHouse server from Debian is 18.16 (2018); chdb is a current engine. Running the
DDL and queries we ship through both proves they work on old and new ClickHouse. chdb cannot
serve the HTTP interface, so Rust tests spawn this helper instead of connecting to it.

Input on stdin: {"statements": ["CREATE TABLE ...", "INSERT ...", "SELECT ..."]}
Output on stdout: a JSON array with, per statement, the list of result rows (JSONEachRow objects;
empty for DDL and inserts). On failure: exit status 1 and the failing statement on stderr.
The session lives in a temporary directory (so MergeTree tables persist across statements) that
is removed afterwards.
"""

import json
import shutil
import sys
import tempfile


def main() -> int:
    try:
        request = json.load(sys.stdin)
        statements = request["statements"]
    except (ValueError, KeyError, TypeError) as error:
        print(f"chdb_run: expected {{\"statements\": [...]}} on stdin: {error}", file=sys.stderr)
        return 2

    from chdb import session

    session_dir = tempfile.mkdtemp(prefix="tributary-chdb-")
    results = []
    chdb_session = session.Session(session_dir)
    try:
        for index, statement in enumerate(statements):
            try:
                result = chdb_session.query(statement, "JSONEachRow")
            except Exception as error:  # chdb raises its own error types; report them all alike
                print(f"chdb_run: statement {index} failed: {error}\n--- statement ---\n{statement}",
                      file=sys.stderr)
                return 1
            text = result.bytes().decode("utf-8") if result is not None else ""
            results.append([json.loads(line) for line in text.splitlines() if line.strip()])
    finally:
        chdb_session.close()
        shutil.rmtree(session_dir, ignore_errors=True)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
