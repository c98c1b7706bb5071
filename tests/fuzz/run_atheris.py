"""Coverage-guided fuzzing of tests/fuzz/targets.py with atheris (libFuzzer).

    .venv/bin/python -m tests.fuzz.run_atheris frame -max_total_time=60   # one target
    .venv/bin/python -m tests.fuzz.run_atheris --all 30                   # every target, 30 s each

One target per process (libFuzzer exits when done). The seed corpus is copied to
a temporary directory, so a run never writes into the repository; crashes are
written as ``crash-*`` files into ``--artifacts`` (default: a temp directory,
printed). ``--all`` prints one line per target: executions, coverage, result.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(HERE, "corpus")


def fuzz_one(name: str, libfuzzer_args: list[str]) -> None:
    """Run atheris on one target in this process (does not return)."""
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]
    with atheris.instrument_imports(include=["dataplane", "control", "tests.fuzz"]):
        from tests.fuzz import targets
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(targets.TARGETS)}")

    def one(data: bytes) -> None:
        targets.run(name, data)
    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def run_all(seconds: int, artifacts: str, names: list[str]) -> int:
    """Every target for ``seconds`` each in its own process; 1 if any crashed."""
    from tests.fuzz.targets import TARGETS
    failed = 0
    total = 0
    for name in names or list(TARGETS):
        work = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
        try:
            seed = os.path.join(CORPUS, name)
            if os.path.isdir(seed):
                shutil.copytree(seed, work, dirs_exist_ok=True)
            cmd = [sys.executable, "-m", "tests.fuzz.run_atheris", name, work,
                   f"-max_total_time={seconds}", "-print_final_stats=1", "-max_len=4096",
                   f"-artifact_prefix={artifacts}/{name}-", "-rss_limit_mb=2048"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=seconds + 120)
            m = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
            cov = re.findall(r"cov: (\d+)", proc.stderr)
            execs = int(m.group(1)) if m else 0
            total += execs
            ok = proc.returncode == 0
            print(f"{name:18} {execs:>9} execs  cov {cov[-1] if cov else '?':>5}  "
                  f"{'ok' if ok else f'CRASH rc={proc.returncode}'}", flush=True)
            if not ok:
                failed = 1
                print(proc.stderr[-4000:], file=sys.stderr)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {total} executions; artifacts (if any) in {artifacts}")
    return failed


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] != "--all" and not sys.argv[1].startswith("-"):
        fuzz_one(sys.argv[1], sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", type=int, metavar="SECONDS", required=True,
                   help="fuzz every target this long, one after the other")
    p.add_argument("--artifacts", default="", help="where crash files go")
    p.add_argument("targets", nargs="*", help="only these targets")
    args = p.parse_args()
    artifacts = args.artifacts or tempfile.mkdtemp(prefix="fuzz-artifacts-")
    os.makedirs(artifacts, exist_ok=True)
    rc = run_all(args.all, artifacts, args.targets)
    if not args.artifacts and not os.listdir(artifacts):
        os.rmdir(artifacts)  # nothing crashed: leave nothing behind
    sys.exit(rc)


if __name__ == "__main__":
    main()
